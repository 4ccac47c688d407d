package smcd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/abi"
)

// fallbackPair dials through e and returns both ends, which must have fallen
// back to TCP, after checking that data still flows both ways intact.
func fallbackPair(t *testing.T, e env) (cli, srv *FallbackConn) {
	t.Helper()
	c, s := e.pair(t)
	cf, ok1 := c.(*FallbackConn)
	sf, ok2 := s.(*FallbackConn)
	if !ok1 || !ok2 {
		t.Fatalf("expected TCP fallback, got %T and %T", c, s)
	}
	copyBothWays(t, c, s, 1<<20+3)
	return cf, sf
}

func loopDMBs(d ISM) int {
	l := d.(*Loopback)
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.own)
}

func TestDeclinePaths(t *testing.T) {
	cases := []struct {
		name     string
		env      func() env
		code     uint32
		byClient bool // the client sent the Decline
	}{
		{"server forced", func() env { e := twoHosts(); e.srv.ForceDecline = DeclinePeerDecline; return e }, DeclinePeerDecline, false},
		{"client forced", func() env { e := twoHosts(); e.dial.ForceDecline = DeclineSyncErr; return e }, DeclineSyncErr, true},
		{"CHID mismatch", func() env {
			return env{srvDev: NewFabric(0xFF00).NewDevice(), cliDev: NewFabric(0xFF01).NewDevice()}
		}, DeclineNoSMCDDev, false},
		{"peer GID unreachable", func() env {
			return env{srvDev: NewFabric(0xFF00).NewDevice(), cliDev: NewFabric(0xFF00).NewDevice()}
		}, DeclineNoSMCDDev, false},
		{"server DMB limit", func() env { e := twoHosts(); e.srvDev.(*Loopback).MaxDMBs = 0; return e }, DeclineMaxDMB, false},
		{"client DMB limit", func() env { e := twoHosts(); e.cliDev.(*Loopback).MaxDMBs = 0; return e }, DeclineMaxDMB, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := c.env()
			cli, srv := fallbackPair(t, e)
			local, remote := srv.Reason, cli.Reason
			if c.byClient {
				local, remote = cli.Reason, srv.Reason
			}
			if local.Remote || local.Code != c.code || !remote.Remote || remote.Code != c.code {
				t.Fatalf("reasons: sender %+v, receiver %+v; want code %#x", local, remote, c.code)
			}
			// A declined handshake leaves no DMB behind.
			if n := loopDMBs(e.srvDev) + loopDMBs(e.cliDev); n != 0 {
				t.Fatalf("%d DMBs left registered", n)
			}
		})
	}
}

// rawClient connects with plain TCP to an SMC-D listener.
func rawClient(t *testing.T, s Server) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := s.Listen(twoHosts().srvDev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, acceptAsync(t, ln)
}

// acceptAsync returns a conn that becomes the accepted one on first use.
func acceptAsync(t *testing.T, ln net.Listener) net.Conn {
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(ch)
			return
		}
		ch <- c
	}()
	return &lazyConn{ch: ch}
}

type lazyConn struct {
	net.Conn
	ch   chan net.Conn
	once sync.Once
}

func (l *lazyConn) get() net.Conn {
	l.once.Do(func() { l.Conn = <-l.ch })
	return l.Conn
}
func (l *lazyConn) Read(p []byte) (int, error)  { return l.get().Read(p) }
func (l *lazyConn) Write(p []byte) (int, error) { return l.get().Write(p) }

