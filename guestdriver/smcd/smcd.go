// Package smcd is a userspace SMC-D stack: it negotiates with CLC over a TCP
// connection (Proposal, Accept, Confirm, or Decline), then moves data through
// ISM DMBs with CDC cursors, and offers the result as a net.Conn.
//
// Negotiation that fails before either end is committed to SMC-D (a
// Decline either way, a peer that answers with something other than CLC, a
// DMB the device cannot register) falls back to plain TCP on the same
// connection: the application gets a working net.Conn either way, and IsSMC
// and FallbackConn.Reason say which and why. Not every failure is a
// fallback: once the server has sent its Accept only the client's Decline
// lets both ends fall back, and anything else (a timeout, garbage, an
// unusable Confirm) fails the connection, as Linux's smc_listen_decline
// does; a TCP connection that fails is an error too.
//
// With the SMC TCP option program (EnableSYNOption, or Dialer/Server
// SYNOption) the TCP handshake decides as with Linux's SMC: CLC runs only
// when both the SYN and the SYN-ACK carried the option, and any other peer
// gets plain TCP with not one CLC byte sent. Without it negotiation is in
// band, and both ends must use this stack (option.go says what a plain TCP
// peer then sees).
package smcd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/guestdriver/smcd/synopt"
)

// Defaults.
const (
	DefaultDMBSize          = 64 << 10
	DefaultHandshakeTimeout = 6 * time.Second // Linux CLC_WAIT_TIME
	MinDMBSize              = 16 << 10
	MaxDMBSize              = 1 << 20
)

// Dialer holds options for Dial.
type Dialer struct {
	// DMBSize is the size of our receive DMB: a power of two in
	// 16 KiB..1 MiB. 0 means DefaultDMBSize.
	DMBSize int
	// HandshakeTimeout bounds the wait for each CLC message. 0 means
	// DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// ForceDecline, if non-zero, makes the client decline the server's
	// Accept with this diagnosis code (for tests).
	ForceDecline uint32
	// Net dials the TCP connection.
	Net net.Dialer
	// SYNOption decides from the TCP handshake (package synopt); nil
	// means the default set by EnableSYNOption, and without one
	// negotiation is in band.
	SYNOption *synopt.Program
	// UEIDs are the user EIDs (ParseUEID; at most 8) this end offers for
	// SMC-Dv2. With any, the Proposal offers v2 as well as v1, as Linux's
	// does; without, v1 only. Linux on x86 has no system EID, so SMC-Dv2
	// with a kernel peer needs a UEID both ends have.
	UEIDs []string

	// v2Only proposes SMC-Dv2 only, as Linux on x86 does (tests).
	v2Only bool
}

// Server holds options for Listen.
type Server struct {
	DMBSize          int
	HandshakeTimeout time.Duration
	// ForceDecline, if non-zero, makes the server decline every Proposal
	// with this diagnosis code (for tests).
	ForceDecline uint32
	// Logf, if set, receives one line per fallback to TCP, and one per
	// handshake that failed after the Accept.
	Logf func(format string, args ...any)
	// SYNOption decides from the TCP handshake (package synopt) on the
	// listeners Listen creates; nil means the default set by
	// EnableSYNOption, and without one negotiation is in band.
	SYNOption *synopt.Program
	// UEIDs are the user EIDs (ParseUEID; at most 8) this end shares for
	// SMC-Dv2: a v2 Proposal is answered in v2 when it offers one of them
	// and a GID on our device's CHID that our device reaches. Without,
	// v2 offers get v1 if they offer it too.
	UEIDs []string
}

// Dial connects to addr ("tcp", "tcp4", "tcp6") and negotiates SMC-D over
// dev. It returns a *Conn, or the TCP connection if SMC-D was declined.
func Dial(ctx context.Context, dev ISM, network, addr string) (net.Conn, error) {
	var d Dialer
	return d.DialContext(ctx, dev, network, addr)
}

// Listen listens on addr and negotiates SMC-D over dev with each client.
func Listen(dev ISM, network, addr string) (net.Listener, error) {
	var s Server
	return s.Listen(dev, network, addr)
}

