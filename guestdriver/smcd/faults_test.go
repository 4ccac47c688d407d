package smcd

import (
	"errors"
	"io"
	"net"
	"sync/atomic"
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

// revokeAfterData is a device without DMBWatcher whose first data MOVE
// (unsignalled, with data) revokes the DMB it wrote, so that the CDC MOVE
// after it finds no entry before any event could tell the stack.
type revokeAfterData struct {
	ISM
	fabric *Fabric
	armed  atomic.Bool
}

func (d *revokeAfterData) Move(token uint64, dmbe uint32, signal bool, offset uint32, src Buffer, srcOff, n int) error {
	err := d.ISM.Move(token, dmbe, signal, offset, src, srcOff, n)
	if !signal && n > 0 && d.armed.CompareAndSwap(true, false) {
		d.fabric.Revoke(token)
	}
	return err
}

// TestRevokedDMBFoundByMove: a sender that learns of the revoke only from
// its CDC MOVE's NOENTRY (the event not there yet) fails its Write with
// an error wrapping ErrDMBGone too, and so does the next Write.
func TestRevokedDMBFoundByMove(t *testing.T) {
	f := NewFabric(0xFF00)
	cliDev := &revokeAfterData{ISM: f.NewDevice(), fabric: f}
	e := withTestTimeouts(env{srvDev: f.NewDevice(), cliDev: cliDev})
	cli, srv := e.pair(t)
	defer srv.Close()
	defer cli.Close()
	mustSMC(t, cli, srv)
	cliDev.armed.Store(true)
	for i := range 2 {
		_, err := cli.Write(make([]byte, 1000))
		if !errors.Is(err, ErrDMBGone) {
			t.Fatalf("Write %d after the revoke: %v, want an error wrapping ErrDMBGone", i, err)
		}
	}
}

// checkOnly is a device that reports revokes only when asked
// (RevokeChecker), never by DMBWatcher: as when the device's event is still
// on its way.
type checkOnly struct {
	ISM
	l *Loopback
}

func (d checkOnly) Revoked(token uint64) bool { return d.l.Revoked(token) }

// TestRevokeOvertakenByTCPClose: the client's Write fails on the revoked
// server DMB and the client closes; its TCP close reaches the server before
// any event does. The server's Read still names the revoke, not a peer that
// vanished.
func TestRevokeOvertakenByTCPClose(t *testing.T) {
	f := NewFabric(0xFF00)
	sl, cl := f.NewDevice(), f.NewDevice()
	e := withTestTimeouts(env{srvDev: checkOnly{sl, sl}, cliDev: checkOnly{cl, cl}})
	cli, srv := e.pair(t)
	defer srv.Close()
	mustSMC(t, cli, srv)
	if err := f.Revoke(srv.(*Conn).Info().LocalToken); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Write(make([]byte, 1000)); !errors.Is(err, ErrDMBGone) {
		t.Fatalf("client Write: %v", err)
	}
	cli.Close()
	var b [1]byte
	if _, err := srv.Read(b[:]); !errors.Is(err, ErrDMBGone) {
		t.Fatalf("server Read after the client's close: %v, want an error wrapping ErrDMBGone", err)
	}
}
