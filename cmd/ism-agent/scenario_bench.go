package main

// Scenarios for `make bench` (host side: test/bench): SMC-D against TCP (and
// UNIX sockets inside one guest), measured side by side in the same guests,
// the way the SMC-D loopback work measured itself.
//
//	bench-server  serve every transport until a client says quit
//	bench-client  measure every transport against ism.connect (the server
//	              guest's address, default 169.254.7.1)
//	bench-local   server and client in this one guest: smcd (the DMB rgid
//	              is the device's own GID), tcp over 127.0.0.1, unix
//
// Measurements (ism.tests, default all four, in this order):
//
//	tput     one connection, 64 KiB writes for ism.dur, then a half-close; the
//	         server answers with the byte count it read. MB/s (1e6 bytes/s)
//	         over the time from the first write to that answer.
//	lat      14-byte ping-pong (ism.lat_msg) for ism.dur: µs per round trip.
//	msgrate  one direction, ism.msg-byte writes (default 64) for ism.dur,
//	         counted as tput is: messages per second.
//	http     Go net/http server and client over the transport, keep-alive,
//	         ism.http_conns concurrent clients (default 4), ism.http_body-byte
//	         responses (default 64): requests per second.
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
// SMC-D connections must really be SMC-D: a fallback to TCP fails the run.
// ism.dmb_size sets the SMC-D receive buffer (default smcd.DefaultDMBSize).
//
// Ports (ism.port, default 7100): per transport i (smcd, tcp) a raw port
// port+2i and an HTTP port port+2i+1. A raw connection starts with one op
// byte: 'S' sink (count until EOF, answer the count as 8 bytes), 'E' echo
// (4-byte message size, then echo messages until EOF), 'Q' quit the server.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
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

	benchChunk = 64 << 10
)

var benchTests = []string{"tput", "lat", "msgrate", "http"}

// benchConfig holds the client's parameters.
type benchConfig struct {
	tests      []string
	transports []string
	dur        time.Duration
	rounds     int
	latMsg     int
	msg        int
	httpConns  int
	httpBody   int
}

