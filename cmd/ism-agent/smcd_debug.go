package main

// The smcss-like listing of the stack's connections (smcd.DebugHandler),
// opt-in in the smcd-* scenarios:
//
//	ism.debug_addr=HOST:PORT  serve it at http://HOST:PORT/debug/smcd (the
//	                          table; ?json for JSON); reports debug_url.
//	ism.debug_list=1          with the host control port (ttyS1): for each
//	                          "list" line from the host, fetch the listing
//	                          from that URL as a client would, log the table
//	                          and report each connection i of reading k as
//	                          smcss_<k>_<i>=local=... remote=... smc=...
//	                          mode=SEND/RECV lgid= pgid= ltoken= ptoken=
//	                          pdmb= sent= recv= fallback=..., then
//	                          smcss_<k>=<connections> (last: the host waits
//	                          for it). Reports debug_list_ready=1 once it
//	                          listens.
//
// Tokens are their first 4 bytes, as the handler gives them.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

// startSMCDebug serves the listing if ism.debug_addr asks for it; stop
// ends what it started.
func startSMCDebug(e *Env) (stop func(), err error) {
	addr := e.Arg("debug_addr", "")
	if addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("ism.debug_addr: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/debug/smcd", smcd.DebugHandler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	url := "http://" + ln.Addr().String() + "/debug/smcd"
	e.Result("debug_url", url)
	var ctl *hostControl
	if e.Arg("debug_list", "") != "" {
		if ctl, err = openHostControl(); err != nil {
			srv.Close()
			return nil, err
		}
		go listOnRequest(e, ctl, url)
		e.Result("debug_list_ready", 1)
	}
	return func() {
		srv.Close()
		if ctl != nil {
			ctl.Close() // ends listOnRequest's read
		}
	}, nil
}

// listOnRequest answers the host's "list" lines until the port closes.
func listOnRequest(e *Env, ctl *hostControl, url string) {
	client := &http.Client{Timeout: 30 * time.Second}
	for k := 1; ; {
		l, err := ctl.r.ReadString('\n')
		if strings.TrimSpace(l) == "list" {
			if err := reportListing(e, client, url, k); err != nil {
				e.Result(fmt.Sprintf("smcss_%d_error", k), err.Error())
			}
			k++
		}
		if err != nil {
			return
		}
	}
}

// reportListing fetches the listing twice (the table for the log, the JSON
// for the results) and reports reading k.
func reportListing(e *Env, client *http.Client, url string, k int) error {
	get := func(u string) ([]byte, error) {
		resp, err := client.Get(u)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if err == nil && resp.StatusCode != http.StatusOK {
			err = errors.New(resp.Status)
		}
		return b, err
	}
	table, err := get(url)
	if err != nil {
		return err
	}
	for _, l := range strings.Split(strings.TrimRight(string(table), "\n"), "\n") {
		e.Logf("smcss %d: %s", k, l)
	}
	js, err := get(url + "?json")
	if err != nil {
		return err
	}
	var cs []smcd.ConnState
	if err := json.Unmarshal(js, &cs); err != nil {
		return fmt.Errorf("the listing's JSON: %w", err)
	}
	for i, c := range cs {
		in := c.Info
		fallback := strings.ReplaceAll(c.Fallback, " ", "_")
		if fallback == "" {
			fallback = "-"
		}
		e.Result(fmt.Sprintf("smcss_%d_%d", k, i), fmt.Sprintf(
			"local=%s remote=%s smc=%v mode=%s/%s lgid=%#016x pgid=%#016x ltoken=%08x ptoken=%08x pdmb=%d sent=%d recv=%d fallback=%s",
			c.Local, c.Remote, c.SMC, in.SendMode, in.RecvMode, in.LocalGID, in.PeerGID, in.LocalToken>>32, in.PeerToken>>32,
			in.PeerDMBSize, in.BytesSent, in.BytesReceived, fallback))
	}
	e.Result(fmt.Sprintf("smcss_%d", k), len(cs))
	return nil
}
