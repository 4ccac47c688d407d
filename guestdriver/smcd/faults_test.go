package smcd

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// lossy is two hosts whose devices lose every nth signal they send.
func lossy(n uint64) func() env {
	return func() env {
		e := twoHosts()
		e.srvDev.(*Loopback).DropSignals = n
		e.cliDev.(*Loopback).DropSignals = n
		return e
	}
}

// TestLostSignals: with every 3rd signal lost (data CDCs, acknowledgements
// and closes alike), transfers both ways still complete with the data
// intact: a waiting Read or Write finds what a lost signal announced by
// looking at its DMB on its own timer. Tiny DMBs make the flow control
// (write-blocked, consumer updates) depend on those signals too.
func TestLostSignals(t *testing.T) {
	bothModes(t, lossy(3), func(t *testing.T, e env) {
		e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
		cli, srv := e.pair(t)
		mustSMC(t, cli, srv)
		copyBothWays(t, cli, srv, 1<<20+77)
	})
}

// TestAllSignalsLost: no signal arrives at all; the connection still
// completes, on the timer alone.
func TestAllSignalsLost(t *testing.T) {
	e := lossy(1)()
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	copyBothWays(t, cli, srv, 256<<10)
}

// TestRevokedDMB: the device revokes the server's DMB mid-stream. The
// server's Read and the client's Write end with an error naming the cause
// (ErrDMBGone), neither hangs, both close cleanly, and a new connection on
// the same devices works.
func TestRevokedDMB(t *testing.T) {
	bothModes(t, twoHosts, func(t *testing.T, e env) {
		e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
		cli, srv := e.pair(t)
		mustSMC(t, cli, srv)
		first := make(chan struct{})
		readErr := make(chan error, 1)
		go func() {
			var b [4096]byte
			_, err := io.ReadFull(srv, b[:1])
			close(first)
			for err == nil {
				_, err = srv.Read(b[:])
			}
			readErr <- err
		}()
		writeErr := make(chan error, 1)
		go func() {
			var err error
			for err == nil {
				_, err = cli.Write(make([]byte, 64<<10))
			}
			writeErr <- err
		}()
		select {
		case <-first:
		case <-time.After(hangGuard):
			t.Fatal("no data before the revoke")
		}
		tok := srv.(*Conn).Info().LocalToken
		if err := e.srvDev.(*Loopback).fabric.Revoke(tok); err != nil {
			t.Fatal(err)
		}
		for name, ch := range map[string]chan error{"server Read": readErr, "client Write": writeErr} {
			select {
			case err := <-ch:
				if !errors.Is(err, ErrDMBGone) {
					t.Errorf("%s: %v, want an error wrapping ErrDMBGone", name, err)
				}
				var op *net.OpError
				if !errors.As(err, &op) {
					t.Errorf("%s: %T is not a *net.OpError", name, err)
				}
			case <-time.After(hangGuard):
				t.Fatalf("%s hangs after the revoke", name)
			}
		}
		if err := srv.Close(); err != nil {
			t.Errorf("server Close: %v", err)
		}
		if err := cli.Close(); err != nil {
			t.Errorf("client Close: %v", err)
		}
		cli, srv = e.pair(t)
		mustSMC(t, cli, srv)
		copyBothWays(t, cli, srv, 100<<10)
		cli.Close()
		srv.Close()
	})
}
