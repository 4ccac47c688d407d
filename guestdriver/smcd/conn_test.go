package smcd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// hangGuard bounds waits that would otherwise hang a broken test; it is not
// a timing assertion: correct code finishes far sooner.
const hangGuard = 20 * time.Second

type env struct {
	srvDev, cliDev ISM
	srv            Server
	dial           Dialer
}

// twoHosts is two devices with different GIDs on one fabric.
func twoHosts() env {
	f := NewFabric(0xFF00)
	return withTestTimeouts(env{srvDev: f.NewDevice(), cliDev: f.NewDevice()})
}

// withTestTimeouts lets CLC wait longer than Linux's 6 s: a loaded machine
// running -race must not turn a handshake into a fallback in tests that are
// not about timeouts (those set their own).
func withTestTimeouts(e env) env {
	e.srv.HandshakeTimeout = time.Minute
	e.dial.HandshakeTimeout = time.Minute
	return e
}

// oneHost is both ends on one loopback device (rgid = own GID).
func oneHost() env {
	d := NewLoopback()
	return withTestTimeouts(env{srvDev: d, cliDev: d})
}

// attach turns on attach mode in e's devices: senders write the peer's
// DMB through an attachment instead of MOVEing.
func (e env) attach() env {
	e.srvDev.(*Loopback).AttachMode = true
	e.cliDev.(*Loopback).AttachMode = true
	return e
}

// bothModes runs f with e() as it is (copy mode) and in attach mode.
func bothModes(t *testing.T, e func() env, f func(t *testing.T, e env)) {
	t.Run("copy", func(t *testing.T) { f(t, e()) })
	t.Run("attach", func(t *testing.T) { f(t, e().attach()) })
}

// pair returns a connected client and server.
func (e env) pair(t testing.TB) (cli, srv net.Conn) {
	t.Helper()
	ln, err := e.srv.Listen(e.srvDev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	cli, err = e.dial.DialContext(context.Background(), e.cliDev, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { cli.Close(); r.c.Close() })
	return cli, r.c
}

func seeded(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

func mustSMC(t testing.TB, cs ...net.Conn) {
	t.Helper()
	for _, c := range cs {
		if !IsSMC(c) {
			t.Fatalf("%T is not SMC-D: %v", c, c.(*FallbackConn).Reason)
		}
	}
}

// copyBothWays sends n seeded bytes each way at once, each side
// half-closing after writing, and compares SHA-256 sums.
func copyBothWays(t *testing.T, a, b net.Conn, n int) {
	t.Helper()
	da, db := seeded(1, n), seeded(2, n)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	sums := make([][32]byte, 2)
	send := func(c net.Conn, d []byte) {
		defer wg.Done()
		if _, err := io.Copy(c, bytes.NewReader(d)); err != nil {
			errs <- err
			return
		}
		if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
			errs <- err
		}
	}
	recv := func(c net.Conn, i int) {
		defer wg.Done()
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			errs <- err
		}
		copy(sums[i][:], h.Sum(nil))
	}
	wg.Add(4)
	go send(a, da)
	go send(b, db)
	go recv(b, 0)
	go recv(a, 1)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if sums[0] != sha256.Sum256(da) || sums[1] != sha256.Sum256(db) {
		t.Fatal("SHA-256 mismatch")
	}
}

func TestCopyBothWays(t *testing.T) {
	for name, e := range map[string]env{"two hosts": twoHosts(), "one host": oneHost(),
		"two hosts attach": twoHosts().attach(), "one host attach": oneHost().attach()} {
		t.Run(name, func(t *testing.T) {
			cli, srv := e.pair(t)
			mustSMC(t, cli, srv)
			copyBothWays(t, cli, srv, 6<<20+12345)
		})
	}
}

// TestMoveLimit: a device with a small max_move_len gets data MOVEs split.
func TestMoveLimit(t *testing.T) {
	e := twoHosts()
	e.srvDev.(*Loopback).MaxMove = 4000
	e.cliDev.(*Loopback).MaxMove = 4000
	e.srv.DMBSize, e.dial.DMBSize = 256<<10, 256<<10
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	copyBothWays(t, cli, srv, 1<<20+5)
}

func TestDMBSizes(t *testing.T) {
	for _, sizes := range [][2]int{{16 << 10, 1 << 20}, {1 << 20, 16 << 10}, {256 << 10, 256 << 10}} {
		t.Run(fmt.Sprint(sizes), func(t *testing.T) {
			e := twoHosts()
			e.srv.DMBSize, e.dial.DMBSize = sizes[0], sizes[1]
			cli, srv := e.pair(t)
			mustSMC(t, cli, srv)
			copyBothWays(t, cli, srv, 3<<20+7)
		})
	}
}