func dmbSize(n int) (int, uint8, error) {
	if n == 0 {
		n = DefaultDMBSize
	}
	code, err := DMBESizeCode(n)
	return n, code, err
}

func timeoutOr(t time.Duration) time.Duration {
	if t <= 0 {
		return DefaultHandshakeTimeout
	}
	return t
}

// DeclineError reports why SMC-D was not used: the code we sent, or the one
// the peer sent (Remote).
type DeclineError struct {
	Code   uint32
	Remote bool
	Err    error
}

func (e *DeclineError) Error() string {
	who := "local"
	if e.Remote {
		who = "peer"
	}
	if e.Err != nil {
		return fmt.Sprintf("smcd: %s decline %#08x: %v", who, e.Code, e.Err)
	}
	return fmt.Sprintf("smcd: %s decline %#08x", who, e.Code)
}

func (e *DeclineError) Unwrap() error { return e.Err }

// FallbackConn is the net.Conn returned when SMC-D was declined: the TCP
// connection, with any bytes read during negotiation replayed first.
type FallbackConn struct {
	net.Conn
	// Reason says why SMC-D was not used.
	Reason *DeclineError
	// SYNOption is the option program's record of the TCP handshake; nil
	// when negotiation was in band.
	SYNOption *synopt.Record
	replay    []byte
}

// NetConn returns the TCP connection, as tls.Conn.NetConn does. Bytes read
// during an in-band negotiation and not yet returned by Read (a plain client
// that spoke first) are not in it.
func (f *FallbackConn) NetConn() net.Conn { return f.Conn }

// Close closes the TCP connection.
func (f *FallbackConn) Close() error {
	untrack(f)
	return f.Conn.Close()
}

func (f *FallbackConn) Read(p []byte) (int, error) {
	if len(f.replay) > 0 {
		n := copy(p, f.replay)
		f.replay = f.replay[n:]
		return n, nil
	}
	return f.Conn.Read(p)
}

// CloseWrite half-closes the TCP connection.
func (f *FallbackConn) CloseWrite() error {
	if cw, ok := f.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("smcd: CloseWrite not supported")
}

// IsSMC reports whether c is an SMC-D connection (not a TCP fallback).
func IsSMC(c net.Conn) bool { _, ok := c.(*Conn); return ok }

// sendDecline writes a Decline of version 1 or 2 (with Linux's OS type, as
// smc_clc_send_decline does); errors are ignored since we fall back (or
// fail) anyway. The write gets its own deadline: the handshake deadline may
// be what just expired.
func sendDecline(tcp net.Conn, code uint32, timeout time.Duration, version uint8) {
	d := Decline{Version: 1, Diagnosis: code}
	if version >= 2 {
		d.Version, d.OSType = 2, OSTypeLinux
	}
	b, _ := d.Encode()
	tcp.SetWriteDeadline(time.Now().Add(timeout))
	tcp.Write(b)
}

// declineCode maps a device error to the Decline Linux would send.
func declineCode(err error) uint32 {
	var st abi.Status
	if errors.As(err, &st) && st == abi.StatusNoSpace {
		return DeclineMaxDMB
	}
	return DeclineMem
}

func clcReadCode(err error) uint32 {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return DeclineTimeout
	}
	return DeclineCnfErr
}

// fallback clears the handshake deadline and hands back the TCP connection.
func fallback(tcp net.Conn, reason *DeclineError, replay []byte, rec *synopt.Record) (net.Conn, error) {
	if err := tcp.SetDeadline(time.Time{}); err != nil {
		tcp.Close()
		return nil, err
	}
	fc := &FallbackConn{Conn: tcp, Reason: reason, replay: replay, SYNOption: rec}
	track(fc)
	return fc, nil
}

// connBuffers allocates the CDC buffer and a staging buffer of stageLen bytes.
func connBuffers(dev ISM, stageLen int) (Buffer, Buffer, error) {
	cdc, err := dev.AllocBuffer(CDCLen)
	if err != nil {
		return nil, nil, err
	}
	stage, err := dev.AllocBuffer(stageLen)
	if err != nil {
		cdc.Free()
		return nil, nil, err
	}
	return cdc, stage, nil
}

