package main

// Scenarios for the SMC-D stack (guestdriver/smcd) over the ISM device.
//
//	smcd-server  listen on ism.listen (default :7000); serve ism.conns
//	             connections (default 1) in ism.mode sink (default), echo,
//	             sink-vanish, sink-hold (read until the VM is killed,
//	             reporting holding_<i>=1 after 1 MiB) or sink-gone (below),
//	             then exit.
//	smcd-client  dial ism.connect; ism.conns connections in ism.mode send
//	             (default), echo, stream (send until the VM is killed),
//	             stream-error (send until a write fails, report
//	             stream_error_<i>) or send-hold (below).
//	smcd-local   server and client in this one guest (intra-VM SMC-D: the DMB
//	             rgid is the device's own GID), over 127.0.0.1.
//
// send/sink: connection i sends a 4-byte index, then ism.bytes/ism.conns
// bytes of the seeded stream (seed ism.seed + i<<40), then half-closes; the
// server hashes what it read until EOF, writes the 32-byte SHA-256 back and
// closes. Both report sha_<i>, and the client checks the echoed digest.
// echo: ism.pairs (default 1000) request/response pairs of ism.msg bytes.
// sink-vanish: the server expects every connection to end in an error (the
// client's VM is killed mid-stream) and reports how long that took.
// send-hold / sink-gone: as send/sink, but the client does not half-close:
// the server reads exactly ism.bytes/ism.conns bytes (give it ism.bytes
// too) and answers the digest; the client checks it, reports sent_<i>=1 and
// keeps the connection (and its DMBs) until its VM is killed; the server,
// having reported waiting_gone_<i>=1, reads until the connection fails and
// reports the error as peer_gone_<i> (a clean EOF is an error).
// Each SMC-D connection reports send_mode_<i> and recv_mode_<i> (copy or
// attach, smcd.Info), and the scenario ends with attach_bytes (written
// through attachments) and attachments_left (held by the driver once every
// connection is closed). ism.modes limits the driver's modes (copy,
// attach; default: what the device offers).
// ism.decline=<code> makes the server (or, in smcd-client, the client)
// decline SMC-D: the connection falls back to TCP; smc_<i> tells which.
// ism.debug_addr and ism.debug_list serve and report the smcss-like
// listing of the connections (smcd_debug.go).
// ism.ueid=A[,B] offers SMC-Dv2 with these UEIDs (as the kernel's SMC does;
// default none: v1 only); each connection reports clc_version_<i>.
// ism.clc_timeout bounds each CLC handshake (default: until the watchdog;
// Linux's 6 s would let the speed of a TCG guest on a loaded host decide
// between SMC-D and a TCP fallback, and the tests check which one ran).
// ism.synopt=off negotiates in band; by default the SMC TCP option program
// is loaded (smcd.EnableSYNOption) and the result synopt says which ran:
// "option", or "in-band" when it could not be loaded.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
	"github.com/ism-backend/ism-backend/guestdriver/smcdev"
)

func init() {
	register("smcd-server", smcdServer)
	register("smcd-client", smcdClient)
	register("smcd-local", smcdLocal)
}

type smcArgs struct {
	mode    string
	conns   int
	bytes   int
	pairs   int
	msg     int
	seed    uint64
	decline uint32
	dmbSize int
	clc     time.Duration // CLC handshake bound (smcd's HandshakeTimeout)
	ueids   []string      // SMC-Dv2 UEIDs offered (none: v1 only)
}

func smcdArgs(e *Env, defMode string) (smcArgs, error) {
	a := smcArgs{
		mode:    e.Arg("mode", defMode),
		conns:   e.ArgInt("conns", 1),
		bytes:   e.ArgInt("bytes", 1<<20),
		pairs:   e.ArgInt("pairs", 1000),
		msg:     e.ArgInt("msg", 64),
		dmbSize: e.ArgInt("dmb_size", smcd.DefaultDMBSize),
	}
	var err error
	if a.seed, err = argU64(e, "seed", 1); err != nil {
		return a, err
	}
	d, err := argU64(e, "decline", 0)
	if err != nil {
		return a, err
	}
	a.decline = uint32(d)
	var left time.Duration
	if dl, ok := e.Ctx.Deadline(); ok {
		left = time.Until(dl)
	}
	a.clc = e.ArgDuration("clc_timeout", left)
	a.ueids = splitList(e.Arg("ueid", ""))
	if a.conns <= 0 || a.bytes < 0 || a.pairs <= 0 || a.msg <= 0 {
		return a, fmt.Errorf("bad smcd arguments %+v", a)
	}
	return a, nil
}