// TestFlowControlTinyDMB: one large Write into a 16 KiB DMB completes only
// through the receiver's acknowledgements; reads of odd sizes wrap the ring
// at every possible offset.
func TestFlowControlTinyDMB(t *testing.T) { bothModes(t, twoHosts, testFlowControlTinyDMB) }

func testFlowControlTinyDMB(t *testing.T, e env) {
	e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	data := seeded(3, 5<<20+3)
	done := make(chan error, 1)
	go func() {
		n, err := cli.Write(data)
		if err == nil && n != len(data) {
			err = fmt.Errorf("short write %d", n)
		}
		if err == nil {
			err = cli.(*Conn).CloseWrite()
		}
		done <- err
	}()
	var got bytes.Buffer
	buf := make([]byte, 1237)
	for {
		n, err := srv.Read(buf)
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatal("data differs")
	}
}

func TestConcurrentConns(t *testing.T) { bothModes(t, twoHosts, testConcurrentConns) }

func testConcurrentConns(t *testing.T, e env) {
	e.srv.DMBSize = 32 << 10
	ln, err := e.srv.Listen(e.srvDev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if !IsSMC(c) {
					return
				}
				io.Copy(c, c)
				c.(*Conn).CloseWrite()
			}()
		}
	}()
	const conns = 32
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := e.dial.DialContext(context.Background(), e.cliDev, "tcp", ln.Addr().String())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if !IsSMC(c) {
				errs <- fmt.Errorf("conn %d fell back: %v", i, c.(*FallbackConn).Reason)
				return
			}
			data := seeded(int64(i), 300<<10+i)
			go func() {
				c.Write(data)
				c.(*Conn).CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, data) {
				errs <- fmt.Errorf("conn %d: echo differs (%d bytes)", i, len(got))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestHalfClose(t *testing.T) {
	cli, srv := twoHosts().pair(t)
	mustSMC(t, cli, srv)
	req := []byte("request, then done writing")
	if _, err := cli.Write(req); err != nil {
		t.Fatal(err)
	}
	if err := cli.(*Conn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("write after CloseWrite: %v", err)
	}
	got, err := io.ReadAll(srv)
	if err != nil || !bytes.Equal(got, req) {
		t.Fatalf("server read %q, %v", got, err)
	}
	// The other direction still works.
	resp := seeded(4, 100<<10)
	go func() {
		srv.Write(resp)
		srv.Close()
	}()
	got, err = io.ReadAll(cli)
	if err != nil || !bytes.Equal(got, resp) {
		t.Fatalf("client read %d bytes, %v", len(got), err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) && errors.As(err, &ne) && ne.Timeout()
}

func TestDeadlines(t *testing.T) {
	e := twoHosts()
	e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)

	// Read with a deadline in the past: immediate timeout.
	cli.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := cli.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("past read deadline: %v", err)
	}
	// A future deadline fires while blocked.
	cli.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := cli.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("future read deadline: %v", err)
	}
	// Clearing it makes the connection usable again.
	cli.SetReadDeadline(time.Time{})
	srv.Write([]byte("z"))
	if b := make([]byte, 1); func() error { _, err := io.ReadFull(cli, b); return err }() != nil || b[0] != 'z' {
		t.Fatal("read after clearing deadline failed")
	}

	// A deadline set from another goroutine unblocks a blocked Read.
	errc := make(chan error, 1)
	go func() { _, err := cli.Read(make([]byte, 1)); errc <- err }()
	time.Sleep(10 * time.Millisecond)
	cli.SetReadDeadline(time.Now())
	select {
	case err := <-errc:
		if !isTimeout(err) {
			t.Fatalf("deadline set while blocked: %v", err)
		}
	case <-time.After(hangGuard):
		t.Fatal("Read not unblocked by SetReadDeadline")
	}

	// Write into a peer that does not read: the ring fills, then timeout
	// with the count of bytes that made it.
	cli.SetWriteDeadline(time.Now().Add(30 * time.Millisecond))
	n, err := cli.Write(make([]byte, 1<<20))
	if !isTimeout(err) {
		t.Fatalf("write deadline: %v", err)
	}
	if n != MinDMBSize-CDCLen {
		t.Fatalf("wrote %d before timeout, want the ring size %d", n, MinDMBSize-CDCLen)
	}
}

