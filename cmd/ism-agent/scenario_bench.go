package main

// Scenarios for `make bench` (host side: test/bench): SMC-D in attach mode
// and in copy mode against TCP (and UNIX sockets inside one guest), measured
// side by side in the same guests, with the workloads the SMC-D loopback work
// judged itself by.
//
//	bench-server  serve every transport until a client says quit
//	bench-client  measure every transport against ism.connect (the server
//	              guest's address, default 169.254.7.1)
//	bench-local   server and client in this one guest: smcd-attach and
//	              smcd-copy (the DMB rgid is the device's own GID), tcp over
//	              127.0.0.1, unix
//
// Transports: smcd-attach (the sender writes the receiver's DMB through its
// attachment; the connection fails the measurement unless both directions
// attach), smcd-copy (DMBs in guest RAM, every byte MOVEd; the same device,
// through smcdev.Adapter.CopyOnly), tcp, unix (bench-local only), and on the
// SMC kernel (VMConfig.SMCKernel) the kernel's own SMC-D with AF_SMC
// sockets: kernel-smcd (inter-VM: our DIBS driver on the guest's second ISM
// device; the Go driver takes the first) and kernel-lo (bench-local: the
// kernel's loopback-ism). A kernel connection that the kernel's smc_diag
// does not show as SMC-D fails the measurement.
//
// Measurements (ism.tests, default all, in this order):
//
//	tput     as sockperf tp --msg-size=64000 and iperf3: one connection,
//	         ism.tput_msg-byte writes (64000) for ism.dur, then a half-close;
//	         the server answers with the byte count it read. MB/s (1e6
//	         bytes/s) at the receiver: the count over the time from the first
//	         write to the answer.
//	tput32   the same over ism.conns connections at once (32): their bytes
//	         over the slowest one's time.
//	lat      as sockperf ping-pong --msg-size=14: ism.lat_msg-byte requests
//	         echoed for twice ism.dur after a warm-up (the p99.9 of an
//	         emulated guest's ~1000 round trips per second needs them); µs
//	         per round trip, p50 as lat, p99 and p99.9 as lat_p99 and
//	         lat_p999.
//	msgrate  as ipc-bench -s 100: ism.msg-byte (100) messages received in
//	         full and sent back; round trips per second.
//	http     a Go net/http server and a keep-alive load generator as wrk:
//	         ism.conns (32) clients, each with its own connection, ism.http_body-byte
//	         responses (default 64); requests per second, and the p99 of
//	         the request latency as http_p99 (µs).
//
// Single-connection tests use ism.dmb_size DMBs (default 1 MiB, as the
// loopback figures used 1 MB buffers); tput32 and http use ism.dmb_many
// (default 64 KiB) so that 32 connections fit in guest memory and in the
// shared-memory region.
//
// Each test runs ism.rounds times (default 3); within a round every transport
// runs once, their order rotated from round to round, so slow drifts of the
// emulated machine hit all transports alike. Each sample is one line:
//
//	ISM-RESULT bench.<test>.<transport>.<round>=<value>
//
// A failed measurement (an error, or no answer within ism.dur + 30 s) is
// reported as bench.<test>.<transport>.<round>.error=<error> and the run goes
// on; the third failure ends it.
//
// Ports (ism.port, default 7100): per transport i (smcd-attach, smcd-copy,
// tcp, kernel-smcd) a raw port port+3i, an HTTP port port+3i+1 and a raw port for the
// 32-connection tests port+3i+2. A raw connection starts with one op byte:
// 'S' sink (count until EOF, answer the count as 8 bytes), 'E' echo (4-byte
// message size, then echo messages until EOF), 'Q' quit the server.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
	"github.com/ism-backend/ism-backend/guestdriver/smcdev"
)

func init() {
	register("bench-server", benchServerScenario)
	register("bench-client", benchClientScenario)
	register("bench-local", benchLocalScenario)
}

const (
	opSink = 'S'
	opEcho = 'E'
	opQuit = 'Q'

	// sinkChunk is the server's read size.
	sinkChunk = 64 << 10
)

var benchTests = []string{"tput", "tput32", "lat", "msgrate", "http"}

// Transport names.
const (
	tSMCAttach = "smcd-attach"
	tSMCCopy   = "smcd-copy"
	tTCP       = "tcp"
	tUnix      = "unix"
	// The kernel's SMC-D (AF_SMC): through our device, and its loopback.
	tKernelSMCD = "kernel-smcd"
	tKernelLo   = "kernel-lo"
)

// kernelTransport: name is the kernel's SMC-D (AF_SMC sockets).
func kernelTransport(name string) bool { return name == tKernelSMCD || name == tKernelLo }