func benchConfigOf(e *Env, defTransports string) (benchConfig, error) {
	c := benchConfig{
		tests:      splitList(e.Arg("tests", strings.Join(benchTests, ","))),
		transports: splitList(e.Arg("transports", defTransports)),
		dur:        e.ArgDuration("dur", 2*time.Second),
		rounds:     e.ArgInt("rounds", 3),
		latMsg:     e.ArgInt("lat_msg", 14),
		msg:        e.ArgInt("msg", 64),
		httpConns:  e.ArgInt("http_conns", 4),
		httpBody:   e.ArgInt("http_body", 64),
	}
	for _, t := range c.tests {
		if !contains(benchTests, t) {
			return c, fmt.Errorf("unknown bench test %q (have %v)", t, benchTests)
		}
	}
	if len(c.tests) == 0 || len(c.transports) == 0 || c.dur <= 0 || c.rounds <= 0 ||
		c.latMsg <= 0 || c.msg <= 0 || c.httpConns <= 0 || c.httpBody < 0 {
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
	name       string
	raw, http  dialFunc
	requireSMC bool
}

// benchListeners is one transport as the server sees it.
type benchListeners struct {
	name      string
	raw, http net.Listener
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
		go func() {
			defer wg.Done()
			for {
				c, err := l.raw.Accept()
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
		}()
	}
	select {
	case <-quit:
	case <-ctx.Done():
		fail(fmt.Errorf("bench server: %w before the client said quit", ctx.Err()))
		stop()
	}
	for i, l := range lns {
		l.raw.Close()
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
		buf := make([]byte, benchChunk)
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

// requireSMC wraps an SMC-D dial so that a silent fallback to TCP fails the
// measurement instead of being reported as SMC-D.
func requireSMC(d dialFunc) dialFunc {
	return func(ctx context.Context) (net.Conn, error) {
		c, err := d(ctx)
		if err != nil {
			return nil, err
		}
		if !smcd.IsSMC(c) {
			c.Close()
			return nil, errors.New("connection fell back to TCP (not SMC-D)")
		}
		return c, nil
	}
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
// short warm-up) and returns the number of round trips and their time; it
// stores the slowest round trip in *slowest.
func measurePingPong(ctx context.Context, dial dialFunc, size int, dur time.Duration, slowest *time.Duration) (int, time.Duration, error) {
	c, err := dial(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(dur + 30*time.Second))
	hdr := []byte{opEcho, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], uint32(size))
	if _, err := c.Write(hdr); err != nil {
		return 0, 0, err
	}
	req, resp := make([]byte, size), make([]byte, size)
	one := func(i int) error {
		binary.LittleEndian.PutUint32(req, uint32(i)) // size >= 4 checked by caller
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
			return 0, 0, fmt.Errorf("warm-up: %w", err)
		}
	}
	n := 0
	start := time.Now()
	end := start.Add(dur)
	for t0 := start; t0.Before(end); {
		if err := one(n); err != nil {
			return n, 0, fmt.Errorf("round trip %d: %w", n, err)
		}
		n++
		t1 := time.Now()
		*slowest = max(*slowest, t1.Sub(t0))
		t0 = t1
	}
	return n, time.Since(start), nil
}

// measureHTTP runs conns keep-alive clients doing GET for dur and returns the
// completed requests and their time. Each client has its own http.Transport
// limited to one connection (as wrk's connections are independent), so no
// request waits for, or dials beside, another client's connection.
func measureHTTP(ctx context.Context, dial dialFunc, conns, body int, dur time.Duration) (int64, time.Duration, error) {
	var dials atomic.Int32
	clients := make([]*http.Client, conns)
	for i := range clients {
		tr := &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				dials.Add(1)
				return dial(ctx)
			},
			MaxConnsPerHost:     1,
			MaxIdleConnsPerHost: 1,
			DisableCompression:  true,
			IdleConnTimeout:     time.Minute,
		}
		defer tr.CloseIdleConnections()
		clients[i] = &http.Client{Transport: tr, Timeout: dur + 30*time.Second}
	}
	get := func(cl *http.Client) error {
		r, err := cl.Get("http://bench/")
		if err != nil {
			return err
		}
		n, err := io.Copy(io.Discard, r.Body)
		r.Body.Close()
		if err != nil {
			return err
		}
		if r.StatusCode != http.StatusOK || n != int64(body) {
			return fmt.Errorf("status %d, %d body bytes (want 200, %d)", r.StatusCode, n, body)
		}
		return nil
	}
	// Warm-up: every client's connection is open before the clock starts.
	var wg sync.WaitGroup
	errs := make([]error, conns)
	for i := range conns {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = get(clients[i]) }()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return 0, 0, fmt.Errorf("warm-up: %w", err)
	}
	var reqs atomic.Int64
	start := time.Now()
	end := start.Add(dur)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				if err := get(clients[i]); err != nil {
					errs[i] = err
					return
				}
				reqs.Add(1)
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return reqs.Load(), el, err
	}
	if d := dials.Load(); int(d) != conns {
		return reqs.Load(), el, fmt.Errorf("%d dials for %d keep-alive clients", d, conns)
	}
	return reqs.Load(), el, nil
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

// measure runs one test once over one transport.
func measure(ctx context.Context, c benchConfig, test string, t benchTransport) (float64, string, error) {
	switch test {
	case "tput":
		n, el, err := measureStream(ctx, t.raw, benchChunk, c.dur)
		if err != nil {
			return 0, "", err
		}
		return float64(n) / el.Seconds() / 1e6, fmt.Sprintf("%d bytes in %v", n, el.Round(time.Millisecond)), nil
	case "msgrate":
		n, el, err := measureStream(ctx, t.raw, c.msg, c.dur)
		if err != nil {
			return 0, "", err
		}
		msgs := n / int64(c.msg)
		return float64(msgs) / el.Seconds(), fmt.Sprintf("%d msgs of %d B in %v", msgs, c.msg, el.Round(time.Millisecond)), nil
	case "lat":
		var slowest time.Duration
		n, el, err := measurePingPong(ctx, t.raw, c.latMsg, c.dur, &slowest)
		if err != nil {
			return 0, "", err
		}
		if n == 0 {
			return 0, "", errors.New("no round trip completed")
		}
		return float64(el.Microseconds()) / float64(n), fmt.Sprintf("%d round trips of %d B in %v, slowest %v",
			n, c.latMsg, el.Round(time.Millisecond), slowest.Round(time.Microsecond)), nil
	case "http":
		n, el, err := measureHTTP(ctx, t.http, c.httpConns, c.httpBody, c.dur)
		if err != nil {
			return 0, "", err
		}
		return float64(n) / el.Seconds(), fmt.Sprintf("%d requests over %d connections in %v", n, c.httpConns, el.Round(time.Millisecond)), nil
	}
	return 0, "", fmt.Errorf("unknown test %q", test)
}