// openSMC opens the ISM device as an smcd.ISM; its close function
// reports the driver's attach-mode counters (the connections are closed by
// then) and resets the device.
func openSMC(e *Env) (smcdev.Adapter, func(), error) {
	d, err := openDriver(e)
	if err != nil {
		return smcdev.Adapter{}, nil, err
	}
	e.Result("gid", fmt.Sprintf("%#x", d.GID()))
	e.Result("attach_offered", d.AttachOffered())
	return smcdev.New(d), func() {
		st := d.AttachStats()
		e.Result("attach_bytes", st.WrittenBytes)
		e.Result("attachments_left", st.Attachments)
		e.Result("shared_dmbs_left", st.SharedDMBs)
		d.Close()
	}, nil
}

// reportMode reports how connection i moves data each way.
func reportMode(e *Env, c net.Conn, i int) {
	sc, ok := c.(*smcd.Conn)
	if !ok {
		return
	}
	in := sc.Info()
	e.Result(fmt.Sprintf("send_mode_%d", i), in.SendMode)
	e.Result(fmt.Sprintf("recv_mode_%d", i), in.RecvMode)
	e.Result(fmt.Sprintf("clc_version_%d", i), in.CLCVersion)
	if in.SendNote != "" {
		e.Logf("connection %d MOVEs: %s", i, in.SendNote)
	}
}

// setupSMC parses the scenario's arguments and opens the ISM device as an
// smcd.ISM; closeDev resets it.
func setupSMC(e *Env, defMode string) (a smcArgs, dev smcdev.Adapter, closeDev func(), err error) {
	if a, err = smcdArgs(e, defMode); err != nil {
		return a, dev, nil, err
	}
	if err := setupOption(e); err != nil {
		return a, dev, nil, err
	}
	if dev, closeDev, err = openSMC(e); err != nil {
		return a, dev, nil, err
	}
	stopDebug, err := startSMCDebug(e) // smcd_debug.go
	if err != nil {
		closeDev()
		return a, dev, nil, err
	}
	// Not closeDev in the closure: that is the result being assigned,
	// and the closure would call itself.
	closeSMC := closeDev
	return a, dev, func() { stopDebug(); closeSMC() }, nil
}

// setupOption loads the SMC TCP option program unless ism.synopt=off.
func setupOption(e *Env) error {
	switch v := e.Arg("synopt", "on"); v {
	case "on":
		if smcd.EnableSYNOption(e.Logf) != nil {
			e.Result("synopt", "option")
		} else {
			e.Result("synopt", "in-band")
		}
	case "off":
		e.Result("synopt", "in-band")
	default:
		return fmt.Errorf("ism.synopt=%q: want on or off", v)
	}
	return nil
}

// listenSMC listens on addr with the scenario's server options.
func listenSMC(e *Env, a smcArgs, dev smcd.ISM, addr string) (net.Listener, error) {
	srv := &smcd.Server{DMBSize: a.dmbSize, ForceDecline: a.decline, HandshakeTimeout: a.clc, UEIDs: a.ueids, Logf: e.Logf}
	return srv.Listen(dev, "tcp", addr)
}

func smcdServer(e *Env) error {
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
	return serveConns(e, ln, a)
}

func smcdClient(e *Env) error {
	a, dev, closeDev, err := setupSMC(e, "send")
	if err != nil {
		return err
	}
	defer closeDev()
	d := &smcd.Dialer{DMBSize: a.dmbSize, ForceDecline: a.decline, HandshakeTimeout: a.clc, UEIDs: a.ueids}
	return runClients(e, dev, d, e.Arg("connect", "169.254.7.1:7000"), a)
}

// smcdLocal runs both ends in this guest on one device.
func smcdLocal(e *Env) error {
	a, dev, closeDev, err := setupSMC(e, "send")
	if err != nil {
		return err
	}
	defer closeDev()
	ln, err := listenSMC(e, a, dev, "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	sa := a
	if a.mode == "send" {
		sa.mode = "sink"
	}
	serr := make(chan error, 1)
	go func() { serr <- serveConns(e, ln, sa) }()
	cerr := runClients(e, dev, &smcd.Dialer{DMBSize: a.dmbSize, HandshakeTimeout: a.clc}, ln.Addr().String(), a)
	return errors.Join(cerr, <-serr)
}

// serveConns accepts a.conns connections and serves each in a.mode.
func serveConns(e *Env, ln net.Listener, a smcArgs) error {
	var wg sync.WaitGroup
	errs := make([]error, a.conns)
	start := time.Now()
	for i := range a.conns {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept %d: %w", i, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			switch a.mode {
			case "echo":
				_, errs[i] = io.Copy(c, c)
			case "sink", "sink-vanish", "sink-hold":
				errs[i] = sink(e, c, a.mode, start)
			case "sink-gone":
				errs[i] = sinkGone(e, c, a.bytes/a.conns)
			default:
				errs[i] = fmt.Errorf("unknown server mode %q", a.mode)
			}
		}()
	}
	wg.Wait()
	e.Result("server_seconds", fmt.Sprintf("%.3f", time.Since(start).Seconds()))
	return errors.Join(errs...)
}