// DialContext is Dial with options.
func (d *Dialer) DialContext(ctx context.Context, dev ISM, network, addr string) (net.Conn, error) {
	size, code, err := dmbSize(d.DMBSize)
	if err != nil {
		return nil, err
	}
	ueids, err := parseUEIDs(d.UEIDs)
	if err != nil {
		return nil, err
	}
	nd := d.Net
	opt := optionOr(d.SYNOption)
	var m *marker
	if opt != nil {
		m = &marker{p: opt}
		nd = m.markDialer(nd)
	}
	tcp, err := nd.DialContext(ctx, network, addr)
	if m != nil {
		m.done()
	}
	if err != nil {
		return nil, err
	}
	var rec *synopt.Record
	if opt != nil {
		var why *DeclineError
		rec, why, err = optionDecision(opt, tcp, true)
		if err != nil {
			tcp.Close()
			return nil, &net.OpError{Op: "dial", Net: "smcd", Source: tcp.LocalAddr(), Addr: tcp.RemoteAddr(), Err: err}
		}
		if why != nil {
			return fallback(tcp, why, nil, rec)
		}
	}
	c, err := d.handshake(ctx, dev, tcp, size, code, rec, ueids)
	if err != nil {
		tcp.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, &net.OpError{Op: "dial", Net: "smcd", Source: tcp.LocalAddr(), Addr: tcp.RemoteAddr(), Err: err}
	}
	return c, nil
}