// kernelListen listens with an AF_SMC socket on addr, as a net.Listener:
// its connections are the kernel's (net.FileListener takes the socket,
// whose getsockname answers with the TCP address), with dmb-byte DMBs as
// the Go stack's transports get.
func kernelListen(addr string, dmb int) (net.Listener, error) {
	a, err := net.ResolveTCPAddr("tcp4", addr)
	if err != nil {
		return nil, err
	}
	fd, _, err := smcListen(a, dmb)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "af_smc_listener")
	defer f.Close() // FileListener dups it
	return net.FileListener(f)
}

// kernelDial connects an AF_SMC socket (dmb-byte DMBs) to addr and fails
// unless the kernel's smc_diag shows the connection as SMC-D (not a TCP
// fallback).
func kernelDial(addr string, dmb int) dialFunc {
	return func(ctx context.Context) (net.Conn, error) {
		a, err := net.ResolveTCPAddr("tcp4", addr)
		if err != nil {
			return nil, err
		}
		c, err := smcDialBuf(a, dmb)
		if err != nil {
			return nil, err
		}
		l, r := c.LocalAddr().(*net.TCPAddr), c.RemoteAddr().(*net.TCPAddr)
		d, err := smcDiagOf(l.Port, r.Port)
		if err == nil && d.Mode != smcDiagModeSMCD {
			err = fmt.Errorf("the kernel's connection is not SMC-D: %v", d)
		}
		if err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
}

// benchConfig holds the client's parameters.
type benchConfig struct {
	tests      []string
	transports []string
	dur        time.Duration
	rounds     int
	tputMsg    int
	latMsg     int
	msg        int
	conns      int
	httpBody   int
	dmb        int // DMB size of single-connection tests
	dmbMany    int // DMB size of the 32-connection tests
}

func benchConfigOf(e *Env, defTransports string) (benchConfig, error) {
	c := benchConfig{
		tests:      splitList(e.Arg("tests", strings.Join(benchTests, ","))),
		transports: splitList(e.Arg("transports", defTransports)),
		dur:        e.ArgDuration("dur", 2*time.Second),
		rounds:     e.ArgInt("rounds", 3),
		tputMsg:    e.ArgInt("tput_msg", 64000),
		latMsg:     e.ArgInt("lat_msg", 14),
		msg:        e.ArgInt("msg", 100),
		conns:      e.ArgInt("conns", 32),
		httpBody:   e.ArgInt("http_body", 64),
		dmb:        e.ArgInt("dmb_size", 1<<20),
		dmbMany:    e.ArgInt("dmb_many", 64<<10),
	}
	for _, t := range c.tests {
		if !contains(benchTests, t) {
			return c, fmt.Errorf("unknown bench test %q (have %v)", t, benchTests)
		}
	}
	if len(c.tests) == 0 || len(c.transports) == 0 || c.dur <= 0 || c.rounds <= 0 || c.tputMsg <= 0 ||
		c.latMsg < 4 || c.msg < 4 || c.conns <= 0 || c.httpBody < 0 {
		return c, fmt.Errorf("bad bench arguments %+v", c)
	}
	return c, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// dialFunc opens one connection of a transport.
type dialFunc func(ctx context.Context) (net.Conn, error)

// benchTransport is one transport as the client sees it.
type benchTransport struct {
	name            string
	raw, http, many dialFunc
}

// benchListeners is one transport as the server sees it.
type benchListeners struct {
	name            string
	raw, http, many net.Listener
}

func (l benchListeners) close() {
	for _, x := range []net.Listener{l.raw, l.http, l.many} {
		if x != nil {
			x.Close()
		}
	}
}

// ---- server ----

// benchServe serves every transport's raw and HTTP listener until a quit op
// arrives or ctx ends. It closes the listeners.
func benchServe(ctx context.Context, e *Env, lns []benchListeners, body int) error {
	quit := make(chan struct{})
	var quitOnce sync.Once
	stop := func() { quitOnce.Do(func() { close(quit) }) }
	resp := make([]byte, body)
	for i := range resp {
		resp[i] = 'a' + byte(i%26)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(resp)
	})
	var wg sync.WaitGroup
	var srvs []*http.Server
	var errsMu sync.Mutex
	var errs []error
	fail := func(err error) {
		errsMu.Lock()
		errs = append(errs, err)
		errsMu.Unlock()
	}
	for _, l := range lns {
		hs := &http.Server{Handler: handler, ReadHeaderTimeout: time.Minute}
		srvs = append(srvs, hs)
		wg.Add(2)
		go func() {
			defer wg.Done()
			if err := hs.Serve(l.http); err != nil && !errors.Is(err, http.ErrServerClosed) {
				select {
				case <-quit:
				default:
					fail(fmt.Errorf("%s http: %w", l.name, err))
				}
			}
		}()
		acceptRaw := func(ln net.Listener) {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					select {
					case <-quit:
					default:
						fail(fmt.Errorf("%s accept: %w", l.name, err))
						stop()
					}
					return
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer c.Close()
					if err := serveRaw(c, stop); err != nil {
						e.Logf("bench %s: %v", l.name, err)
						fail(fmt.Errorf("%s: %w", l.name, err))
					}
				}()
			}
		}
		wg.Add(1)
		go acceptRaw(l.raw)
		go acceptRaw(l.many)
	}
	select {
	case <-quit:
	case <-ctx.Done():
		fail(fmt.Errorf("bench server: %w before the client said quit", ctx.Err()))
		stop()
	}
	for i, l := range lns {
		l.raw.Close()
		l.many.Close()
		srvs[i].Close() // closes l.http and its connections
	}
	wg.Wait()
	return errors.Join(errs...)
}

