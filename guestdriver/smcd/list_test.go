package smcd

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

// listed returns the open connections whose local or remote address is
// one of c's ends (other tests' connections may be open meanwhile).
func listed(cs []ConnState, local, remote string) []ConnState {
	var out []ConnState
	for _, s := range cs {
		if s.Local == local && s.Remote == remote {
			out = append(out, s)
		}
	}
	return out
}

// TestConnectionsListing: an SMC-D pair is listed from both ends with
// mode, GIDs and byte counts while open, and not after Close; a TCP
// fallback is listed with its reason; the table and the JSON endpoint show
// token prefixes only.
func TestConnectionsListing(t *testing.T) {
	e := twoHosts()
	cli, srv := e.pair(t)
	if _, err := cli.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(srv, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	cs := Connections()
	c := listed(cs, cli.LocalAddr().String(), cli.RemoteAddr().String())
	s := listed(cs, srv.LocalAddr().String(), srv.RemoteAddr().String())
	if len(c) != 1 || len(s) != 1 || !c[0].SMC || !s[0].SMC {
		t.Fatalf("client %+v, server %+v", c, s)
	}
	if c[0].Info.PeerGID != e.srvDev.GID() || c[0].Info.BytesSent != 5 || s[0].Info.BytesReceived != 5 || c[0].Since.IsZero() {
		t.Errorf("client %+v, server %+v", c[0], s[0])
	}

	var table bytes.Buffer
	if err := WriteConnections(&table, cs); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), cli.LocalAddr().String()) || !strings.Contains(table.String(), "SMCD copy/copy") ||
		strings.Contains(table.String(), fmt.Sprintf("%016x", c[0].Info.LocalToken)) {
		t.Errorf("table:\n%s", table.String())
	}
	rec := httptest.NewRecorder()
	DebugHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/debug/smcd?json", nil))
	var got []ConnState
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	for _, g := range listed(got, cli.LocalAddr().String(), cli.RemoteAddr().String()) {
		if g.Info.LocalToken&(1<<32-1) != 0 || g.Info.PeerToken&(1<<32-1) != 0 || g.Info.LocalToken != c[0].Info.LocalToken&^(1<<32-1) {
			t.Errorf("JSON tokens %#x %#x, want the top 4 bytes of %#x only", g.Info.LocalToken, g.Info.PeerToken, c[0].Info.LocalToken)
		}
	}

	cli.Close()
	srv.Close()
	cs = Connections()
	if n := len(listed(cs, cli.LocalAddr().String(), cli.RemoteAddr().String())) + len(listed(cs, srv.LocalAddr().String(), srv.RemoteAddr().String())); n != 0 {
		t.Errorf("%d connections still listed after Close", n)
	}

	raw, fb := rawClient(t, Server{})
	raw.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	if _, err := io.ReadFull(fb, make([]byte, 18)); err != nil {
		t.Fatal(err)
	}
	f := listed(Connections(), fb.LocalAddr().String(), fb.RemoteAddr().String())
	if len(f) != 1 || f[0].SMC || f[0].Fallback == "" {
		t.Fatalf("fallback listed as %+v", f)
	}
	fb.Close()
	if f := listed(Connections(), fb.LocalAddr().String(), fb.RemoteAddr().String()); len(f) != 0 {
		t.Errorf("fallback still listed after Close: %+v", f)
	}
}