// maxBenchFailures ends a run early: a transport that keeps failing would
// only burn the guest's time.
const maxBenchFailures = 3

// runBench runs every test, round and transport and reports each sample
// (through report) as it is measured. The order of transports rotates by
// round. A failed measurement is reported (fail) and the run goes on, so one
// stalled connection does not cost every other figure; after
// maxBenchFailures it stops with an error.
func runBench(ctx context.Context, c benchConfig, ts []benchTransport, report func(benchSample), fail func(benchSample, error)) error {
	if c.latMsg < 4 {
		return fmt.Errorf("lat_msg %d: at least 4 bytes", c.latMsg)
	}
	failures := 0
	for _, test := range c.tests {
		for r := range c.rounds {
			for k := range ts {
				t := ts[(k+r)%len(ts)]
				if err := ctx.Err(); err != nil {
					return err
				}
				s := benchSample{test: test, transport: t.name, round: r}
				v, detail, err := measure(ctx, c, test, t)
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

func reportBenchConfig(e *Env, c benchConfig, dmb int) {
	e.Result("bench.config", fmt.Sprintf("dur=%v rounds=%d lat_msg=%d msg=%d http_conns=%d http_body=%d dmb_size=%d chunk=%d transports=%s",
		c.dur, c.rounds, c.latMsg, c.msg, c.httpConns, c.httpBody, dmb, benchChunk, strings.Join(c.transports, ",")))
}

// serverTransports are the transports a bench server offers, in port order.
var serverTransports = []string{"smcd", "tcp"}

func benchServerScenario(e *Env) error {
	dev, closeDev, err := openSMC(e)
	if err != nil {
		return err
	}
	defer closeDev()
	port := e.ArgInt("port", 7100)
	dmb := e.ArgInt("dmb_size", smcd.DefaultDMBSize)
	srv := &smcd.Server{DMBSize: dmb, Logf: e.Logf}
	var lns []benchListeners
	defer func() {
		for _, l := range lns {
			l.raw.Close()
			l.http.Close()
		}
	}()
	for i, name := range serverTransports {
		listen := func(p int) (net.Listener, error) {
			if name == "smcd" {
				return srv.Listen(dev, "tcp", fmt.Sprintf(":%d", p))
			}
			return net.Listen("tcp", fmt.Sprintf(":%d", p))
		}
		raw, err := listen(port + 2*i)
		if err != nil {
			return err
		}
		h, err := listen(port + 2*i + 1)
		if err != nil {
			raw.Close()
			return err
		}
		lns = append(lns, benchListeners{name: name, raw: raw, http: h})
	}
	e.Result("bench.listening", port)
	return benchServe(e.Ctx, e, lns, e.ArgInt("http_body", 64))
}

func benchClientScenario(e *Env) error {
	c, err := benchConfigOf(e, "smcd,tcp")
	if err != nil {
		return err
	}
	dev, closeDev, err := openSMC(e)
	if err != nil {
		return err
	}
	defer closeDev()
	dmb := e.ArgInt("dmb_size", smcd.DefaultDMBSize)
	host := e.Arg("connect", "169.254.7.1")
	port := e.ArgInt("port", 7100)
	addr := func(p int) string { return net.JoinHostPort(host, fmt.Sprint(p)) }
	sd := &smcd.Dialer{DMBSize: dmb}
	var ts []benchTransport
	for i, name := range serverTransports {
		if !contains(c.transports, name) {
			continue
		}
		raw, h := addr(port+2*i), addr(port+2*i+1)
		t := benchTransport{name: name}
		if name == "smcd" {
			t.raw = requireSMC(func(ctx context.Context) (net.Conn, error) { return sd.DialContext(ctx, dev, "tcp", raw) })
			t.http = requireSMC(func(ctx context.Context) (net.Conn, error) { return sd.DialContext(ctx, dev, "tcp", h) })
		} else {
			var nd net.Dialer
			t.raw = func(ctx context.Context) (net.Conn, error) { return nd.DialContext(ctx, "tcp", raw) }
			t.http = func(ctx context.Context) (net.Conn, error) { return nd.DialContext(ctx, "tcp", h) }
		}
		ts = append(ts, t)
	}
	if len(ts) != len(c.transports) {
		return fmt.Errorf("transports %v: the server offers %v", c.transports, serverTransports)
	}
	// The server guest may still be booting: wait for its plain TCP port.
	ctl := addr(port + 2) // tcp raw
	if err := waitListening(e.Ctx, ctl); err != nil {
		return err
	}
	defer sendQuit(ctl)
	reportBenchConfig(e, c, dmb)
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

// localTransports sets up the listeners and dialers of bench-local: smcd
// over dev (nil: no smcd), tcp over 127.0.0.1, unix (abstract sockets).
func localTransports(dev smcd.Device, dmb int, names []string) ([]benchListeners, []benchTransport, error) {
	var lns []benchListeners
	var ts []benchTransport
	closeAll := func() {
		for _, l := range lns {
			l.raw.Close()
			l.http.Close()
		}
	}
	for _, name := range names {
		var listen func() (net.Listener, error)
		var dial func(ctx context.Context, addr string) (net.Conn, error)
		var nd net.Dialer
		switch name {
		case "smcd":
			if dev == nil {
				closeAll()
				return nil, nil, errors.New("smcd: no device")
			}
			srv := &smcd.Server{DMBSize: dmb}
			sd := &smcd.Dialer{DMBSize: dmb}
			listen = func() (net.Listener, error) { return srv.Listen(dev, "tcp", "127.0.0.1:0") }
			dial = func(ctx context.Context, addr string) (net.Conn, error) { return sd.DialContext(ctx, dev, "tcp", addr) }
		case "tcp":
			listen = func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }
			dial = func(ctx context.Context, addr string) (net.Conn, error) { return nd.DialContext(ctx, "tcp", addr) }
		case "unix":
			// Abstract names: no file system needed, nothing to remove.
			n := 0
			listen = func() (net.Listener, error) {
				n++
				return net.Listen("unix", fmt.Sprintf("@ism-bench-%d-%d-%d", time.Now().UnixNano(), len(lns), n))
			}
			dial = func(ctx context.Context, addr string) (net.Conn, error) { return nd.DialContext(ctx, "unix", addr) }
		default:
			closeAll()
			return nil, nil, fmt.Errorf("unknown transport %q (have smcd, tcp, unix)", name)
		}
		raw, err := listen()
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("%s: %w", name, err)
		}
		h, err := listen()
		if err != nil {
			raw.Close()
			closeAll()
			return nil, nil, fmt.Errorf("%s: %w", name, err)
		}
		lns = append(lns, benchListeners{name: name, raw: raw, http: h})
		ra, ha := raw.Addr().String(), h.Addr().String()
		t := benchTransport{name: name,
			raw:  func(ctx context.Context) (net.Conn, error) { return dial(ctx, ra) },
			http: func(ctx context.Context) (net.Conn, error) { return dial(ctx, ha) },
		}
		if name == "smcd" {
			t.raw, t.http = requireSMC(t.raw), requireSMC(t.http)
		}
		ts = append(ts, t)
	}
	return lns, ts, nil
}

// benchLocal runs server and client in one process; the client's error
// comes first, and the server is told to quit in any case.
func benchLocal(ctx context.Context, e *Env, dev smcd.Device, dmb int, c benchConfig, report func(benchSample), fail func(benchSample, error)) error {
	lns, ts, err := localTransports(dev, dmb, c.transports)
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
	c, err := benchConfigOf(e, "smcd,tcp,unix")
	if err != nil {
		return err
	}
	var dev smcd.Device
	if contains(c.transports, "smcd") {
		d, closeDev, err := openSMC(e)
		if err != nil {
			return err
		}
		defer closeDev()
		dev = d
	}
	dmb := e.ArgInt("dmb_size", smcd.DefaultDMBSize)
	reportBenchConfig(e, c, dmb)
	e.Logf("bench: %d tests x %d rounds x %d transports x %v", len(c.tests), c.rounds, len(c.transports), c.dur)
	return benchLocal(e.Ctx, e, dev, dmb, c, reportTo(e), failTo(e))
}