func readDecline(t *testing.T, c net.Conn) *Decline {
	t.Helper()
	typ, msg, err := ReadCLC(c)
	if err != nil || typ != CLCDecline {
		t.Fatalf("want a decline: type %d, %v", typ, err)
	}
	d, err := DecodeDecline(msg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func echoCheck(t *testing.T, raw, srv net.Conn) {
	t.Helper()
	msg := []byte("plain TCP after fallback")
	if _, err := raw.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(srv, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("server got %q, %v", got, err)
	}
	if _, err := srv.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(raw, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("client got %q, %v", got, err)
	}
}

func TestServerDeclinesMalformedProposal(t *testing.T) {
	raw, srv := rawClient(t, Server{})
	b, _ := sampleProposal().Encode()
	b[len(b)-1] ^= 1 // bad trailer
	raw.Write(b)
	if d := readDecline(t, raw); d.Diagnosis != DeclineCnfErr {
		t.Fatalf("diagnosis %#x", d.Diagnosis)
	}
	echoCheck(t, raw, srv)
	if r := srv.(*lazyConn).get().(*FallbackConn).Reason; r.Code != DeclineCnfErr || !errors.Is(r, ErrCLC) {
		t.Fatalf("reason %v", r)
	}
}

// TestClientDeclinesFirst: a client that declines instead of proposing
// (Linux's, when it finds no SMC device) gets no Decline back, and both
// ends are plain TCP with the peer's code as the reason.
func TestClientDeclinesFirst(t *testing.T) {
	raw, srv := rawClient(t, Server{})
	d := Decline{Version: 1, Diagnosis: DeclineNoSMCDev}
	b, _ := d.Encode()
	raw.Write(b)
	echoCheck(t, raw, srv)
	if r := srv.(*lazyConn).get().(*FallbackConn).Reason; r.Code != DeclineNoSMCDev || !r.Remote {
		t.Fatalf("reason %v", r)
	}
}

// TestServerDeclinesV2ProposalWithoutExtension: a v2 offer whose v2
// extension is missing is malformed: Decline CNFERR (v1: the header was
// not usable).
func TestServerDeclinesV2ProposalWithoutExtension(t *testing.T) {
	raw, srv := rawClient(t, Server{})
	b, _ := sampleProposal().Encode()
	b[7] = 0x20 | SMCTypeD<<2 | SMCTypeD
	raw.Write(b)
	if d := readDecline(t, raw); d.Diagnosis != DeclineCnfErr || d.Version != 1 {
		t.Fatalf("decline %+v", d)
	}
	echoCheck(t, raw, srv)
}

func TestServerDeclinesOnTimeout(t *testing.T) {
	raw, srv := rawClient(t, Server{HandshakeTimeout: 30 * time.Millisecond})
	if d := readDecline(t, raw); d.Diagnosis != DeclineTimeout {
		t.Fatalf("diagnosis %#x", d.Diagnosis)
	}
	echoCheck(t, raw, srv)
}

// TestPlainTCPClientSpeaksFirst: a client that is not SMC at all gets plain
// TCP with none of its bytes lost and no Decline injected into its stream.
func TestPlainTCPClientSpeaksFirst(t *testing.T) {
	raw, srv := rawClient(t, Server{})
	raw.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	got := make([]byte, 18)
	if _, err := io.ReadFull(srv, got); err != nil || string(got) != "GET / HTTP/1.0\r\n\r\n" {
		t.Fatalf("server got %q, %v", got, err)
	}
	srv.Write([]byte("ok"))
	reply := make([]byte, 2)
	if _, err := io.ReadFull(raw, reply); err != nil || string(reply) != "ok" {
		t.Fatalf("client got %q, %v", reply, err)
	}
}

// TestClientDeclinesOnTimeout: a server that never answers the Proposal.
func TestClientDeclinesOnTimeout(t *testing.T) {
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	got := make(chan *Decline, 1)
	go func() {
		c, err := tl.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if typ, _, err := ReadCLC(c); err != nil || typ != CLCProposal {
			close(got)
			return
		}
		_, msg, err := ReadCLC(c)
		if err != nil {
			close(got)
			return
		}
		d, _ := DecodeDecline(msg)
		got <- d
		c.Write([]byte("tcp"))
	}()
	d := Dialer{HandshakeTimeout: 30 * time.Millisecond}
	c, err := d.DialContext(context.Background(), NewLoopback(), "tcp", tl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if dl := <-got; dl == nil || dl.Diagnosis != DeclineTimeout {
		t.Fatalf("server got decline %+v", dl)
	}
	b := make([]byte, 3)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "tcp" {
		t.Fatalf("read %q, %v", b, err)
	}
}

func TestDialContextCancel(t *testing.T) {
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	go func() {
		c, err := tl.Accept()
		if err == nil {
			defer c.Close()
			io.Copy(io.Discard, c) // never answers
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	_, err = Dial(ctx, NewLoopback(), "tcp", tl.Addr().String())
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("want context.Canceled, got %v", err)
	}
}

func TestHTTPOverSMCD(t *testing.T) {
	e := twoHosts()
	ln, err := e.srv.Listen(e.srvDev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	body := seeded(7, 3<<20)
	sum := sha256.Sum256(body)
	mux := http.NewServeMux()
	mux.HandleFunc("/blob", func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		// HTTP/1 servers stop reading the body once the response starts,
		// so read it all first.
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	})
	hs := &http.Server{Handler: mux}
	go hs.Serve(ln)
	defer hs.Close()

	var smcConns, tcpConns atomic.Int32
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := Dial(ctx, e.cliDev, network, addr)
		if err == nil {
			if IsSMC(c) {
				smcConns.Add(1)
			} else {
				tcpConns.Add(1)
			}
		}
		return c, err
	}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	base := "http://" + ln.Addr().String()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < 3; j++ {
				resp, err := client.Get(base + "/blob")
				if err != nil {
					errs <- err
					return
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || sha256.Sum256(got) != sum {
					errs <- fmt.Errorf("GET %d/%d: %d bytes, %v", i, j, len(got), err)
					return
				}
				req := seeded(int64(100*i+j), 200<<10)
				resp, err = client.Post(base+"/echo", "application/octet-stream", bytes.NewReader(req))
				if err != nil {
					errs <- err
					return
				}
				got, err = io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || !bytes.Equal(got, req) {
					errs <- fmt.Errorf("POST %d/%d: %d bytes, %v", i, j, len(got), err)
					return
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if smcConns.Load() == 0 || tcpConns.Load() != 0 {
		t.Fatalf("%d SMC-D and %d TCP connections", smcConns.Load(), tcpConns.Load())
	}
}

func TestIPv6(t *testing.T) {
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skip("no IPv6 loopback:", err)
	}
	l.Close()
	e := twoHosts()
	ln, err := e.srv.Listen(e.srvDev, "tcp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	srvc := acceptAsync(t, ln)
	c, err := e.dial.DialContext(context.Background(), e.cliDev, "tcp6", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s := srvc.(*lazyConn).get()
	defer s.Close()
	mustSMC(t, c, s)
	copyBothWays(t, c, s, 1<<20)
}

// allocFailer is a device whose failAt-th AllocBuffer (1-based) fails, and
// which counts the buffers it handed out that were not freed.
type allocFailer struct {
	ISM
	failAt      int32
	calls, live atomic.Int32
}

func (d *allocFailer) AllocBuffer(size int) (Buffer, error) {
	if d.calls.Add(1) == d.failAt {
		return nil, abi.StatusInternal
	}
	b, err := d.ISM.AllocBuffer(size)
	if err != nil {
		return nil, err
	}
	d.live.Add(1)
	return &countedBuffer{Buffer: b, live: &d.live}, nil
}

type countedBuffer struct {
	Buffer
	live *atomic.Int32
	once sync.Once
}

func (b *countedBuffer) Free() {
	b.once.Do(func() { b.live.Add(-1); b.Buffer.Free() })
}

// TestServerAllocFailsBeforeAccept (issue 7): the server's connection
// buffers used to be allocated after the client's Confirm, so a failure
// there sent a Decline to a client that was already using SMC-D, and gave
// the server's application a TCP fallback that never got data. The failure
// must come before the Accept: both ends fall back, data intact, nothing
// left allocated.
func TestServerAllocFailsBeforeAccept(t *testing.T) {
	for _, c := range []struct {
		name   string
		failAt int32
	}{{"CDC buffer", 1}, {"staging buffer", 2}} {
		t.Run(c.name, func(t *testing.T) {
			e := twoHosts()
			lo := e.srvDev
			dev := &allocFailer{ISM: lo, failAt: c.failAt}
			e.srvDev = dev
			cli, srv := fallbackPair(t, e)
			if r := srv.Reason; r.Remote || r.Code != DeclineMem {
				t.Fatalf("server's reason %v, want its own decline %#x", r, DeclineMem)
			}
			if r := cli.Reason; !r.Remote || r.Code != DeclineMem {
				t.Fatalf("client's reason %v, want the server's decline %#x", r, DeclineMem)
			}
			if n := loopDMBs(lo); n != 0 {
				t.Fatalf("server left %d DMBs registered", n)
			}
			if n := dev.live.Load(); n != 0 {
				t.Fatalf("server left %d buffers allocated", n)
			}
		})
	}
}

// rawAccepted is a hand-driven client that has sent a Proposal and read the
// server's Accept; accepted receives what the listener hands its application.
type rawAccepted struct {
	raw      net.Conn
	acc      *AcceptConfirm
	srvDev   ISM
	ln       net.Listener
	accepted chan net.Conn
}

func rawToAccept(t *testing.T, s Server) *rawAccepted {
	t.Helper()
	e := twoHosts()
	ln, err := s.Listen(e.srvDev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	raw.SetDeadline(time.Now().Add(hangGuard))
	prop := Proposal{TypeV1: SMCTypeD, SMCDArea: true, GID: e.cliDev.GID(), CHID: e.cliDev.CHID()}
	setPrefix(&prop, raw.LocalAddr())
	pb, err := prop.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Write(pb); err != nil {
		t.Fatal(err)
	}
	typ, msg, err := ReadCLC(raw)
	if err != nil || typ != CLCAccept {
		t.Fatalf("want an accept: type %d, %v", typ, err)
	}
	acc, err := DecodeAcceptConfirm(msg, CLCAccept)
	if err != nil {
		t.Fatal(err)
	}
	return &rawAccepted{raw: raw, acc: acc, srvDev: e.srvDev, ln: ln, accepted: accepted}
}

// TestServerFailsAfterAccept: once the Accept is out, the client may be
// using SMC-D already, so anything but its Confirm or Decline (an unusable
// Confirm, another message, garbage, silence) must fail the connection: no
// Decline into a stream the client no longer reads as CLC, no fallback
// connection for the server's application, the DMB released.
func TestServerFailsAfterAccept(t *testing.T) {
	confirm := func(edit func(*AcceptConfirm)) func(*rawAccepted) []byte {
		return func(r *rawAccepted) []byte {
			c := AcceptConfirm{Type: CLCConfirm, FirstContact: true, GID: r.acc.GID, Token: 42, DMBESize: 2, LinkID: 7}
			edit(&c)
			b, _ := c.Encode()
			return b
		}
	}
	for _, c := range []struct {
		name string
		send func(*rawAccepted) []byte
	}{
		// The Proposal's GID is the client's; the Confirm must carry it.
		{"confirm from another GID", confirm(func(c *AcceptConfirm) { c.GID++ })},
		{"confirm without token", confirm(func(c *AcceptConfirm) { c.Token = 0 })},
		{"confirm with size beyond 1 MiB", confirm(func(c *AcceptConfirm) { c.DMBESize = 7 })},
		{"malformed confirm", func(r *rawAccepted) []byte {
			b := confirm(func(*AcceptConfirm) {})(r)
			b[len(b)-1] ^= 1 // bad trailer
			return b
		}},
		{"proposal instead of confirm", func(*rawAccepted) []byte { b, _ := sampleProposal().Encode(); return b }},
		{"silence", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := rawToAccept(t, Server{HandshakeTimeout: 2 * time.Second})
			if c.send != nil {
				if _, err := r.raw.Write(c.send(r)); err != nil {
					t.Fatal(err)
				}
			}
			var b [64]byte
			n, err := r.raw.Read(b[:])
			if n > 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("want the server to close the connection, got %d bytes % x, %v", n, b[:n], err)
			}
			// The server closed TCP only after its handshake gave up, so
			// it has released everything and will hand nothing over.
			if n := loopDMBs(r.srvDev); n != 0 {
				t.Fatalf("server left %d DMBs registered", n)
			}
			r.ln.Close()
			if sc, ok := <-r.accepted; ok {
				sc.Close()
				t.Fatalf("the server's application got a %T", sc)
			}
		})
	}
}
