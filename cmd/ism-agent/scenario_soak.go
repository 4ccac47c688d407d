package main

// Scenarios for `make soak` (test/soak): SMC-D streams whose SHA-256 is
// checked end to end, for as long as asked, while the host kills and
// restarts guests.
//
//	soak-server  listen on ism.listen (default :7000) and serve SMC-D
//	             connections until the host sends "stop" on the control
//	             port (vmharness VMConfig.Control), or with ism.dur until
//	             that has passed: each sends an 8-byte stream id and a
//	             stream until EOF; the server hashes it and answers with
//	             the 32-byte SHA-256.
//	soak-client  ism.conns loops (default 2) against ism.connect until
//	             ism.dur (default 1m) has passed, each sending ism.bytes (default 4 MiB)
//	             of a seeded stream per connection and comparing the
//	             digest the server answers with its own. Even loops use
//	             what the device offers (attach mode where it can), odd
//	             loops force copy mode.
//
// Both report their counters every ism.report (default 10 s) and at the
// end, as soak.<counter>=<n> results (the last value wins):
//
//	soak.ok_attach, soak.ok_copy  streams whose digest matched, by the
//	                              mode the client sent in
//	soak.mismatch                 streams whose digest differed: data lost
//	                              or changed (the client's; always fatal)
//	soak.errors                   streams that ended in an error (a peer
//	                              killed mid-stream ends some), and
//	                              soak.last_error
//	soak.bytes                    bytes sent (client) or hashed (server)
//	soak.fallback                 connections that fell back to TCP
//
// A mismatch fails the scenario at once. With ism.strict=1 (a pair the host
// never kills) any error or fallback fails it too.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

func init() {
	register("soak-server", soakServer)
	register("soak-client", soakClient)
}

// soakCounters are one guest's soak figures.
type soakCounters struct {
	okAttach, okCopy, mismatch, errs, bytes, fallback atomic.Int64

	mu      sync.Mutex
	lastErr string
}

func (s *soakCounters) fail(err error) {
	s.errs.Add(1)
	s.mu.Lock()
	s.lastErr = err.Error()
	s.mu.Unlock()
}

func (s *soakCounters) report(e *Env) {
	e.Result("soak.ok_attach", s.okAttach.Load())
	e.Result("soak.ok_copy", s.okCopy.Load())
	e.Result("soak.mismatch", s.mismatch.Load())
	e.Result("soak.errors", s.errs.Load())
	e.Result("soak.bytes", s.bytes.Load())
	e.Result("soak.fallback", s.fallback.Load())
	s.mu.Lock()
	if s.lastErr != "" {
		e.Result("soak.last_error", s.lastErr)
	}
	s.mu.Unlock()
}

// verdict is the scenario's error: any mismatch; with strict, any error or
// fallback too.
func (s *soakCounters) verdict(strict bool) error {
	if n := s.mismatch.Load(); n > 0 {
		return fmt.Errorf("%d streams arrived with another SHA-256 than was sent", n)
	}
	if strict {
		if n := s.errs.Load(); n > 0 {
			s.mu.Lock()
			defer s.mu.Unlock()
			return fmt.Errorf("%d streams failed on a pair nobody kills, the last: %s", n, s.lastErr)
		}
		if n := s.fallback.Load(); n > 0 {
			return fmt.Errorf("%d connections fell back to TCP", n)
		}
	}
	return nil
}

// soakRun runs work until ctx ends, reporting the counters every
// ism.report, and stops it early on a mismatch.
func soakRun(ctx context.Context, e *Env, s *soakCounters, work func(ctx context.Context) error) error {
	every := e.ArgDuration("report", 10*time.Second)
	if every <= 0 {
		return errors.New("ism.report must be positive")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- work(ctx) }()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			s.report(e)
			return errors.Join(err, s.verdict(e.Arg("strict", "0") == "1"))
		case <-tick.C:
			s.report(e)
			if s.mismatch.Load() > 0 {
				cancel()
			}
		}
	}
}

func soakServer(e *Env) error {
	a, dev, closeDev, err := setupSMC(e, "sink")
	if err != nil {
		return err
	}
	defer closeDev()
	ctx, cancel := context.WithCancel(e.Ctx)
	defer cancel()
	if dur := e.ArgDuration("dur", 0); dur > 0 {
		ctx, cancel = context.WithTimeout(ctx, dur)
		defer cancel()
	} else {
		// Open the port before saying "listening": opening it clears
		// what the host may already have sent.
		ctl, err := openHostControl()
		if err != nil {
			return err
		}
		defer ctl.Close()
		go func() {
			if err := ctl.WaitLine(ctx, "stop"); err != nil {
				e.Logf("soak: %v", err)
			}
			cancel()
		}()
	}
	ln, err := listenSMC(e, a, dev, e.Arg("listen", ":7000"))
	if err != nil {
		return err
	}
	e.Result("listening", ln.Addr())
	var s soakCounters
	return soakRun(ctx, e, &s, func(ctx context.Context) error { return soakServe(ctx, ln, &s) })
}