func serveRaw(c net.Conn, quit func()) error {
	var op [1]byte
	if _, err := io.ReadFull(c, op[:]); err != nil {
		return nil // a readiness probe: connected and closed
	}
	switch op[0] {
	case opQuit:
		quit()
		return nil
	case opSink:
		// A plain loop: io.Copy to io.Discard would read in 8 KiB pieces.
		buf := make([]byte, sinkChunk)
		var n int64
		for {
			m, err := c.Read(buf)
			n += int64(m)
			if err == io.EOF {
				break
			}
			if err != nil {
				return fmt.Errorf("sink after %d bytes: %w", n, err)
			}
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		_, err := c.Write(b[:])
		return err
	case opEcho:
		var sz [4]byte
		if _, err := io.ReadFull(c, sz[:]); err != nil {
			return err
		}
		m := binary.BigEndian.Uint32(sz[:])
		if m == 0 || m > 1<<20 {
			return fmt.Errorf("echo: message size %d", m)
		}
		buf := make([]byte, m)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				if err == io.EOF {
					return nil
				}
				return fmt.Errorf("echo: %w", err)
			}
			if _, err := c.Write(buf); err != nil {
				return fmt.Errorf("echo: %w", err)
			}
		}
	default:
		return fmt.Errorf("unknown op %q", op[0])
	}
}

// ---- client ----

// requireMode wraps an SMC-D dial so that a silent fallback to TCP, or a
// connection that moves data in another mode than the transport's name
// says, fails the measurement instead of being reported under that name.
func requireMode(want smcd.Mode, d dialFunc) dialFunc {
	return func(ctx context.Context) (net.Conn, error) {
		c, err := d(ctx)
		if err != nil {
			return nil, err
		}
		sc, ok := c.(*smcd.Conn)
		if !ok {
			c.Close()
			return nil, errors.New("connection fell back to TCP (not SMC-D)")
		}
		if in := sc.Info(); in.SendMode != want || in.RecvMode != want {
			c.Close()
			return nil, fmt.Errorf("SMC-D connection sends in %v mode (%s) and receives in %v mode, want %v both ways",
				in.SendMode, in.SendNote, in.RecvMode, want)
		}
		return c, nil
	}
}

// smcTransport returns the SMC-D mode a transport name stands for.
func smcTransport(name string) (smcd.Mode, bool) {
	switch name {
	case tSMCAttach:
		return smcd.ModeAttach, true
	case tSMCCopy:
		return smcd.ModeCopy, true
	}
	return 0, false
}

// smcDevice is dev as transport name uses it: copy-only for smcd-copy.
func smcDevice(dev smcd.ISM, name string) smcd.ISM {
	if name != tSMCCopy {
		return dev
	}
	if v, ok := dev.(smcdev.Adapter); ok {
		return v.CopyOnly()
	}
	return copyOnly{dev}
}

// copyOnly is a device other than the driver's (the tests' loopback) with
// attach mode hidden: no Attacher, and DMBs that do not say Shared.
type copyOnly struct{ smcd.ISM }

type copyDMB struct{ smcd.DMB }

func (d copyOnly) RegisterDMB(size int, rgid uint64) (smcd.DMB, error) {
	m, err := d.ISM.RegisterDMB(size, rgid)
	if err != nil {
		return nil, err
	}
	return copyDMB{m}, nil
}

func (d copyOnly) UnregisterDMB(m smcd.DMB) error {
	if c, ok := m.(copyDMB); ok {
		m = c.DMB
	}
	return d.ISM.UnregisterDMB(m)
}

type closeWriter interface{ CloseWrite() error }