// TestCloseUnblocks: Close wakes a blocked Read and a blocked Write with
// net.ErrClosed, as net.Conn requires.
func TestCloseUnblocks(t *testing.T) {
	e := twoHosts()
	e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
	cli, _ := e.pair(t)
	errc := make(chan error, 2)
	go func() { _, err := cli.Read(make([]byte, 1)); errc <- err }()
	go func() { _, err := cli.Write(make([]byte, 1<<20)); errc <- err }()
	time.Sleep(10 * time.Millisecond)
	cli.Close()
	for i := 0; i < 2; i++ {
		select {
		case err := <-errc:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("after Close: %v", err)
			}
		case <-time.After(hangGuard):
			t.Fatal("Close did not unblock")
		}
	}
	if err := cli.Close(); err == nil {
		t.Fatal("second Close succeeded")
	}
}

// TestPeerVanishes: the peer's device dies and its TCP connection closes
// without any CDC; the survivor's blocked Read and Write fail, not hang.
func TestPeerVanishes(t *testing.T) {
	e := twoHosts()
	e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	readErr := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, cli); readErr <- err }()
	writeErr := make(chan error, 1)
	go func() { _, err := cli.Write(make([]byte, 4<<20)); writeErr <- err }()
	time.Sleep(10 * time.Millisecond)
	e.srvDev.(*Loopback).Close()
	srv.(*Conn).tcp.Close()
	for _, ch := range []chan error{readErr, writeErr} {
		select {
		case err := <-ch:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("want ECONNRESET, got %v", err)
			}
		case <-time.After(hangGuard):
			t.Fatal("survivor hangs after the peer vanished")
		}
	}
}

// TestPeerHalfClosesTCP: a peer that, as Linux's SMC does on
// shutdown(SHUT_WR), sends its done-writing CDC and then a TCP FIN on the
// CLC connection has not vanished: the other end reads to EOF and still
// answers, and the peer reads the answer.
func TestPeerHalfClosesTCP(t *testing.T) {
	cli, srv := twoHosts().pair(t)
	mustSMC(t, cli, srv)
	if _, err := srv.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := srv.(*Conn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := srv.(*Conn).tcp.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(cli)
	if err != nil || string(got) != "request" {
		t.Fatalf("read %q, %v", got, err)
	}
	c := cli.(*Conn)
	deadline := time.Now().Add(hangGuard)
	for {
		c.mu.Lock()
		half, cerr := c.tcpHalfClosed, c.err
		c.mu.Unlock()
		if cerr != nil {
			t.Fatalf("the FIN after done-writing failed the connection: %v", cerr)
		}
		if half {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the peer's FIN was not seen")
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := cli.Write([]byte("answer")); err != nil {
		t.Fatalf("answering after the peer's FIN: %v", err)
	}
	cli.Close()
	got, err = io.ReadAll(srv)
	if err != nil || string(got) != "answer" {
		t.Fatalf("peer read %q, %v", got, err)
	}
}

// TestPeerAbort: closing with unread data aborts; the peer's Read fails.
func TestPeerAbort(t *testing.T) {
	cli, srv := twoHosts().pair(t)
	mustSMC(t, cli, srv)
	if _, err := cli.Write([]byte("never read")); err != nil {
		t.Fatal(err)
	}
	// Wait until the server has seen the data, then close unread.
	for {
		srv.(*Conn).mu.Lock()
		got := srv.(*Conn).rxProd
		srv.(*Conn).mu.Unlock()
		if got > 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	srv.Close()
	_, err := cli.Read(make([]byte, 10))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after peer abort: %v", err)
	}
}

// TestPeerCloseDrains: data written before Close is still read, then EOF,
// and writing to the closed peer fails.
func TestPeerCloseDrains(t *testing.T) {
	cli, srv := twoHosts().pair(t)
	mustSMC(t, cli, srv)
	data := seeded(5, 40<<10)
	if _, err := srv.Write(data); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	got, err := io.ReadAll(cli)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes, %v", len(got), err)
	}
	if _, err := cli.Write([]byte("x")); err == nil {
		t.Fatal("write to closed peer succeeded")
	}
}

func TestConcurrentReadWrite(t *testing.T) {
	cli, srv := twoHosts().pair(t)
	mustSMC(t, cli, srv)
	// Several writers and readers on one connection: bytes are neither lost
	// nor duplicated (each Write is one unit, so count per-writer bytes).
	const writers, per = 4, 200
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			msg := bytes.Repeat([]byte{byte('a' + w)}, 1000)
			for i := 0; i < per; i++ {
				if _, err := cli.Write(msg); err != nil {
					t.Error(err)
					return
				}
			}
		}(w)
	}
	go func() { wg.Wait(); cli.(*Conn).CloseWrite() }()
	var mu sync.Mutex
	counts := map[byte]int{}
	var rg sync.WaitGroup
	for r := 0; r < 3; r++ {
		rg.Add(1)
		go func() {
			defer rg.Done()
			buf := make([]byte, 777)
			for {
				n, err := srv.Read(buf)
				mu.Lock()
				for _, b := range buf[:n] {
					counts[b]++
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		}()
	}
	rg.Wait()
	for w := 0; w < writers; w++ {
		if counts[byte('a'+w)] != per*1000 {
			t.Fatalf("writer %d: %d bytes arrived", w, counts[byte('a'+w)])
		}
	}
}

// TestNoGoroutineLeak: after both ends close, the per-connection goroutines
// (CDC receiver, TCP watcher) are gone.
func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	e := twoHosts()
	for i := 0; i < 5; i++ {
		ln, err := e.srv.Listen(e.srvDev, "tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := acceptAsync(t, ln)
		cli, err := e.dial.DialContext(context.Background(), e.cliDev, "tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		mustSMC(t, cli, srv.(*lazyConn).get())
		cli.Write([]byte("x"))
		io.ReadFull(srv, make([]byte, 1))
		if n, err := cli.Write(nil); n != 0 || err != nil {
			t.Fatalf("empty write: %d %v", n, err)
		}
		cli.Close()
		srv.Close()
		ln.Close()
	}
	for deadline := time.Now().Add(hangGuard); runtime.NumGoroutine() > before; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines before, %d after:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
	}
}

// TestPeerDeviceGone: the peer's device goes away but its TCP connection
// stays silent (its VM was killed: nothing sends a FIN or RST). The device's
// GID event must fail the survivor's Read and Write at once.
func TestPeerDeviceGone(t *testing.T) {
	e := twoHosts()
	e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	readErr := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, cli); readErr <- err }()
	writeErr := make(chan error, 1)
	go func() { _, err := cli.Write(make([]byte, 4<<20)); writeErr <- err }()
	time.Sleep(10 * time.Millisecond)
	e.srvDev.(*Loopback).Close() // srv's TCP stays open and silent
	for _, ch := range []chan error{readErr, writeErr} {
		select {
		case err := <-ch:
			if !errors.Is(err, errPeerGone) {
				t.Fatalf("want the peer-gone error, got %v", err)
			}
		case <-time.After(hangGuard):
			t.Fatal("survivor hangs after the peer's device went away")
		}
	}
}

