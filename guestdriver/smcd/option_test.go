package smcd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd/synopt"
)

// optionProgram loads the SMC option program for this test in a cgroup of
// its own (root only: it skips with the reason otherwise).
func optionProgram(t *testing.T) *synopt.Program {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skipf("the SMC option program needs root (CAP_BPF, CAP_NET_ADMIN, cgroup writes); uid is %d", os.Getuid())
	}
	p, err := synopt.LoadInChildCgroup(fmt.Sprintf("ism-smcd-test-%d", os.Getpid()))
	if errors.Is(err, synopt.ErrNoCgroup2) {
		t.Skipf("no cgroup v2 to attach to: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
	})
	return p
}

// noWait is a handshake timeout no test may reach: a connection that waits
// on a CLC message instead of deciding from the TCP handshake hangs the test
// into its own deadline instead of passing after a short wait.
const noWait = 24 * time.Hour

var (
	greeting = bytes.Repeat([]byte("220 plain server says hello\r\n"), 3)
	request  = []byte("ping!") // fewer than a CLC header's 8 bytes
)

// plainServer serves one connection on 127.0.0.1 with plain TCP: it speaks
// first (the greeting, then echoes what it reads) or waits (reads the
// request, then answers the greeting). It returns what it read until EOF.
func plainServer(t *testing.T, speaksFirst bool) (string, <-chan []byte) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan []byte, 1)
	go func() {
		defer close(got)
		c, err := ln.Accept()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		if speaksFirst {
			if _, err := c.Write(greeting); err != nil {
				t.Error(err)
				return
			}
		} else {
			req := make([]byte, len(request))
			if _, err := io.ReadFull(c, req); err != nil {
				t.Error(err)
				return
			}
			if _, err := c.Write(greeting); err != nil {
				t.Error(err)
				return
			}
			defer func() { got <- req }()
			return
		}
		b, err := io.ReadAll(c)
		if err != nil {
			t.Error(err)
		}
		got <- b
	}()
	return ln.Addr().String(), got
}

func wantPlain(t *testing.T, c net.Conn, active bool) *FallbackConn {
	t.Helper()
	f, ok := c.(*FallbackConn)
	if !ok {
		t.Fatalf("got %T, want a TCP fallback", c)
	}
	if !errors.Is(f.Reason, synopt.ErrPeerNoSMC) || f.Reason.Code != DeclinePeerNoSMC {
		t.Fatalf("fallback reason %v, want %v", f.Reason, synopt.ErrPeerNoSMC)
	}
	if f.SYNOption == nil || synopt.Decide(active, *f.SYNOption) == nil || f.SYNOption.Peer() {
		t.Fatalf("option record %v", f.SYNOption)
	}
	if _, ok := f.NetConn().(*net.TCPConn); !ok {
		t.Fatalf("NetConn() is %T", f.NetConn())
	}
	return f
}

// TestOptionDialPlainServer: our Dial to plain TCP servers gets plain TCP at
// once, and each stream is byte-exact: no Proposal in the server's stream,
// none of the server's bytes taken as CLC.
func TestOptionDialPlainServer(t *testing.T) {
	p := optionProgram(t)
	dev := NewLoopback()
	d := &Dialer{SYNOption: p, HandshakeTimeout: noWait}
	for _, speaksFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("speaksFirst=%v", speaksFirst), func(t *testing.T) {
			addr, got := plainServer(t, speaksFirst)
			c, err := d.DialContext(context.Background(), dev, "tcp4", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			f := wantPlain(t, c, true)
			if !f.SYNOption.Sent() {
				t.Fatalf("our SYN did not carry the option: %v", f.SYNOption)
			}
			if !speaksFirst {
				if _, err := c.Write(request); err != nil {
					t.Fatal(err)
				}
			}
			b := make([]byte, len(greeting))
			if _, err := io.ReadFull(c, b); err != nil || !bytes.Equal(b, greeting) {
				t.Fatalf("read %q, %v; want the greeting", b, err)
			}
			if speaksFirst {
				if _, err := c.Write(request); err != nil {
					t.Fatal(err)
				}
			}
			f.CloseWrite()
			if b := <-got; !bytes.Equal(b, request) {
				t.Fatalf("server read %q, want %q", b, request)
			}
		})
	}
}

// TestOptionPlainClientToListener: plain clients that speak first (with
// fewer than 8 bytes) or wait get plain TCP at once from our Listener.
func TestOptionPlainClientToListener(t *testing.T) {
	p := optionProgram(t)
	srv := &Server{SYNOption: p, HandshakeTimeout: noWait}
	ln, err := srv.Listen(NewLoopback(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, speaksFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("clientSpeaksFirst=%v", speaksFirst), func(t *testing.T) {
			c, err := net.Dial("tcp4", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if speaksFirst {
				if _, err := c.Write(request); err != nil {
					t.Fatal(err)
				}
			}
			s, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			f := wantPlain(t, s, false)
			if !f.SYNOption.SavedSYN || f.SYNOption.SYNOption {
				t.Fatalf("saved SYN check: %v", f.SYNOption)
			}
			if !speaksFirst {
				if _, err := s.Write(greeting); err != nil {
					t.Fatal(err)
				}
				b := make([]byte, len(greeting))
				if _, err := io.ReadFull(c, b); err != nil || !bytes.Equal(b, greeting) {
					t.Fatalf("client read %q, %v", b, err)
				}
				if _, err := c.Write(request); err != nil {
					t.Fatal(err)
				}
			}
			b := make([]byte, len(request))
			if _, err := io.ReadFull(s, b); err != nil || !bytes.Equal(b, request) {
				t.Fatalf("server read %q, %v", b, err)
			}
			// Nothing else came to the client: no Decline, no CLC.
			s.Close()
			if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
				t.Fatalf("client got %q (%v) beyond the application's data", rest, err)
			}
		})
	}
}

// TestOptionBothWays: with the option in SYN and SYN-ACK, CLC runs as
// before and the connection is SMC-D.
func TestOptionBothWays(t *testing.T) {
	p := optionProgram(t)
	e := twoHosts()
	e.srv.SYNOption, e.dial.SYNOption = p, p
	c, s := e.pair(t)
	if !IsSMC(c) || !IsSMC(s) {
		t.Fatalf("got %T and %T, want SMC-D", c, s)
	}
	ci, si := c.(*Conn).Info(), s.(*Conn).Info()
	if ci.SYNOption == nil || !ci.SYNOption.Sent() || !ci.SYNOption.Peer() || si.SYNOption == nil || !si.SYNOption.Peer() || !si.SYNOption.SYNOption {
		t.Fatalf("records: client %v, server %v", ci.SYNOption, si.SYNOption)
	}
	copyBothWays(t, c, s, 1<<20+3)
}
