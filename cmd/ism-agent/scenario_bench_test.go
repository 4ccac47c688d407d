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
// on the in-process loopback device) and checks that each reports a figure.
func TestBenchLocal(t *testing.T) {
	e := testEnv(t, map[string]string{"dur": "100ms", "rounds": "2", "http_conns": "2"})
	c, err := benchConfigOf(e, "smcd,tcp,unix")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]benchSample{}
	var order []string
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err = benchLocal(ctx, e, smcd.NewLoopback(), smcd.DefaultDMBSize, c, func(s benchSample) {
		got[s.key()] = s
		order = append(order, s.key())
	}, func(s benchSample, err error) { t.Errorf("%s: %v", s.key(), err) })
	if err != nil {
		t.Fatal(err)
	}
	for _, test := range benchTests {
		for _, tr := range []string{"smcd", "tcp", "unix"} {
			for r := range 2 {
				s, ok := got[benchSample{test: test, transport: tr, round: r}.key()]
				if !ok || !(s.value > 0) {
					t.Errorf("%s %s round %d: %+v (present %v)", test, tr, r, s, ok)
				}
			}
		}
	}
	// Rotated order: round 0 starts with smcd, round 1 with tcp.
	if len(order) < 6 || order[0] != "bench.tput.smcd.0" || order[3] != "bench.tput.tcp.1" {
		t.Errorf("order %v", order)
	}
}

// TestRequireSMC: a connection that fell back to TCP must not count as SMC-D.
func TestRequireSMC(t *testing.T) {
	dev := smcd.NewLoopback()
	srv := &smcd.Server{ForceDecline: smcd.DeclineNoSMCDDev}
	ln, err := srv.Listen(dev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveRawAll(ln)
	d := &smcd.Dialer{}
	dial := requireSMC(func(ctx context.Context) (net.Conn, error) {
		return d.DialContext(ctx, dev, "tcp", ln.Addr().String())
	})
	_, _, err = measureStream(context.Background(), dial, 100, 10*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "fell back") {
		t.Fatalf("measureStream over a declined connection: %v, want a fallback error", err)
	}
}

func TestBenchConfig(t *testing.T) {
	e := testEnv(t, map[string]string{"tests": "lat, http", "transports": "tcp"})
	c, err := benchConfigOf(e, "smcd,tcp")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.tests, ",") != "lat,http" || strings.Join(c.transports, ",") != "tcp" || c.dur != 2*time.Second || c.rounds != 3 || c.latMsg != 14 {
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
		func(s benchSample) { ok = append(ok, s.key()) },
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
