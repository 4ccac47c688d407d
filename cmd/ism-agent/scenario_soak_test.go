package main

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

// TestSoakLoopback runs the soak loops over the in-process loopback device
// until both modes have completed streams, and checks that nothing was
// counted as lost, failed or fallen back.
func TestSoakLoopback(t *testing.T) {
	dev := smcd.NewLoopback()
	dev.AttachMode = true
	ln, err := (&smcd.Server{DMBSize: 64 << 10}).Listen(dev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// The clients stop first, as in test/soak: a server that stops
	// first cuts off a stream that was just being dialled.
	srvCtx, stopServer := context.WithCancel(context.Background())
	defer stopServer()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var srv, cli soakCounters
	served := make(chan error, 1)
	go func() { served <- soakServe(srvCtx, ln, &srv) }()
	sent := make(chan struct{})
	go func() {
		a := smcArgs{conns: 2, bytes: 256 << 10, seed: 7}
		soakSend(ctx, dev, &smcd.Dialer{DMBSize: 64 << 10}, ln.Addr().String(), a, &cli)
		close(sent)
	}()
	// Until each mode has 3 streams through (or the test's deadline).
	for cli.okAttach.Load() < 3 || cli.okCopy.Load() < 3 {
		if cli.errs.Load() > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-sent
	stopServer()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	if err := cli.verdict(true); err != nil {
		t.Fatal(err)
	}
	if err := srv.verdict(true); err != nil {
		t.Fatal(err)
	}
	if cli.okAttach.Load() < 3 || cli.okCopy.Load() < 3 || srv.bytes.Load() < 6*256<<10 {
		t.Fatalf("attach %d, copy %d streams; server hashed %d bytes", cli.okAttach.Load(), cli.okCopy.Load(), srv.bytes.Load())
	}
}

// A server that answers the wrong digest is a mismatch, and fails the
// verdict even when not strict; a plain TCP server is a fallback.
func TestSoakMismatch(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(io.Discard, c)
		c.Write(make([]byte, 32)) // not the SHA-256 of anything sent
	}()
	var s soakCounters
	soakStream(context.Background(), smcd.NewLoopback(), &smcd.Dialer{}, ln.Addr().String(), 1, 1000, &s)
	if s.mismatch.Load() != 1 || s.fallback.Load() != 1 || s.verdict(false) == nil {
		t.Fatalf("mismatch %d fallback %d verdict %v", s.mismatch.Load(), s.fallback.Load(), s.verdict(false))
	}
}
