package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

// TestSMCDebugListing: with ism.debug_addr the agent serves the listing,
// and a reading reports an open SMC-D connection's addresses, GIDs, modes
// and bytes as the host parses them.
func TestSMCDebugListing(t *testing.T) {
	e := testEnv(t, map[string]string{"debug_addr": "127.0.0.1:0"})
	stop, err := startSMCDebug(e)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()

	fab := smcd.NewFabric(0xff00)
	srvDev, cliDev := fab.NewDevice(), fab.NewDevice()
	ln, err := (&smcd.Server{}).Listen(srvDev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_, err = io.ReadFull(c, make([]byte, 5))
			c.Write([]byte{1})
			c.Close() // unlisted before the reading
		}
		accepted <- err
	}()
	c, err := (&smcd.Dialer{}).DialContext(context.Background(), cliDev, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil { // the server has read it all
		t.Fatal(err)
	}
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}

	client := &http.Client{Timeout: time.Minute}
	url := "http://" + strings.TrimPrefix(resultOf(t, e, "debug_url"), "http://")
	if err := reportListing(e, client, url, 1); err != nil {
		t.Fatal(err)
	}
	out := readOut(t, e)
	want := fmt.Sprintf("local=%s remote=%s smc=true mode=copy/copy lgid=%#016x pgid=%#016x", c.LocalAddr(), c.RemoteAddr(), cliDev.GID(), srvDev.GID())
	if !strings.Contains(out, want) || !strings.Contains(out, " sent=5 recv=1 fallback=-") {
		t.Errorf("no reading of the client's connection %q in:\n%s", want, out)
	}
	if !strings.Contains(out, "ISM-RESULT smcss_1=1\n") || !strings.Contains(out, "ism-agent: smcss 1: Local") {
		t.Errorf("reading 1 lacks its count (the client: the server closed its end) or its table:\n%s", out)
	}
}

func readOut(t *testing.T, e *Env) string {
	t.Helper()
	b, err := os.ReadFile(e.out.Name())
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// resultOf is the last value reported for key.
func resultOf(t *testing.T, e *Env, key string) string {
	t.Helper()
	v := ""
	for _, l := range strings.Split(readOut(t, e), "\n") {
		if r, ok := strings.CutPrefix(l, "ISM-RESULT "+key+"="); ok {
			v = r
		}
	}
	if v == "" {
		t.Fatalf("no %s reported", key)
	}
	return v
}