// soakServe serves streams on ln until ctx ends, then closes ln and waits
// for the streams in flight.
func soakServe(ctx context.Context, ln net.Listener, s *soakCounters) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(streamTimeout))
			if !smcd.IsSMC(c) {
				s.fallback.Add(1)
			}
			if err := soakSink(c, s); err != nil {
				s.fail(err)
			}
		}()
	}
}

// soakSink hashes one stream and answers with its digest.
func soakSink(c net.Conn, s *soakCounters) error {
	var id [8]byte
	if _, err := io.ReadFull(c, id[:]); err != nil {
		return fmt.Errorf("reading the stream id: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(h, c)
	s.bytes.Add(n)
	if err != nil {
		return fmt.Errorf("stream %#x after %d bytes: %w", binary.BigEndian.Uint64(id[:]), n, err)
	}
	if _, err := c.Write(h.Sum(nil)); err != nil {
		return fmt.Errorf("stream %#x: writing the digest: %w", binary.BigEndian.Uint64(id[:]), err)
	}
	return nil
}

func soakClient(e *Env) error {
	a, dev, closeDev, err := setupSMC(e, "send")
	if err != nil {
		return err
	}
	defer closeDev()
	addr := e.Arg("connect", "169.254.7.1:7000")
	dur := e.ArgDuration("dur", time.Minute)
	if dur <= 0 {
		return errors.New("ism.dur must be positive")
	}
	ctx, cancel := context.WithTimeout(e.Ctx, dur)
	defer cancel()
	var s soakCounters
	return soakRun(ctx, e, &s, func(ctx context.Context) error {
		soakSend(ctx, dev, &smcd.Dialer{DMBSize: a.dmbSize, HandshakeTimeout: a.clc}, addr, a, &s)
		return nil
	})
}

// soakSend runs a.conns loops of streams to addr until ctx ends or a
// stream arrives changed. Even loops use dev as it is, odd ones copy-only.
func soakSend(ctx context.Context, dev smcd.ISM, d *smcd.Dialer, addr string, a smcArgs, s *soakCounters) {
	var wg sync.WaitGroup
	for loop := range a.conns {
		ldev := dev
		if loop%2 == 1 {
			ldev = smcDevice(dev, tSMCCopy)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := uint64(0); ctx.Err() == nil && s.mismatch.Load() == 0; n++ {
				// Each stream its own seed: a stale byte from an
				// earlier stream cannot pass for a right one.
				soakStream(ctx, ldev, d, addr, a.seed+uint64(loop)<<48+n, a.bytes, s)
			}
		}()
	}
	wg.Wait()
}

// soakStream sends one stream and checks the digest the server answers.
func soakStream(ctx context.Context, dev smcd.ISM, d *smcd.Dialer, addr string, id uint64, n int, s *soakCounters) {
	c, err := dialPeer(ctx, dev, d, addr)
	if err != nil {
		if ctx.Err() == nil {
			s.fail(fmt.Errorf("dial: %w", err))
			// The peer is down (killed): try again shortly, not in a
			// tight loop.
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
		return
	}
	defer c.Close()
	// A stream may outlive ism.dur by its own length, not more: a killed
	// peer's stream ends in an error, never in a hang.
	c.SetDeadline(time.Now().Add(streamTimeout))
	mode := "tcp"
	if sc, ok := c.(*smcd.Conn); ok {
		mode = sc.Info().SendMode.String()
	} else {
		s.fallback.Add(1)
	}
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], id)
	if _, err := c.Write(hdr[:]); err != nil {
		s.fail(fmt.Errorf("stream %#x: %w", id, err))
		return
	}
	x := xfer{seed: id}
	h := sha256.New()
	buf := make([]byte, 64<<10)
	for off := 0; off < n; {
		m := min(len(buf), n-off)
		x.fill(buf[:m], off)
		h.Write(buf[:m])
		if _, err := c.Write(buf[:m]); err != nil {
			s.fail(fmt.Errorf("stream %#x (%s) after %d bytes: %w", id, mode, off, err))
			return
		}
		off += m
		s.bytes.Add(int64(m))
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			s.fail(fmt.Errorf("stream %#x (%s): half-close: %w", id, mode, err))
			return
		}
	}
	got := make([]byte, sha256.Size)
	if _, err := io.ReadFull(c, got); err != nil {
		s.fail(fmt.Errorf("stream %#x (%s): reading the digest: %w", id, mode, err))
		return
	}
	if !bytes.Equal(got, h.Sum(nil)) {
		s.mismatch.Add(1)
		s.fail(fmt.Errorf("stream %#x (%s): the server hashed %x, sent %x", id, mode, got, h.Sum(nil)))
		return
	}
	switch mode {
	case "attach":
		s.okAttach.Add(1)
	case "copy":
		s.okCopy.Add(1)
	}
}

// streamTimeout bounds one stream: generous for a TCG guest on a loaded
// host, and only there so that a stream cut off unseen cannot hang a loop.
const streamTimeout = 5 * time.Minute
