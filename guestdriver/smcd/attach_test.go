package smcd

import (
	"errors"
	"io"
	"testing"
	"time"
)

// loopOf returns the loopback DMB behind a connection's receive DMB.
func loopOf(c *Conn) *loopDMB { return c.dmb.(*loopDMB) }

// Both ends in attach mode: each side writes the other's DMB through its
// attachment, the device copies nothing, and Info says so.
func TestAttachModeInfo(t *testing.T) {
	for name, mk := range map[string]func() env{"two hosts": twoHosts, "one host": oneHost} {
		t.Run(name, func(t *testing.T) {
			e := mk().attach()
			cli, srv := e.pair(t)
			mustSMC(t, cli, srv)
			const n = 1<<20 + 77
			copyBothWays(t, cli, srv, n)
			for _, c := range []*Conn{cli.(*Conn), srv.(*Conn)} {
				in := c.Info()
				if in.SendMode != ModeAttach || in.RecvMode != ModeAttach || in.SendNote != "" {
					t.Errorf("info %+v: want attach both ways", in)
				}
				if in.BytesSent != n || in.BytesReceived != n {
					t.Errorf("info %+v: want %d bytes each way", in, n)
				}
				if !loopOf(c).guardsIntact() {
					t.Error("something wrote outside a DMB")
				}
			}
			written := e.cliDev.(*Loopback).AttachWritten.Load()
			if e.srvDev != e.cliDev {
				written += e.srvDev.(*Loopback).AttachWritten.Load()
			}
			if written < 2*n {
				t.Errorf("%d bytes written through attachments, want at least %d", written, 2*n)
			}
		})
	}
}

// A copy-only client and an attach-mode server: the client MOVEs into the
// server's shared DMB; the server cannot attach the client's copy-mode DMB
// and MOVEs too. Data is intact both ways.
func TestMixedModes(t *testing.T) {
	e := twoHosts()
	e.srvDev.(*Loopback).AttachMode = true
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	copyBothWays(t, cli, srv, 1<<20+3)
	ci, si := cli.(*Conn).Info(), srv.(*Conn).Info()
	if ci.SendMode != ModeCopy || ci.RecvMode != ModeCopy {
		t.Errorf("copy-only client: %+v", ci)
	}
	if si.SendMode != ModeCopy || si.RecvMode != ModeAttach || si.SendNote == "" {
		t.Errorf("attach-mode server with a copy-only peer: %+v", si)
	}
	if w := e.cliDev.(*Loopback).AttachWritten.Load() + e.srvDev.(*Loopback).AttachWritten.Load(); w != 0 {
		t.Errorf("%d bytes written through attachments in copy mode", w)
	}
}

// The 2025 Linux nocopy fix, as a test: memory a peer can write is hostile.
// A peer that forges the consumer cursor in our DMB (to make us think it
// freed space it did not, or to point past the ring) must never make our
// sender write outside its DMB: the cursor is refused, the connection
// aborts, and the bytes around the peer's DMB are untouched.
func TestForgedConsumerCursorAttach(t *testing.T) {
	for _, tc := range []struct {
		name string
		cons func(size uint32, prod uint64) Cursor
	}{
		{"past what we produced", func(size uint32, prod uint64) Cursor { return CursorOf(size, prod+1) }},
		{"a wrap ahead", func(size uint32, prod uint64) Cursor { return CursorOf(size, prod+uint64(size)) }},
		{"count beyond the ring", func(size uint32, prod uint64) Cursor { return Cursor{Count: size + 4096} }},
		{"backwards", func(size uint32, prod uint64) Cursor { return Cursor{Wrap: 0xffff, Count: 1} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := twoHosts().attach()
			e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
			cli, srv := e.pair(t)
			mustSMC(t, cli, srv)
			victim, attacker := cli.(*Conn), srv.(*Conn)
			// Some data first, so the ring has moved.
			if _, err := victim.Write(make([]byte, 3000)); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(attacker, make([]byte, 3000)); err != nil {
				t.Fatal(err)
			}
			victim.mu.Lock()
			prod := victim.txProd
			victim.mu.Unlock()
			// The attacker writes a forged header into the victim's DMB
			// through its attachment and signals, again and again: its
			// own connection may still send an honest acknowledgement
			// over it before the victim looks.
			forged := CDC{Cons: tc.cons(victim.psize, prod)}
			stop := make(chan struct{})
			forging := make(chan error, 1)
			go func() {
				for {
					attacker.txMu.Lock()
					err := attacker.storeCDC(&forged)
					if err == nil {
						err = attacker.dev.Move(attacker.peerToken, attacker.peerDMBE, true, 0, nil, 0, 0)
					}
					attacker.txMu.Unlock()
					select {
					case <-stop:
						forging <- nil
						return
					default:
					}
					if err != nil {
						forging <- err
						return
					}
					time.Sleep(time.Millisecond)
				}
			}()
			// The victim keeps writing; it must fail, not write more.
			deadline := time.Now().Add(hangGuard)
			var err error
			for err == nil && time.Now().Before(deadline) {
				_, err = victim.Write(make([]byte, 4096))
			}
			close(stop)
			if ferr := <-forging; ferr != nil {
				t.Logf("forging stopped: %v", ferr) // the victim aborted and the attacker's connection failed
			}
			if !errors.Is(err, ErrCDC) {
				t.Fatalf("victim's write after a forged cursor: %v", err)
			}
			if !loopOf(attacker).guardsIntact() {
				t.Fatal("the victim wrote outside the attacker's DMB")
			}
		})
	}
}

// The peer closes (and unregisters its DMB) while we write through our
// attachment of it: the write ends in an error, never a hang or a write
// into memory that is no longer the peer's DMB.
func TestAttachPeerClosesMidWrite(t *testing.T) {
	e := twoHosts().attach()
	e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	peerDMB := loopOf(srv.(*Conn))
	werr := make(chan error, 1)
	go func() {
		buf := make([]byte, 64<<10)
		for {
			if _, err := cli.Write(buf); err != nil {
				werr <- err
				return
			}
		}
	}()
	if _, err := io.ReadFull(srv, make([]byte, 256<<10)); err != nil {
		t.Fatal(err)
	}
	srv.Close() // unread data: abort, then its DMB is unregistered
	select {
	case err := <-werr:
		if err == nil {
			t.Fatal("no error")
		}
		t.Logf("writer: %v", err)
	case <-time.After(hangGuard):
		t.Fatal("writer hangs after the peer closed")
	}
	if !peerDMB.guardsIntact() {
		t.Fatal("write outside the peer's DMB")
	}
}