// measureStream writes size-byte buffers for dur, half-closes, and waits for
// the server's byte count; it returns the bytes and the time to the count.
func measureStream(ctx context.Context, dial dialFunc, size int, dur time.Duration) (int64, time.Duration, error) {
	c, err := dial(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(dur + 30*time.Second))
	cw, ok := c.(closeWriter)
	if !ok {
		return 0, 0, fmt.Errorf("%T cannot half-close", c)
	}
	buf := make([]byte, size)
	for i := range buf {
		buf[i] = byte(i)
	}
	if _, err := c.Write([]byte{opSink}); err != nil {
		return 0, 0, err
	}
	var sent int64
	start := time.Now()
	end := start.Add(dur)
	for i := 0; ; i++ {
		// Reading the clock is not free under emulation: every 16 writes.
		if i%16 == 0 && !time.Now().Before(end) {
			break
		}
		n, err := c.Write(buf)
		sent += int64(n)
		if err != nil {
			return sent, 0, fmt.Errorf("after %d bytes: %w", sent, err)
		}
	}
	if err := cw.CloseWrite(); err != nil {
		return sent, 0, fmt.Errorf("half-close: %w", err)
	}
	var b [8]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return sent, 0, fmt.Errorf("reading the server's count: %w", err)
	}
	el := time.Since(start)
	if got := int64(binary.BigEndian.Uint64(b[:])); got != sent {
		return sent, el, fmt.Errorf("server read %d bytes, client sent %d", got, sent)
	}
	return sent, el, nil
}

// measurePingPong runs size-byte request/response pairs for dur (after a
// short warm-up) and returns the round-trip times.
func measurePingPong(ctx context.Context, dial dialFunc, size int, dur time.Duration) ([]time.Duration, time.Duration, error) {
	c, err := dial(ctx)
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(dur + 30*time.Second))
	hdr := []byte{opEcho, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], uint32(size))
	if _, err := c.Write(hdr); err != nil {
		return nil, 0, err
	}
	req, resp := make([]byte, size), make([]byte, size)
	one := func(i int) error {
		binary.LittleEndian.PutUint32(req, uint32(i)) // size >= 4 checked by benchConfigOf
		if _, err := c.Write(req); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return err
		}
		if binary.LittleEndian.Uint32(resp) != uint32(i) {
			return fmt.Errorf("round trip %d: wrong reply", i)
		}
		return nil
	}
	for i := range 20 {
		if err := one(i); err != nil {
			return nil, 0, fmt.Errorf("warm-up: %w", err)
		}
	}
	rtts := make([]time.Duration, 0, 1<<14)
	start := time.Now()
	end := start.Add(dur)
	for t0 := start; t0.Before(end); {
		if err := one(len(rtts)); err != nil {
			return rtts, 0, fmt.Errorf("round trip %d: %w", len(rtts), err)
		}
		t1 := time.Now()
		rtts = append(rtts, t1.Sub(t0))
		t0 = t1
	}
	return rtts, time.Since(start), nil
}

// percentile returns the p-th percentile (0 < p <= 100) of sorted d, as
// sockperf reports them: the sample at rank ceil(p/100 * n).
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	k := int(math.Ceil(p*float64(len(sorted))/100-1e-9)) - 1 // the epsilon: 99.9% of 1000 is 999, not 999.0000000000001
	return sorted[min(max(k, 0), len(sorted)-1)]
}

// measureStreams runs conns measureStreams at once over dial and returns
// their bytes and the slowest one's time.
func measureStreams(ctx context.Context, dial dialFunc, conns, size int, dur time.Duration) (int64, time.Duration, error) {
	var wg sync.WaitGroup
	bytes := make([]int64, conns)
	els := make([]time.Duration, conns)
	errs := make([]error, conns)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bytes[i], els[i], errs[i] = measureStream(ctx, dial, size, dur)
		}()
	}
	wg.Wait()
	var n int64
	var el time.Duration
	for i := range conns {
		n += bytes[i]
		el = max(el, els[i])
	}
	return n, el, errors.Join(errs...)
}