// closeOnCDC is a device whose next signalled MOVE (a CDC) runs hook after
// it lands: it lets a test put the peer's close exactly between a Write's
// last CDC and its return.
type closeOnCDC struct {
	ISM
	hook atomic.Pointer[func()]
}

func (d *closeOnCDC) Move(token uint64, dmbe uint32, signal bool, offset uint32, src Buffer, srcOff, n int) error {
	err := d.ISM.Move(token, dmbe, signal, offset, src, srcOff, n)
	if !signal {
		return err
	}
	if h := d.hook.Swap(nil); h != nil {
		(*h)()
	}
	return err
}

// TestWriteDeliveredThenPeerCloses: the peer reads a Write's data and closes
// before the Write returns (seen in a 32-connection VM test); the Write
// delivered everything and must report success.
func TestWriteDeliveredThenPeerCloses(t *testing.T) {
	e := twoHosts()
	dev := &closeOnCDC{ISM: e.srvDev}
	e.srvDev = dev
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	msg := []byte("the last word")
	hook := func() {
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(cli, got); err != nil {
			t.Errorf("peer read: %v", err)
		}
		cli.Close()
		sc := srv.(*Conn)
		for deadline := time.Now().Add(hangGuard); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			sc.mu.Lock()
			closed := sc.peerState&FlagClosed != 0
			sc.mu.Unlock()
			if closed {
				return
			}
		}
		t.Error("server never saw the peer's close")
	}
	dev.hook.Store(&hook)
	if n, err := srv.Write(msg); err != nil || n != len(msg) {
		t.Fatalf("Write of delivered data: %d, %v", n, err)
	}
	if dev.hook.Load() != nil {
		t.Fatal("the hook never ran: the test did not put the close where it means to")
	}
	srv.Close()
}
