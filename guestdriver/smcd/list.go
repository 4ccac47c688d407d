package smcd

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"sync"
	"text/tabwriter"
	"time"
)

// The process's open connections, for an smcss-like listing: every Conn
// from newConn until its Close, and every FallbackConn until its Close. A
// connection the application never closes stays listed, as it stays open.
var open = struct {
	sync.Mutex
	conns map[net.Conn]time.Time // since
}{conns: map[net.Conn]time.Time{}}

func track(c net.Conn) {
	open.Lock()
	open.conns[c] = time.Now()
	open.Unlock()
}

func untrack(c net.Conn) {
	open.Lock()
	delete(open.conns, c)
	open.Unlock()
}

// ConnState is one open connection of this process, as smcss lists one.
type ConnState struct {
	Local, Remote string
	Since         time.Time
	// SMC: an SMC-D connection, with Info; otherwise a TCP fallback, and
	// Fallback says why (the Decline's code and who sent it).
	SMC      bool
	Info     Info
	Fallback string
}

// Connections lists the process's open SMC-D connections and TCP
// fallbacks, oldest first.
func Connections() []ConnState {
	open.Lock()
	type item struct {
		c     net.Conn
		since time.Time
	}
	items := make([]item, 0, len(open.conns))
	for c, t := range open.conns {
		items = append(items, item{c, t})
	}
	open.Unlock()
	out := make([]ConnState, 0, len(items))
	for _, it := range items {
		s := ConnState{Local: it.c.LocalAddr().String(), Remote: it.c.RemoteAddr().String(), Since: it.since}
		switch c := it.c.(type) {
		case *Conn:
			s.SMC, s.Info = true, c.Info()
		case *FallbackConn:
			if c.Reason != nil {
				s.Fallback = c.Reason.Error()
			}
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Since.Equal(out[j].Since) {
			return out[i].Since.Before(out[j].Since)
		}
		return out[i].Local < out[j].Local
	})
	return out
}

// WriteConnections prints cs as smcss does: one line per connection with
// its addresses, mode, peer GID, tokens (first 4 bytes), bytes moved, or
// the fallback's reason.
func WriteConnections(out io.Writer, cs []ConnState) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "Local\tRemote\tMode\tPeer GID\tToken\tPeer token\tSent\tReceived\tFallback")
	for _, c := range cs {
		if !c.SMC {
			fmt.Fprintf(w, "%s\t%s\tTCP\t-\t-\t-\t-\t-\t%s\n", c.Local, c.Remote, c.Fallback)
			continue
		}
		in := c.Info
		fmt.Fprintf(w, "%s\t%s\tSMCD %s/%s\t%#016x\t%08x…\t%08x…\t%d\t%d\t-\n", c.Local, c.Remote,
			in.SendMode, in.RecvMode, in.PeerGID, in.LocalToken>>32, in.PeerToken>>32, in.BytesSent, in.BytesReceived)
	}
	return w.Flush()
}

// DebugHandler serves Connections: as the table, or as JSON with ?json.
// It is opt-in: mount it where only the operator reaches it.
func DebugHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cs := Connections()
		if _, ok := r.URL.Query()["json"]; ok {
			w.Header().Set("Content-Type", "application/json")
			for i := range cs {
				// Token prefixes only, as in the table: a token is the
				// right to write into a DMB.
				cs[i].Info.LocalToken &^= 1<<32 - 1
				cs[i].Info.PeerToken &^= 1<<32 - 1
			}
			json.NewEncoder(w).Encode(cs)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		WriteConnections(w, cs)
	})
}