// measureHTTP runs conns keep-alive clients doing GET for dur, as wrk
// does: each has its own connection, opened before the clock starts, and
// sends its next request when the previous response is in. It returns the
// completed requests, their time and the latency of each. The client is
// written out (one request, http.ReadResponse, the body) rather than taken
// from http.Transport, which quietly drops a connection whose request
// write it has not seen completed within 50 ms of the response (a busy
// emulated guest hits that) and dials again: every connection here lives
// for the whole measurement or the measurement fails.
func measureHTTP(ctx context.Context, dial dialFunc, conns, body int, dur time.Duration) (int64, time.Duration, []time.Duration, error) {
	type client struct {
		c    net.Conn
		br   *bufio.Reader
		lats []time.Duration
	}
	cls := make([]*client, conns)
	defer func() {
		for _, cl := range cls {
			if cl != nil {
				cl.c.Close()
			}
		}
	}()
	req := []byte("GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: ism-bench\r\n\r\n")
	get := func(cl *client) error {
		if _, err := cl.c.Write(req); err != nil {
			return err
		}
		r, err := http.ReadResponse(cl.br, nil)
		if err != nil {
			return err
		}
		n, err := io.Copy(io.Discard, r.Body)
		r.Body.Close()
		if err != nil {
			return err
		}
		if r.StatusCode != http.StatusOK || n != int64(body) || r.Close {
			return fmt.Errorf("status %d, %d body bytes, close %v (want 200, %d, keep-alive)", r.StatusCode, n, r.Close, body)
		}
		return nil
	}
	// Connect and warm up: every connection is open and has served one
	// request before the clock starts.
	var wg sync.WaitGroup
	errs := make([]error, conns)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dial(ctx)
			if err != nil {
				errs[i] = err
				return
			}
			c.SetDeadline(time.Now().Add(dur + 30*time.Second))
			cls[i] = &client{c: c, br: bufio.NewReader(c), lats: make([]time.Duration, 0, 1024)}
			errs[i] = get(cls[i])
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return 0, 0, nil, fmt.Errorf("warm-up: %w", err)
	}
	start := time.Now()
	end := start.Add(dur)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := cls[i]
			for t0 := time.Now(); t0.Before(end); {
				if err := get(cl); err != nil {
					errs[i] = fmt.Errorf("client %d, request %d: %w", i, len(cl.lats)+1, err)
					return
				}
				t1 := time.Now()
				cl.lats = append(cl.lats, t1.Sub(t0))
				t0 = t1
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	var lats []time.Duration
	for _, cl := range cls {
		lats = append(lats, cl.lats...)
	}
	return int64(len(lats)), el, lats, errors.Join(errs...)
}

// benchSample is one measurement's figure.
type benchSample struct {
	test, transport string
	round           int
	value           float64
	detail          string
}

func (s benchSample) key() string {
	return fmt.Sprintf("bench.%s.%s.%d", s.test, s.transport, s.round)
}

// measure runs one test once over one transport and returns its figure;
// extra holds more figures of the same measurement, by test name (lat's
// tail percentiles).
func measure(ctx context.Context, c benchConfig, test string, t benchTransport) (v float64, detail string, extra map[string]float64, err error) {
	switch test {
	case "tput", "tput32":
		conns, dial := 1, t.raw
		if test == "tput32" {
			conns, dial = c.conns, t.many
		}
		n, el, err := measureStreams(ctx, dial, conns, c.tputMsg, c.dur)
		if err != nil {
			return 0, "", nil, err
		}
		return float64(n) / el.Seconds() / 1e6, fmt.Sprintf("%d bytes in %d-byte writes over %d connection(s) in %v",
			n, c.tputMsg, conns, el.Round(time.Millisecond)), nil, nil
	case "msgrate":
		rtts, el, err := measurePingPong(ctx, t.raw, c.msg, c.dur)
		if err != nil {
			return 0, "", nil, err
		}
		return float64(len(rtts)) / el.Seconds(), fmt.Sprintf("%d round trips of %d B in %v", len(rtts), c.msg, el.Round(time.Millisecond)), nil, nil
	case "lat":
		rtts, el, err := measurePingPong(ctx, t.raw, c.latMsg, latDur*c.dur)
		if err != nil {
			return 0, "", nil, err
		}
		if len(rtts) == 0 {
			return 0, "", nil, errors.New("no round trip completed")
		}
		slices.Sort(rtts)
		us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
		p50, p99, p999 := percentile(rtts, 50), percentile(rtts, 99), percentile(rtts, 99.9)
		return us(p50), fmt.Sprintf("%d round trips of %d B in %v: p50 %v p99 %v p99.9 %v max %v",
				len(rtts), c.latMsg, el.Round(time.Millisecond), p50, p99, p999, rtts[len(rtts)-1]),
			map[string]float64{"lat_p99": us(p99), "lat_p999": us(p999)}, nil
	case "http":
		n, el, lats, err := measureHTTP(ctx, t.http, c.conns, c.httpBody, c.dur)
		if err != nil {
			return 0, "", nil, err
		}
		if n == 0 {
			return 0, "", nil, errors.New("no request completed")
		}
		slices.Sort(lats)
		p99 := percentile(lats, 99)
		return float64(n) / el.Seconds(), fmt.Sprintf("%d requests over %d connections in %v, p99 %v",
				n, c.conns, el.Round(time.Millisecond), p99),
			map[string]float64{"http_p99": float64(p99.Nanoseconds()) / 1e3}, nil
	}
	return 0, "", nil, fmt.Errorf("unknown test %q", test)
}