func (d *Dialer) handshake(ctx context.Context, dev ISM, tcp net.Conn, size int, code uint8, rec *synopt.Record, ueids []EID) (net.Conn, error) {
	tcp.SetDeadline(time.Now().Add(timeoutOr(d.HandshakeTimeout)))
	stop := context.AfterFunc(ctx, func() { tcp.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	prop := proposalFor(dev, tcp.LocalAddr(), ueids, d.v2Only)
	declVer := max(prop.Version, 1) // Linux declines in the version it proposed
	pb, err := prop.Encode()
	if err != nil {
		return nil, err
	}
	if _, err := tcp.Write(pb); err != nil {
		return nil, err
	}
	decline := func(code uint32, err error) (net.Conn, error) {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		sendDecline(tcp, code, timeoutOr(d.HandshakeTimeout), declVer)
		return fallback(tcp, &DeclineError{Code: code, Err: err}, nil, rec)
	}
	typ, msg, err := ReadCLC(tcp)
	switch {
	case err != nil && (errors.Is(err, ErrCLC) || errors.Is(err, os.ErrDeadlineExceeded)):
		return decline(clcReadCode(err), err)
	case err != nil:
		return nil, err // the TCP connection itself failed: nothing to fall back to
	case typ == CLCDecline:
		dl, err := DecodeDecline(msg)
		if err != nil {
			return fallback(tcp, &DeclineError{Remote: true, Err: err}, nil, rec)
		}
		return fallback(tcp, &DeclineError{Code: dl.Diagnosis, Remote: true}, nil, rec)
	case typ != CLCAccept:
		return decline(DeclineCnfErr, clcErr("type %d instead of accept", typ))
	}
	acc, err := DecodeAcceptConfirm(msg, CLCAccept)
	if err != nil {
		return decline(DeclineCnfErr, err)
	}
	declVer = min(acc.Version, 2)
	var v2 *v2Choice
	if acc.Version == 1 && !smcdIndicated(prop.TypeV1) {
		return decline(DeclineModeUnsupp, errors.New("v1 accept to a v2-only proposal")) // smc_connect_check_aclc
	}
	if acc.Version >= 2 {
		var bad *DeclineError
		if v2, bad = checkAcceptV2(dev, &prop, acc, ueids); bad != nil {
			return decline(bad.Code, bad.Err)
		}
	}
	peerSize, err := DMBESize(acc.DMBESize)
	if err != nil || acc.GID == 0 || acc.Token == 0 || uint32(acc.DMBEIndex) >= abi.MaxDMBEs {
		return decline(DeclineCnfErr, fmt.Errorf("unusable accept %+v", acc))
	}
	if d.ForceDecline != 0 {
		return decline(d.ForceDecline, errors.New("forced"))
	}
	if err := dev.QueryRGID(acc.GID); err != nil {
		return decline(DeclineNoSMCDDev, err)
	}
	dmb, err := dev.RegisterDMB(size, acc.GID)
	if err != nil {
		return decline(declineCode(err), err)
	}
	clear(dmb.Bytes()[:CDCLen])
	cdcBuf, stage, err := connBuffers(dev, stageSize(peerSize-CDCLen))
	if err != nil {
		dev.UnregisterDMB(dmb)
		return decline(declineCode(err), err)
	}
	conf := AcceptConfirm{Type: CLCConfirm, FirstContact: true, GID: dev.GID(), Token: dmb.Token(),
		DMBESize: code, LinkID: uint32(random64())}
	if v2 != nil {
		v2.fillConfirm(dev, &conf, acc)
	}
	cb, err := conf.Encode()
	if err != nil {
		dev.UnregisterDMB(dmb)
		cdcBuf.Free()
		stage.Free()
		return decline(DeclineIntErr, err)
	}
	_, err = tcp.Write(cb)
	if err == nil {
		err = tcp.SetDeadline(time.Time{})
	}
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		dev.UnregisterDMB(dmb)
		cdcBuf.Free()
		stage.Free()
		return nil, err
	}
	c := newConn(dev, tcp, dmb, acc.GID, acc.Token, uint32(acc.DMBEIndex), peerSize, cdcBuf, stage)
	c.synOpt = rec
	c.setCLC(v2)
	return c, nil
}

// setPrefix fills the Proposal's IP prefix area from the interface that owns
// the local address, as Linux's smc_clc_prfx_set does.
func setPrefix(p *Proposal, local net.Addr) {
	ip, ipnet := localPrefix(local)
	if ip4 := ip.To4(); ip4 != nil {
		ones, _ := ipnet.Mask.Size()
		if ipnet.Mask == nil || len(ipnet.Mask) != net.IPv4len {
			ones = 32
		}
		copy(p.Subnet[:], ip4.Mask(net.CIDRMask(ones, 32)))
		p.PrefixLen = uint8(ones)
		return
	}
	ones, _ := ipnet.Mask.Size()
	if ipnet.Mask == nil {
		ones = 128
	}
	var x IPv6Prefix
	copy(x.Prefix[:], ip.Mask(net.CIDRMask(ones, 128)))
	x.Len = uint8(ones)
	p.IPv6Prefixes = []IPv6Prefix{x}
}

// localPrefix finds the interface network of a local TCP address; without
// one, the address alone (/32 or /128).
func localPrefix(a net.Addr) (net.IP, net.IPNet) {
	ta, _ := a.(*net.TCPAddr)
	if ta == nil {
		return net.IPv4zero, net.IPNet{}
	}
	ip := ta.IP
	if ip4 := ip.To4(); ip4 != nil {
		ip = ip4
	}
	addrs, _ := net.InterfaceAddrs()
	for _, x := range addrs {
		if n, ok := x.(*net.IPNet); ok && n.IP.Equal(ip) {
			mask := n.Mask
			if ip.To4() != nil && len(mask) == net.IPv6len {
				mask = mask[12:]
			}
			return ip, net.IPNet{IP: n.IP, Mask: mask}
		}
	}
	return ip, net.IPNet{}
}

// prefixMatch is smc_clc_prfx_match: the client's prefix is the server's
// own interface prefix.
func prefixMatch(p *Proposal, local net.Addr) bool {
	var mine Proposal
	setPrefix(&mine, local)
	if len(p.IPv6Prefixes) == 0 && len(mine.IPv6Prefixes) == 0 {
		return p.PrefixLen == mine.PrefixLen && p.Subnet == mine.Subnet
	}
	for _, x := range p.IPv6Prefixes {
		for _, y := range mine.IPv6Prefixes {
			if x == y {
				return true
			}
		}
	}
	return false
}

// Listen listens on a TCP address and negotiates SMC-D with each client.
func (s *Server) Listen(dev ISM, network, addr string) (net.Listener, error) {
	if _, _, err := dmbSize(s.DMBSize); err != nil {
		return nil, err
	}
	ueids, err := parseUEIDs(s.UEIDs)
	if err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	opt := optionOr(s.SYNOption)
	var m *marker
	if opt != nil {
		m = &marker{p: opt, listener: true}
		lc.Control = func(_, _ string, rc syscall.RawConn) error { return m.control(rc) }
	}
	tl, err := lc.Listen(context.Background(), network, addr)
	if m != nil {
		m.done()
	}
	if err != nil {
		return nil, err
	}
	return s.newListener(dev, tl, opt, ueids), nil
}

// NewListener negotiates SMC-D over dev on connections accepted from tl.
// Each handshake runs in its own goroutine, so a slow client does not hold
// up others. Negotiation is in band whatever SYNOption says: the option
// program only acts on listeners marked before listen(), as Listen does.
//
// Invalid UEIDs are logged and not used (v1 only).
func (s *Server) NewListener(dev ISM, tl net.Listener) net.Listener {
	ueids, err := parseUEIDs(s.UEIDs)
	if err != nil {
		s.logf("%v: SMC-Dv2 off", err)
	}
	return s.newListener(dev, tl, nil, ueids)
}

func (s *Server) newListener(dev ISM, tl net.Listener, opt *synopt.Program, ueids []EID) net.Listener {
	ctx, cancel := context.WithCancel(context.Background())
	l := &listener{srv: s, dev: dev, tl: tl, opt: opt, ueids: ueids, conns: make(chan net.Conn), ctx: ctx, cancel: cancel, acceptErr: make(chan struct{})}
	go l.acceptLoop()
	return l
}

type listener struct {
	srv    *Server
	dev    ISM
	tl     net.Listener
	opt    *synopt.Program // nil: in band
	ueids  []EID
	conns  chan net.Conn
	ctx    context.Context
	cancel context.CancelFunc

	acceptErr chan struct{} // closed when tl.Accept failed; err holds why
	err       error
	closeOnce sync.Once
}

func (l *listener) acceptLoop() {
	for {
		tcp, err := l.tl.Accept()
		if err != nil {
			l.err = err
			close(l.acceptErr)
			return
		}
		go func() {
			c, err := l.srv.handshake(l.ctx, l.dev, tcp, l.opt, l.ueids)
			if err != nil {
				tcp.Close()
				return
			}
			select {
			case l.conns <- c:
			case <-l.ctx.Done():
				c.Close()
			}
		}()
	}
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.ctx.Done():
		return nil, &net.OpError{Op: "accept", Net: "smcd", Addr: l.tl.Addr(), Err: net.ErrClosed}
	case <-l.acceptErr:
		return nil, l.err
	}
}