// sink hashes one connection's stream and answers with the digest.
func sink(e *Env, c net.Conn, mode string, start time.Time) error {
	expectError := mode == "sink-vanish"
	var idx [4]byte
	if _, err := io.ReadFull(c, idx[:]); err != nil {
		return fmt.Errorf("reading connection index: %w", err)
	}
	i := binary.BigEndian.Uint32(idx[:])
	e.Result(fmt.Sprintf("smc_%d", i), smcd.IsSMC(c))
	reportMode(e, c, int(i))
	var h io.Writer = sha256.New()
	if mode == "sink-hold" {
		h = &holdReporter{e: e, i: int(i)}
	}
	n, err := io.Copy(h, c)
	if mode == "sink-hold" {
		return fmt.Errorf("connection %d ended after %d bytes in sink-hold (the test kills this VM): %v", i, n, err)
	}
	e.Result(fmt.Sprintf("bytes_%d", i), n)
	if expectError {
		if err == nil {
			return fmt.Errorf("connection %d: clean EOF after %d bytes, want an error from a vanished peer", i, n)
		}
		e.Result(fmt.Sprintf("vanish_error_%d", i), err.Error())
		e.Result(fmt.Sprintf("vanish_seconds_%d", i), fmt.Sprintf("%.3f", time.Since(start).Seconds()))
		return nil
	}
	if err != nil {
		return fmt.Errorf("connection %d after %d bytes: %w", i, n, err)
	}
	sum := h.(hash.Hash).Sum(nil)
	e.Result(fmt.Sprintf("sha_%d", i), hex.EncodeToString(sum))
	if _, err := c.Write(sum); err != nil {
		return fmt.Errorf("connection %d: writing digest: %w", i, err)
	}
	return nil
}

// holdReporter discards what it is given and reports holding_<i>=1 once it
// has had 1 MiB.
type holdReporter struct {
	e        *Env
	i        int
	n        int
	reported bool
}

func (h *holdReporter) Write(p []byte) (int, error) {
	h.n += len(p)
	if !h.reported && h.n >= 1<<20 {
		h.reported = true
		h.e.Result(fmt.Sprintf("holding_%d", h.i), 1)
	}
	return len(p), nil
}

// runClients opens a.conns connections to addr and runs a.mode on each.
func runClients(e *Env, dev smcd.ISM, d *smcd.Dialer, addr string, a smcArgs) error {
	var wg sync.WaitGroup
	errs := make([]error, a.conns)
	per := a.bytes / a.conns
	start := time.Now()
	for i := range a.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dialPeer(e.Ctx, dev, d, addr)
			if err != nil {
				errs[i] = fmt.Errorf("dial %d: %w", i, err)
				return
			}
			defer c.Close()
			e.Result(fmt.Sprintf("client_smc_%d", i), smcd.IsSMC(c))
			reportMode(e, c, i)
			switch a.mode {
			case "send", "stream", "send-hold":
				errs[i] = send(e, c, i, per, a)
			case "stream-error":
				if err := send(e, c, i, per, a); err != nil {
					e.Result(fmt.Sprintf("stream_error_%d", i), err.Error())
				} else {
					errs[i] = fmt.Errorf("connection %d: stream ended without an error", i)
				}
			case "echo":
				errs[i] = echo(e, c, i, a)
			default:
				errs[i] = fmt.Errorf("unknown client mode %q", a.mode)
			}
		}()
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	e.Result("client_seconds", fmt.Sprintf("%.3f", secs))
	if a.mode == "send" && secs > 0 {
		e.Result("client_mbytes_per_s", fmt.Sprintf("%.2f", float64(per*a.conns)/secs/1e6))
	}
	return errors.Join(errs...)
}

// dialPeer dials addr, retrying while the peer guest is still booting
// (its address not answering ARP yet, or nothing listening yet), for as
// long as ctx (the watchdog) allows: the peer may boot minutes later on a
// loaded host, and a fixed bound here failed the client alone. No bound
// per attempt either: a cut-off handshake would leave the server half a
// connection, and TCP resends a lost SYN by itself.
func dialPeer(ctx context.Context, dev smcd.ISM, d *smcd.Dialer, addr string) (net.Conn, error) {
	for {
		c, err := d.DialContext(ctx, dev, "tcp", addr)
		booting := errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH)
		if err == nil || !booting || ctx.Err() != nil {
			return c, err
		}
		select {
		case <-time.After(250 * time.Millisecond):
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (peer still not up: %w)", ctx.Err(), err)
		}
	}
}