// latDur is lat's measurement time in units of ism.dur.
const latDur = 2

// maxBenchFailures ends a run early: a transport that keeps failing would
// only burn the guest's time.
const maxBenchFailures = 3

// runBench runs every test, round and transport and reports each sample
// (through report) as it is measured. The order of transports rotates by
// round. A failed measurement is reported (fail) and the run goes on, so one
// stalled connection does not cost every other figure; after
// maxBenchFailures it stops with an error.
func runBench(ctx context.Context, c benchConfig, ts []benchTransport, report func(benchSample), fail func(benchSample, error)) error {
	failures := 0
	for _, test := range c.tests {
		for r := range c.rounds {
			for k := range ts {
				t := ts[(k+r)%len(ts)]
				if err := ctx.Err(); err != nil {
					return err
				}
				s := benchSample{test: test, transport: t.name, round: r}
				v, detail, extra, err := measure(ctx, c, test, t)
				if err != nil {
					failures++
					fail(s, err)
					if failures >= maxBenchFailures {
						return fmt.Errorf("%d failed measurements, the last %s over %s, round %d: %w", failures, test, t.name, r, err)
					}
					continue
				}
				s.value, s.detail = v, detail
				report(s)
				for _, name := range slices.Sorted(maps.Keys(extra)) {
					report(benchSample{test: name, transport: t.name, round: r, value: extra[name], detail: "of " + test})
				}
			}
		}
	}
	return nil
}

func reportTo(e *Env) func(benchSample) {
	return func(s benchSample) {
		e.Logf("bench %s %s round %d: %.4g (%s)", s.test, s.transport, s.round, s.value, s.detail)
		e.Result(s.key(), fmt.Sprintf("%.4g", s.value))
	}
}

// failTo reports a failed measurement as bench.<test>.<transport>.<round>.error
// and, the first time, the goroutines of this process (grouped by stack), for
// whoever debugs the stall.
func failTo(e *Env) func(benchSample, error) {
	dumped := false
	return func(s benchSample, err error) {
		e.Logf("bench %s %s round %d FAILED: %v", s.test, s.transport, s.round, err)
		e.Result(s.key()+".error", err.Error())
		if dumped {
			return
		}
		dumped = true
		var b strings.Builder
		pprof.Lookup("goroutine").WriteTo(&b, 1)
		for _, l := range strings.Split(b.String(), "\n") {
			if l != "" {
				e.println("ism-agent: stacks: " + l)
			}
		}
	}
}

func reportBenchConfig(e *Env, c benchConfig) {
	e.Result("bench.config", fmt.Sprintf("dur=%v rounds=%d tput_msg=%d lat_msg=%d msg=%d conns=%d http_body=%d dmb_size=%d dmb_many=%d transports=%s",
		c.dur, c.rounds, c.tputMsg, c.latMsg, c.msg, c.conns, c.httpBody, c.dmb, c.dmbMany, strings.Join(c.transports, ",")))
}

// serverTransports are the transports a bench server can offer, in port
// order; defServerTransports those it offers unless ism.transports says.
var (
	serverTransports    = []string{tSMCAttach, tSMCCopy, tTCP, tKernelSMCD}
	defServerTransports = []string{tSMCAttach, tSMCCopy, tTCP}
)

// benchDevices opens what c's transports need: the Go driver's device
// for smcd-*, then (kernel-smcd) our DIBS driver, which binds the ISM
// devices the Go driver left: the driver's takeover has set the first one's
// driver_override.
func benchDevices(e *Env, c benchConfig) (smcd.ISM, func(), error) {
	var dev smcd.ISM
	closeDev := func() {}
	if contains(c.transports, tSMCAttach) || contains(c.transports, tSMCCopy) {
		d, cl, err := openSMC(e)
		if err != nil {
			return nil, nil, err
		}
		dev, closeDev = d, cl
	}
	if contains(c.transports, tKernelSMCD) || contains(c.transports, tKernelLo) {
		// Let SO_SNDBUF/SO_RCVBUF ask for the Go stack's DMB sizes.
		for _, f := range []string{"/proc/sys/net/core/rmem_max", "/proc/sys/net/core/wmem_max"} {
			if err := os.WriteFile(f, []byte(strconv.Itoa(4*max(c.dmb, c.dmbMany))), 0); err != nil {
				closeDev()
				return nil, nil, err
			}
		}
	}
	switch {
	case contains(c.transports, tKernelSMCD):
		if err := kernelSMCSetup(e, "ism_dibs"); err != nil {
			closeDev()
			return nil, nil, err
		}
	case contains(c.transports, tKernelLo):
		if err := kernelSMCSetup(e, "none"); err != nil {
			closeDev()
			return nil, nil, err
		}
	}
	return dev, closeDev, nil
}