func (l *listener) Close() error {
	err := net.ErrClosed
	l.closeOnce.Do(func() {
		l.cancel()
		err = l.tl.Close()
	})
	return err
}

func (l *listener) Addr() net.Addr { return l.tl.Addr() }

func (s *Server) logf(format string, args ...any) {
	if s.Logf != nil {
		s.Logf(format, args...)
	}
}

func (s *Server) handshake(ctx context.Context, dev ISM, tcp net.Conn, opt *synopt.Program, ueids []EID) (net.Conn, error) {
	size, code, err := dmbSize(s.DMBSize)
	if err != nil {
		return nil, err
	}
	var rec *synopt.Record
	if opt != nil {
		var why *DeclineError
		rec, why, err = optionDecision(opt, tcp, false)
		if err != nil {
			return nil, err
		}
		if why != nil {
			s.logf("smcd: %v: plain TCP: %v", tcp.RemoteAddr(), why.Err)
			return fallback(tcp, why, nil, rec)
		}
	}
	tcp.SetDeadline(time.Now().Add(timeoutOr(s.HandshakeTimeout)))
	stop := context.AfterFunc(ctx, func() { tcp.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	declVer := uint8(1) // the Proposal's version once we have one (smc_listen_decline)
	decline := func(code uint32, err error) (net.Conn, error) {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		s.logf("smcd: %v: declining with %#08x: %v", tcp.RemoteAddr(), code, err)
		sendDecline(tcp, code, timeoutOr(s.HandshakeTimeout), declVer)
		return fallback(tcp, &DeclineError{Code: code, Err: err}, nil, rec)
	}
	typ, msg, err := ReadCLC(tcp)
	switch {
	case err != nil && len(msg) > 0 && !validEyecatcher(append(msg, 0, 0, 0, 0)):
		// Not a CLC message at all: a plain TCP client that spoke first.
		// Give its bytes back to the application and say nothing.
		s.logf("smcd: %v: client is not SMC, plain TCP", tcp.RemoteAddr())
		return fallback(tcp, &DeclineError{Code: DeclinePeerNoSMC, Remote: true, Err: err}, bytes.Clone(msg), rec)
	case err != nil && (errors.Is(err, ErrCLC) || errors.Is(err, os.ErrDeadlineExceeded)):
		return decline(clcReadCode(err), err)
	case err != nil:
		return nil, err
	case typ == CLCDecline:
		// A client with no usable device declines at once instead of
		// proposing (Linux's smc_connect_decline_fallback). As Linux's
		// smc_clc_wait_msg, that is the peer's decline: fall back and
		// send nothing back.
		dl, err := DecodeDecline(msg)
		if err != nil {
			return fallback(tcp, &DeclineError{Remote: true, Err: err}, nil, rec)
		}
		s.logf("smcd: %v: client declined before proposing, with %#08x", tcp.RemoteAddr(), dl.Diagnosis)
		return fallback(tcp, &DeclineError{Code: dl.Diagnosis, Remote: true}, nil, rec)
	case typ != CLCProposal:
		return decline(DeclineCnfErr, clcErr("type %d instead of proposal", typ))
	}
	prop, err := DecodeProposal(msg)
	if err == nil && prop.Version >= 2 {
		declVer = 2
	}
	offersV1 := err == nil && prop.SMCDArea && smcdIndicated(prop.TypeV1) && prop.GID != 0
	offersV2 := err == nil && prop.V2 != nil && smcdIndicated(prop.TypeV2)
	switch {
	case err != nil:
		return decline(DeclineCnfErr, err)
	case !offersV1 && !offersV2:
		return decline(DeclineModeUnsupp, errors.New("client offers no SMC-D"))
	case s.ForceDecline != 0:
		return decline(s.ForceDecline, errors.New("forced"))
	}
	// SMC-Dv2 first, as Linux's smc_listen_find_device tries it before
	// v1; a code from the v2 attempt wins over a later v1 one
	// (smc_init_info_store_rc keeps the first).
	var v2 *v2Choice
	var v2Code uint32
	var v2Err error
	if offersV2 {
		v2, v2Code, v2Err = chooseV2(dev, prop, ueids)
		if v2Code == DeclineNoUEID && offersV1 {
			v2Code = 0 // smc_listen_v2_check drops it when v1 is left
		}
	}
	firstCode := func(code uint32, err error) (net.Conn, error) {
		if v2Code != 0 {
			return decline(v2Code, fmt.Errorf("%w (v1: %v)", v2Err, err))
		}
		return decline(code, err)
	}
	switch {
	case v2 != nil:
	case !offersV1 && v2Code != 0:
		return decline(v2Code, v2Err)
	case !offersV1:
		return decline(DeclineNoSMCDDev, fmt.Errorf("no SMC-Dv2 in common: %v", v2Err))
	case prop.CHID != dev.CHID():
		return firstCode(DeclineNoSMCDDev, fmt.Errorf("client CHID %#04x, ours %#04x", prop.CHID, dev.CHID()))
	}
	peerGID := prop.GID
	if v2 != nil {
		peerGID = v2.peerGID
	} else {
		if err := dev.QueryRGID(prop.GID); err != nil {
			return firstCode(DeclineNoSMCDDev, fmt.Errorf("client GID %#x: %w", prop.GID, err))
		}
		if !prefixMatch(prop, tcp.LocalAddr()) {
			return firstCode(DeclineDiffPrefix, fmt.Errorf("client prefix %v/%d", net.IP(prop.Subnet[:]), prop.PrefixLen))
		}
	}
	// Everything the connection needs on our side exists before the Accept
	// goes out, as Linux's smc_listen_work runs smc_buf_create before
	// smc_clc_send_accept: a client that has our Accept may Confirm and be
	// using SMC-D at once, so nothing may fail here after it.
	dmb, err := dev.RegisterDMB(size, peerGID)
	if err != nil {
		return decline(declineCode(err), err)
	}
	clear(dmb.Bytes()[:CDCLen])
	// The peer's ring size comes only with its Confirm, so the staging
	// buffer follows our own ring, as Linux sizes the sndbuf locally;
	// Write copies through a staging buffer of any size.
	cdcBuf, stage, err := connBuffers(dev, stageSize(size-CDCLen))
	if err != nil {
		dev.UnregisterDMB(dmb)
		return decline(declineCode(err), err)
	}
	release := func() {
		dev.UnregisterDMB(dmb)
		cdcBuf.Free()
		stage.Free()
	}
	acc := AcceptConfirm{Type: CLCAccept, FirstContact: true, GID: dev.GID(), Token: dmb.Token(),
		DMBESize: code, LinkID: uint32(random64())}
	if v2 != nil {
		v2.fillAccept(dev, &acc)
	}
	ab, err := acc.Encode()
	if err != nil {
		release()
		return decline(DeclineIntErr, err)
	}
	if _, err := tcp.Write(ab); err != nil {
		release()
		return nil, err
	}
	// From here the client may already be using SMC-D: only its Decline
	// lets both ends fall back. Anything else (a timeout, garbage, another
	// message, an unusable Confirm) fails the connection with no Decline,
	// as Linux's smc_listen_decline does for a negative reason code. A
	// Decline would reach a confirmed client as stray TCP bytes while our
	// application waited on a fallback that never gets data; closing TCP
	// instead tells that client its peer vanished, and a client that
	// declined sees its connection end.
	fail := func(err error) (net.Conn, error) {
		release()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		s.logf("smcd: %v: handshake failed after accept: %v", tcp.RemoteAddr(), err)
		return nil, err
	}
	typ, msg, err = ReadCLC(tcp)
	switch {
	case err != nil:
		return fail(err)
	case typ == CLCDecline:
		release()
		dl, err := DecodeDecline(msg)
		if err != nil {
			return fallback(tcp, &DeclineError{Remote: true, Err: err}, nil, rec)
		}
		s.logf("smcd: %v: client declined with %#08x", tcp.RemoteAddr(), dl.Diagnosis)
		return fallback(tcp, &DeclineError{Code: dl.Diagnosis, Remote: true}, nil, rec)
	case typ != CLCConfirm:
		return fail(clcErr("type %d instead of confirm", typ))
	}
	conf, err := DecodeAcceptConfirm(msg, CLCConfirm)
	if err != nil {
		return fail(err)
	}
	peerSize, err := DMBESize(conf.DMBESize)
	if err != nil || conf.GID != peerGID || conf.Token == 0 || uint32(conf.DMBEIndex) >= abi.MaxDMBEs {
		return fail(clcErr("unusable confirm %+v", conf))
	}
	if err := v2.checkConfirm(dev, conf); err != nil {
		return fail(err)
	}
	if err := tcp.SetDeadline(time.Time{}); err != nil {
		return fail(err)
	}
	c := newConn(dev, tcp, dmb, conf.GID, conf.Token, uint32(conf.DMBEIndex), peerSize, cdcBuf, stage)
	c.synOpt = rec
	c.setCLC(v2)
	return c, nil
}

var _ io.ReadWriteCloser = (*Conn)(nil)