// send writes connection i's seeded stream (forever in stream mode), then
// checks the digest the server echoes.
func send(e *Env, c net.Conn, i, n int, a smcArgs) error {
	var idx [4]byte
	binary.BigEndian.PutUint32(idx[:], uint32(i))
	if _, err := c.Write(idx[:]); err != nil {
		return err
	}
	x := xfer{seed: a.seed + uint64(i)<<40}
	h := sha256.New()
	buf := make([]byte, 64<<10)
	endless := a.mode == "stream" || a.mode == "stream-error"
	for off := 0; endless || off < n; {
		m := len(buf)
		if !endless {
			m = min(m, n-off)
		}
		x.fill(buf[:m], off)
		h.Write(buf[:m])
		if _, err := c.Write(buf[:m]); err != nil {
			return fmt.Errorf("connection %d after %d bytes: %w", i, off, err)
		}
		off += m
		if endless && off == 1<<20 {
			e.Result(fmt.Sprintf("streaming_%d", i), 1)
		}
	}
	sum := h.Sum(nil)
	e.Result(fmt.Sprintf("sha_%d", i), hex.EncodeToString(sum))
	hold := a.mode == "send-hold"
	if cw, ok := c.(interface{ CloseWrite() error }); ok && !hold {
		if err := cw.CloseWrite(); err != nil {
			return fmt.Errorf("connection %d: half-close: %w", i, err)
		}
	}
	got := make([]byte, sha256.Size)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("connection %d: reading digest: %w", i, err)
	}
	if !bytes.Equal(got, sum) {
		return fmt.Errorf("connection %d: server read sha256 %x, sent %x", i, got, sum)
	}
	if hold {
		e.Result(fmt.Sprintf("sent_%d", i), 1)
		// The test kills this VM while the connection is open.
		k, err := c.Read(got[:1])
		return fmt.Errorf("connection %d: held connection ended (%d bytes, %v) before the VM was killed", i, k, err)
	}
	return nil
}

// sinkGone is the server of send-hold: it reads exactly n bytes after the
// index, answers their digest and then waits on the open connection until
// it fails, which must be because the client's device went away.
func sinkGone(e *Env, c net.Conn, n int) error {
	var idx [4]byte
	if _, err := io.ReadFull(c, idx[:]); err != nil {
		return fmt.Errorf("reading connection index: %w", err)
	}
	i := binary.BigEndian.Uint32(idx[:])
	e.Result(fmt.Sprintf("smc_%d", i), smcd.IsSMC(c))
	reportMode(e, c, int(i))
	h := sha256.New()
	if k, err := io.CopyN(h, c, int64(n)); err != nil {
		return fmt.Errorf("connection %d after %d of %d bytes: %w", i, k, n, err)
	}
	sum := h.Sum(nil)
	e.Result(fmt.Sprintf("bytes_%d", i), n)
	e.Result(fmt.Sprintf("sha_%d", i), hex.EncodeToString(sum))
	if _, err := c.Write(sum); err != nil {
		return fmt.Errorf("connection %d: writing digest: %w", i, err)
	}
	e.Result(fmt.Sprintf("waiting_gone_%d", i), 1)
	var b [1]byte
	k, err := c.Read(b[:])
	switch {
	case err == nil:
		return fmt.Errorf("connection %d: %d bytes after the stream", i, k)
	case errors.Is(err, io.EOF):
		return fmt.Errorf("connection %d: clean EOF, want the client's device gone", i)
	}
	e.Result(fmt.Sprintf("peer_gone_%d", i), err.Error())
	return nil
}

// echo runs a.pairs request/response exchanges and checks each reply.
func echo(e *Env, c net.Conn, i int, a smcArgs) error {
	x := xfer{seed: a.seed + uint64(i)<<40}
	req := make([]byte, a.msg)
	resp := make([]byte, a.msg)
	start := time.Now()
	for p := range a.pairs {
		x.fill(req, p*a.msg)
		if _, err := c.Write(req); err != nil {
			return fmt.Errorf("connection %d pair %d: %w", i, p, err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return fmt.Errorf("connection %d pair %d: %w", i, p, err)
		}
		if !bytes.Equal(req, resp) {
			return fmt.Errorf("connection %d pair %d: reply differs", i, p)
		}
	}
	rtt := time.Since(start) / time.Duration(a.pairs)
	e.Result(fmt.Sprintf("echo_pairs_%d", i), a.pairs)
	e.Result(fmt.Sprintf("echo_rtt_us_%d", i), rtt.Microseconds())
	return nil
}