// ports are a transport's raw, HTTP and 32-connection ports.
func ports(base, i int) (raw, http, many int) { return base + 3*i, base + 3*i + 1, base + 3*i + 2 }

func benchServerScenario(e *Env) error {
	c, err := benchConfigOf(e, strings.Join(defServerTransports, ","))
	if err != nil {
		return err
	}
	dev, closeDev, err := benchDevices(e, c)
	if err != nil {
		return err
	}
	defer closeDev()
	base := e.ArgInt("port", 7100)
	var lns []benchListeners
	defer func() {
		for _, l := range lns {
			l.close()
		}
	}()
	for i, name := range serverTransports {
		if !contains(c.transports, name) && name != tTCP { // tcp: the control port
			continue
		}
		listen := func(p, dmb int) (net.Listener, error) {
			if kernelTransport(name) {
				return kernelListen(fmt.Sprintf(":%d", p), dmb)
			}
			if _, ok := smcTransport(name); ok {
				srv := &smcd.Server{DMBSize: dmb, Logf: e.Logf}
				return srv.Listen(smcDevice(dev, name), "tcp", fmt.Sprintf(":%d", p))
			}
			return net.Listen("tcp", fmt.Sprintf(":%d", p))
		}
		l := benchListeners{name: name}
		rp, hp, mp := ports(base, i)
		if l.raw, err = listen(rp, c.dmb); err == nil {
			if l.http, err = listen(hp, c.dmbMany); err == nil {
				l.many, err = listen(mp, c.dmbMany)
			}
		}
		lns = append(lns, l)
		if err != nil {
			return err
		}
	}
	e.Result("bench.listening", base)
	return benchServe(e.Ctx, e, lns, c.httpBody)
}

func benchClientScenario(e *Env) error {
	c, err := benchConfigOf(e, strings.Join(defServerTransports, ","))
	if err != nil {
		return err
	}
	dev, closeDev, err := benchDevices(e, c)
	if err != nil {
		return err
	}
	defer closeDev()
	host := e.Arg("connect", "169.254.7.1")
	base := e.ArgInt("port", 7100)
	addr := func(p int) string { return net.JoinHostPort(host, fmt.Sprint(p)) }
	var ts []benchTransport
	ctl := ""
	for i, name := range serverTransports {
		rp, hp, mp := ports(base, i)
		if name == tTCP {
			ctl = addr(rp)
		}
		if !contains(c.transports, name) {
			continue
		}
		t := benchTransport{name: name}
		dialer := func(p, dmb int) dialFunc {
			a := addr(p)
			if kernelTransport(name) {
				return kernelDial(a, dmb)
			}
			if mode, ok := smcTransport(name); ok {
				sd := &smcd.Dialer{DMBSize: dmb}
				d := smcDevice(dev, name)
				return requireMode(mode, func(ctx context.Context) (net.Conn, error) { return sd.DialContext(ctx, d, "tcp", a) })
			}
			var nd net.Dialer
			return func(ctx context.Context) (net.Conn, error) { return nd.DialContext(ctx, "tcp", a) }
		}
		t.raw, t.http, t.many = dialer(rp, c.dmb), dialer(hp, c.dmbMany), dialer(mp, c.dmbMany)
		ts = append(ts, t)
	}
	if len(ts) != len(c.transports) {
		return fmt.Errorf("transports %v: the server offers %v", c.transports, serverTransports)
	}
	// The server guest may still be booting: wait for its plain TCP port.
	if err := waitListening(e.Ctx, ctl); err != nil {
		return err
	}
	defer sendQuit(ctl)
	reportBenchConfig(e, c)
	e.Logf("bench: %d tests x %d rounds x %d transports x %v", len(c.tests), c.rounds, len(ts), c.dur)
	return runBench(e.Ctx, c, ts, reportTo(e), failTo(e))
}

