package main

// smcd-plain: the SMC TCP option against plain TCP peers, in one guest over
// 127.0.0.1 (the option program must load: ism.synopt has no "off" here).
//
//	dial-speaks:  our Dial to a plain Go server that speaks first
//	dial-waits:   our Dial to a plain Go server that waits for the client
//	plain-speaks: a plain Go client that speaks first (5 bytes) to our Listener
//	plain-waits:  a plain Go client that waits for our Listener's application
//	both:         our Dial to our Listener: the option both ways, SMC-D
//
// In each plain case the side that speaks first sends greetBytes of a
// seeded stream, the other answers with answerBytes of another (first
// plainFirst bytes of it before anything else: fewer than a CLC header);
// each checks what it read byte for byte. Per case the scenario reports
// <case>=ok, <case>_reason (the fallback reason, or "smc"), and
// <case>_record_<side> (the BPF program's record of that side's handshake).

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

func init() { register("smcd-plain", smcdPlain) }

const (
	greetBytes  = 100 << 10
	answerBytes = 64 << 10
	plainFirst  = 5
)

func seededBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	x := xfer{seed: seed}
	x.fill(b, 0)
	return b
}

// talk runs one side of a case: the side that speaks first sends out and
// then reads in, the other reads first and then answers. Each stream goes
// out in two writes, plainFirst bytes and the rest, so the peer may see
// fewer than a CLC header's 8 bytes first.
func talk(c net.Conn, speaksFirst bool, out, in []byte) error {
	send := func() error {
		if _, err := c.Write(out[:plainFirst]); err != nil {
			return err
		}
		_, err := c.Write(out[plainFirst:])
		return err
	}
	recv := func() error {
		got := make([]byte, len(in))
		if _, err := io.ReadFull(c, got); err != nil {
			return fmt.Errorf("after %d bytes: %w", len(got), err)
		}
		if !bytes.Equal(got, in) {
			i := 0
			for i < len(got) && got[i] == in[i] {
				i++
			}
			return fmt.Errorf("stream differs at byte %d of %d: % x", i, len(in), got[i:min(i+8, len(got))])
		}
		return nil
	}
	if speaksFirst {
		if err := send(); err != nil {
			return err
		}
		return recv()
	}
	if err := recv(); err != nil {
		return err
	}
	return send()
}

// endStream half-closes and checks that nothing follows the peer's stream (no
// Decline, no CLC message).
func endStream(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return err
		}
	}
	rest, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("%d bytes after the stream: % x", len(rest), rest[:min(len(rest), 32)])
	}
	return nil
}

func reportConn(e *Env, name, side string, c net.Conn) {
	switch x := c.(type) {
	case *smcd.FallbackConn:
		e.Result(name+"_reason", x.Reason.Error())
		if x.SYNOption != nil {
			e.Result(name+"_record_"+side, x.SYNOption.String())
		}
	case *smcd.Conn:
		e.Result(name+"_reason", "smc")
		if r := x.Info().SYNOption; r != nil {
			e.Result(name+"_record_"+side, r.String())
		}
	}
}

func smcdPlain(e *Env) error {
	a, dev, closeDev, err := setupSMC(e, "send")
	if err != nil {
		return err
	}
	defer closeDev()
	if smcd.SYNOption() == nil {
		return errors.New("smcd-plain needs the SMC TCP option program, and it did not load")
	}
	d := &smcd.Dialer{DMBSize: a.dmbSize, HandshakeTimeout: a.clc}
	srv := &smcd.Server{DMBSize: a.dmbSize, HandshakeTimeout: a.clc, Logf: e.Logf}
	greet, answer := seededBytes(a.seed, greetBytes), seededBytes(a.seed+1, answerBytes)

	// The plain TCP ends: net's own, never marked.
	plainServer := func(speaksFirst bool) (string, <-chan error, error) {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			return "", nil, err
		}
		done := make(chan error, 1)
		go func() {
			defer ln.Close()
			c, err := ln.Accept()
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			out, in := greet, answer
			if !speaksFirst {
				out, in = answer, greet
			}
			err = talk(c, speaksFirst, out, in)
			if err == nil {
				err = endStream(c)
			}
			done <- err
		}()
		return ln.Addr().String(), done, nil
	}
	dialCase := func(name string, speaksFirst bool) error {
		addr, done, err := plainServer(speaksFirst)
		if err != nil {
			return err
		}
		c, err := d.DialContext(e.Ctx, dev, "tcp4", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		reportConn(e, name, "client", c)
		out, in := answer, greet
		if !speaksFirst {
			out, in = greet, answer
		}
		err = talk(c, !speaksFirst, out, in)
		if err == nil {
			err = endStream(c)
		}
		return errors.Join(err, <-done)
	}
	ln, err := srv.Listen(dev, "tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	listenCase := func(name string, clientSpeaksFirst bool) error {
		done := make(chan error, 1)
		go func() {
			c, err := net.Dial("tcp4", ln.Addr().String())
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			out, in := greet, answer
			if !clientSpeaksFirst {
				out, in = answer, greet
			}
			err = talk(c, clientSpeaksFirst, out, in)
			if err == nil {
				err = endStream(c)
			}
			done <- err
		}()
		c, err := ln.Accept()
		if err != nil {
			return errors.Join(err, <-done)
		}
		defer c.Close()
		reportConn(e, name, "server", c)
		out, in := answer, greet
		if !clientSpeaksFirst {
			out, in = greet, answer
		}
		err = talk(c, !clientSpeaksFirst, out, in)
		if err == nil {
			err = endStream(c)
		}
		return errors.Join(err, <-done)
	}
	bothCase := func(name string) error {
		type res struct {
			c   net.Conn
			err error
		}
		acc := make(chan res, 1)
		go func() { c, err := ln.Accept(); acc <- res{c, err} }()
		c, err := d.DialContext(e.Ctx, dev, "tcp4", ln.Addr().String())
		if err != nil {
			return err
		}
		defer c.Close()
		r := <-acc
		if r.err != nil {
			return r.err
		}
		defer r.c.Close()
		reportConn(e, name, "client", c)
		reportConn(e, name, "server", r.c)
		if !smcd.IsSMC(c) || !smcd.IsSMC(r.c) {
			return fmt.Errorf("option both ways, but client %T, server %T", c, r.c)
		}
		sdone := make(chan error, 1)
		go func() {
			err := talk(r.c, false, answer, greet)
			if err == nil {
				err = endStream(r.c)
			}
			sdone <- err
		}()
		err = talk(c, true, greet, answer)
		if err == nil {
			err = endStream(c)
		}
		return errors.Join(err, <-sdone)
	}

	var errs []error
	for _, c := range []struct {
		name string
		run  func() error
	}{
		{"dial_speaks", func() error { return dialCase("dial_speaks", true) }},
		{"dial_waits", func() error { return dialCase("dial_waits", false) }},
		{"plain_speaks", func() error { return listenCase("plain_speaks", true) }},
		{"plain_waits", func() error { return listenCase("plain_waits", false) }},
		{"both", func() error { return bothCase("both") }},
	} {
		if err := c.run(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.name, err))
			continue
		}
		e.Result(c.name, "ok")
	}
	return errors.Join(errs...)
}
