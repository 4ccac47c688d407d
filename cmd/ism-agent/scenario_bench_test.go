package main

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

func testEnv(t *testing.T, args map[string]string) *Env {
	f, err := os.Create(t.TempDir() + "/out")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &Env{Args: args, Ctx: context.Background(), out: f}
}

// TestBenchLocal runs every measurement over every local transport (SMC-D
// on the in-process loopback device, in attach mode and copy-only) and
// checks that each reports a figure, the latency its percentiles too.
func TestBenchLocal(t *testing.T) {
	e := testEnv(t, map[string]string{"dur": "300ms", "rounds": "2", "conns": "32"})
	transports := []string{tSMCAttach, tSMCCopy, tTCP, tUnix}
	c, err := benchConfigOf(e, strings.Join(transports, ","))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]benchSample{}
	var order []string
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dev := smcd.NewLoopback()
	dev.AttachMode = true
	err = benchLocal(ctx, e, dev, c, func(s benchSample) {
		got[s.key()] = s
		order = append(order, s.key())
	}, func(s benchSample, err error) { t.Errorf("%s: %v", s.key(), err) })
	if err != nil {
		t.Fatal(err)
	}
	for _, test := range append(benchTests, "lat_p99", "lat_p999", "http_p99") {
		for _, tr := range transports {
			for r := range 2 {
				s, ok := got[benchSample{test: test, transport: tr, round: r}.key()]
				if !ok || !(s.value > 0) {
					t.Errorf("%s %s round %d: %+v (present %v)", test, tr, r, s, ok)
				}
			}
		}
	}
	for _, tr := range transports {
		p50, p99, p999 := got["bench.lat."+tr+".0"].value, got["bench.lat_p99."+tr+".0"].value, got["bench.lat_p999."+tr+".0"].value
		if !(p50 <= p99 && p99 <= p999) {
			t.Errorf("%s: percentiles out of order: p50 %v p99 %v p99.9 %v", tr, p50, p99, p999)
		}
	}
	// Rotated order: round 0 starts with the first transport, round 1 with the second.
	if len(order) < 8 || order[0] != "bench.tput.smcd-attach.0" || order[4] != "bench.tput.smcd-copy.1" {
		t.Errorf("order %v", order)
	}
}

// TestRequireMode: a connection that fell back to TCP, or that moves data
// in the other mode, must not count under the transport's name.
func TestRequireMode(t *testing.T) {
	dev := smcd.NewLoopback()
	for _, tc := range []struct {
		name   string
		srv    smcd.Server
		want   smcd.Mode
		errSub string
	}{
		{"fallback", smcd.Server{ForceDecline: smcd.DeclineNoSMCDDev}, smcd.ModeCopy, "fell back"},
		{"copy, not attach", smcd.Server{}, smcd.ModeAttach, "want attach"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := tc.srv.Listen(dev, "tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go serveRawAll(ln)
			d := &smcd.Dialer{}
			dial := requireMode(tc.want, func(ctx context.Context) (net.Conn, error) {
				return d.DialContext(ctx, dev, "tcp", ln.Addr().String())
			})
			_, _, err = measureStream(context.Background(), dial, 100, 10*time.Millisecond)
			if err == nil || !strings.Contains(err.Error(), tc.errSub) {
				t.Fatalf("measureStream: %v, want an error with %q", err, tc.errSub)
			}
		})
	}
}

func TestPercentile(t *testing.T) {
	d := make([]time.Duration, 1000)
	for i := range d {
		d[i] = time.Duration(i + 1)
	}
	for _, c := range []struct {
		p    float64
		want time.Duration
	}{{50, 500}, {99, 990}, {99.9, 999}, {100, 1000}} {
		if got := percentile(d, c.p); got != c.want {
			t.Errorf("p%v = %v, want %v", c.p, got, c.want)
		}
	}
	if percentile(nil, 50) != 0 || percentile(d[:1], 99.9) != 1 {
		t.Error("edge cases")
	}
}

func TestBenchConfig(t *testing.T) {
	e := testEnv(t, map[string]string{"tests": "lat, http", "transports": "tcp"})
	c, err := benchConfigOf(e, "smcd-copy,tcp")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.tests, ",") != "lat,http" || strings.Join(c.transports, ",") != "tcp" || c.dur != 2*time.Second || c.rounds != 3 ||
		c.latMsg != 14 || c.msg != 100 || c.tputMsg != 64000 || c.conns != 32 {
		t.Fatalf("config %+v", c)
	}
	if _, err := benchConfigOf(testEnv(t, map[string]string{"tests": "tput,bogus"}), "tcp"); err == nil {
		t.Fatal("unknown test accepted")
	}
	if _, err := benchConfigOf(testEnv(t, map[string]string{"rounds": "0"}), "tcp"); err == nil {
		t.Fatal("rounds=0 accepted")
	}
}

// TestRunBenchFailures: failed measurements are reported and skipped; the
// third ends the run.
func TestRunBenchFailures(t *testing.T) {
	c := benchConfig{tests: []string{"lat"}, transports: []string{"bad", "tcp"}, dur: 50 * time.Millisecond, rounds: 5, latMsg: 14}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveRawAll(ln)
	var nd net.Dialer
	good := func(ctx context.Context) (net.Conn, error) { return nd.DialContext(ctx, "tcp", ln.Addr().String()) }
	bad := func(ctx context.Context) (net.Conn, error) { return nil, errors.New("no route") }
	var ok, failed []string
	err = runBench(context.Background(), c, []benchTransport{{name: "bad", raw: bad}, {name: "tcp", raw: good}},
		func(s benchSample) {
			if s.test == "lat" { // not its percentiles
				ok = append(ok, s.key())
			}
		},
		func(s benchSample, err error) { failed = append(failed, s.key()) })
	if err == nil || !strings.Contains(err.Error(), "3 failed") {
		t.Fatalf("runBench: %v, want the third failure to end it", err)
	}
	// Rotation: round 0 bad, tcp; round 1 tcp, bad; round 2 bad (third
	// failure: the end), so tcp ran twice.
	if len(failed) != 3 || len(ok) != 2 || failed[2] != "bench.lat.bad.2" || ok[1] != "bench.lat.tcp.1" {
		t.Fatalf("ok %v, failed %v", ok, failed)
	}
}

// serveRawAll serves every connection ln accepts with serveRaw, until ln closes.
func serveRawAll(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() { defer c.Close(); serveRaw(c, func() {}) }()
	}
}