// waitListening dials addr over TCP until something accepts (the peer guest
// has booted and listens) or ctx ends.
func waitListening(ctx context.Context, addr string) error {
	start := time.Now()
	for {
		var d net.Dialer
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := d.DialContext(dctx, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("bench server %s not listening after %v: %w", addr, time.Since(start).Round(time.Second), err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func sendQuit(addr string) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return
	}
	c.Write([]byte{opQuit})
	c.Close()
}

// localTransports sets up the listeners and dialers of bench-local: SMC-D
// over dev (nil: none) in both modes, tcp over 127.0.0.1, unix (abstract
// sockets).
func localTransports(dev smcd.ISM, c benchConfig) ([]benchListeners, []benchTransport, error) {
	var lns []benchListeners
	var ts []benchTransport
	fail := func(err error) ([]benchListeners, []benchTransport, error) {
		for _, l := range lns {
			l.close()
		}
		return nil, nil, err
	}
	for _, name := range c.transports {
		var listen func(dmb int) (net.Listener, error)
		var dial func(ctx context.Context, dmb int, addr string) (net.Conn, error)
		var nd net.Dialer
		mode, isSMC := smcTransport(name)
		switch {
		case isSMC:
			if dev == nil {
				return fail(fmt.Errorf("%s: no device", name))
			}
			d := smcDevice(dev, name)
			listen = func(dmb int) (net.Listener, error) {
				return (&smcd.Server{DMBSize: dmb}).Listen(d, "tcp", "127.0.0.1:0")
			}
			dial = func(ctx context.Context, dmb int, addr string) (net.Conn, error) {
				return (&smcd.Dialer{DMBSize: dmb}).DialContext(ctx, d, "tcp", addr)
			}
		case kernelTransport(name):
			listen = func(dmb int) (net.Listener, error) { return kernelListen("127.0.0.1:0", dmb) }
			dial = func(ctx context.Context, dmb int, addr string) (net.Conn, error) { return kernelDial(addr, dmb)(ctx) }
		case name == tTCP:
			listen = func(int) (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }
			dial = func(ctx context.Context, _ int, addr string) (net.Conn, error) {
				return nd.DialContext(ctx, "tcp", addr)
			}
		case name == tUnix:
			// Abstract names: no file system needed, nothing to remove.
			n := 0
			listen = func(int) (net.Listener, error) {
				n++
				return net.Listen("unix", fmt.Sprintf("@ism-bench-%d-%d-%d", time.Now().UnixNano(), len(lns), n))
			}
			dial = func(ctx context.Context, _ int, addr string) (net.Conn, error) {
				return nd.DialContext(ctx, "unix", addr)
			}
		default:
			return fail(fmt.Errorf("unknown transport %q (have %s, %s, %s, %s, %s)", name, tSMCAttach, tSMCCopy, tTCP, tUnix, tKernelLo))
		}
		l := benchListeners{name: name}
		var err error
		if l.raw, err = listen(c.dmb); err == nil {
			if l.http, err = listen(c.dmbMany); err == nil {
				l.many, err = listen(c.dmbMany)
			}
		}
		lns = append(lns, l)
		if err != nil {
			return fail(fmt.Errorf("%s: %w", name, err))
		}
		dialer := func(ln net.Listener, dmb int) dialFunc {
			a := ln.Addr().String()
			f := func(ctx context.Context) (net.Conn, error) { return dial(ctx, dmb, a) }
			if isSMC {
				return requireMode(mode, f)
			}
			return f
		}
		ts = append(ts, benchTransport{name: name, raw: dialer(l.raw, c.dmb), http: dialer(l.http, c.dmbMany), many: dialer(l.many, c.dmbMany)})
	}
	return lns, ts, nil
}

// benchLocal runs server and client in one process; the client's error
// comes first, and the server is told to quit in any case.
func benchLocal(ctx context.Context, e *Env, dev smcd.ISM, c benchConfig, report func(benchSample), fail func(benchSample, error)) error {
	lns, ts, err := localTransports(dev, c)
	if err != nil {
		return err
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	serr := make(chan error, 1)
	go func() { serr <- benchServe(sctx, e, lns, c.httpBody) }()
	cerr := runBench(ctx, c, ts, report, fail)
	// Quit over the first transport's raw port.
	if qc, err := ts[0].raw(ctx); err == nil {
		qc.Write([]byte{opQuit})
		qc.Close()
	} else {
		cancel()
	}
	err = <-serr
	if cerr != nil {
		return cerr
	}
	return err
}

func benchLocalScenario(e *Env) error {
	c, err := benchConfigOf(e, strings.Join([]string{tSMCAttach, tSMCCopy, tTCP, tUnix}, ","))
	if err != nil {
		return err
	}
	dev, closeDev, err := benchDevices(e, c)
	if err != nil {
		return err
	}
	defer closeDev()
	reportBenchConfig(e, c)
	e.Logf("bench: %d tests x %d rounds x %d transports x %v", len(c.tests), c.rounds, len(c.transports), c.dur)
	return benchLocal(e.Ctx, e, dev, c, reportTo(e), failTo(e))
}
