package main

// Scenarios for the backend's fault injection (README, "Fault injection"):
// the test on the host revokes a DMB while these guests stream.
//
//	smcd-revoke-server  listen on ism.listen (default :7000). Connection 0:
//	                    read, reporting reading_0=1 after 1 MiB, until the
//	                    connection fails; the error must be the stack's
//	                    DMB-gone one (smcd.ErrDMBGone), reported as
//	                    revoked_error_0. Then connection 1: sink, as
//	                    smcd-server (sha_1).
//	smcd-revoke-client  dial ism.connect. Connection 0: write until a Write
//	                    fails, which must be with smcd.ErrDMBGone
//	                    (revoked_error_0). Then connection 1: send
//	                    ism.bytes, as smcd-client (sha_1).
//
// Both close connection 0 after its error, so the test also shows that the
// connection ends cleanly and that a new one works on the same devices.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

func init() {
	register("smcd-revoke-server", smcdRevokeServer)
	register("smcd-revoke-client", smcdRevokeClient)
}

// revokedErr checks that err ended connection 0 because a DMB was revoked
// and reports it.
func revokedErr(e *Env, side string, n int64, err error) error {
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("%s: connection 0 ended after %d bytes with %v, want a revoked DMB's error", side, n, err)
	}
	e.Result("revoked_error_0", err.Error())
	e.Result("revoked_bytes_0", n)
	if !errors.Is(err, smcd.ErrDMBGone) {
		return fmt.Errorf("%s: connection 0 failed after %d bytes with %v, want smcd.ErrDMBGone", side, n, err)
	}
	return nil
}

func smcdRevokeServer(e *Env) error {
	a, dev, closeDev, err := setupSMC(e, "sink")
	if err != nil {
		return err
	}
	defer closeDev()
	ln, err := listenSMC(e, a, dev, e.Arg("listen", ":7000"))
	if err != nil {
		return err
	}
	defer ln.Close()
	e.Result("listening", ln.Addr())
	c, err := ln.Accept()
	if err != nil {
		return fmt.Errorf("accept 0: %w", err)
	}
	e.Result("smc_0", smcd.IsSMC(c))
	reportMode(e, c, 0)
	n, err := io.Copy(&progress{e: e, key: "reading_0"}, c)
	if cerr := c.Close(); cerr != nil {
		return fmt.Errorf("closing connection 0 after its error: %w", cerr)
	}
	if err := revokedErr(e, "server", n, err); err != nil {
		return err
	}
	c, err = ln.Accept()
	if err != nil {
		return fmt.Errorf("accept 1: %w", err)
	}
	defer c.Close()
	return sink(e, c, "sink", time.Now())
}

func smcdRevokeClient(e *Env) error {
	a, dev, closeDev, err := setupSMC(e, "send")
	if err != nil {
		return err
	}
	defer closeDev()
	d := &smcd.Dialer{DMBSize: a.dmbSize, HandshakeTimeout: a.clc}
	addr := e.Arg("connect", "169.254.7.1:7000")
	c, err := dialPeer(e.Ctx, dev, d, addr)
	if err != nil {
		return fmt.Errorf("dial 0: %w", err)
	}
	e.Result("client_smc_0", smcd.IsSMC(c))
	reportMode(e, c, 0)
	n, err := writeUntilError(c)
	if cerr := c.Close(); cerr != nil {
		return fmt.Errorf("closing connection 0 after its error: %w", cerr)
	}
	if err := revokedErr(e, "client", n, err); err != nil {
		return err
	}
	c, err = dialPeer(e.Ctx, dev, d, addr)
	if err != nil {
		return fmt.Errorf("dial 1: %w", err)
	}
	defer c.Close()
	e.Result("client_smc_1", smcd.IsSMC(c))
	return send(e, c, 1, a.bytes, a)
}

// writeUntilError writes 64 KiB chunks until a Write fails.
func writeUntilError(c net.Conn) (int64, error) {
	buf := make([]byte, 64<<10)
	var n int64
	for {
		k, err := c.Write(buf)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
}

// progress discards what it is given and reports key=1 once it has had
// 1 MiB.
type progress struct {
	e        *Env
	key      string
	n        int
	reported bool
}

func (p *progress) Write(b []byte) (int, error) {
	p.n += len(b)
	if !p.reported && p.n >= 1<<20 {
		p.reported = true
		p.e.Result(p.key, 1)
	}
	return len(b), nil
}
