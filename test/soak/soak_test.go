// Package soak is `make soak`: guests in pairs on one backend, SHA-256
// checked SMC-D streams in both modes for as long as asked, guests killed and
// restarted, the backend's memory and descriptors sampled. Not part of
// `make test`: it runs for half an hour by default.
package soak

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// TestSoak runs only with ISM_SOAK=1 (and the VM harness's variables).
// Knobs: ISM_SOAK_DURATION (default 30m), ISM_SOAK_GUESTS (even, at least
// 4; default 4), ISM_SOAK_SEED (the kill schedule's; default from the
// clock, printed).
//
// The guests form pairs, each with its own network link for the CLC
// handshake, all on one backend: a soak-server (cmd/ism-agent) and a
// soak-client with two stream loops, one in attach mode, one forced to copy
// mode. Pair 0 is never disturbed and must see no error at all. In every
// other pair the host kills the client's QEMU (SIGKILL) at a random moment
// once that incarnation has completed a stream in each mode, and boots a
// new one on the same socket, until the time is up. The backend's RSS and
// anonymous memory (RssAnon: its heap and stacks; the guests' RAM it maps is
// shared memory and counts as RssShmem, growing with the pages touched) and
// open descriptors are sampled every 10 s, and the descriptors again each
// time a killed client's successor is up and streaming.
//
// It fails on any stream whose SHA-256 differs (data lost or changed), on
// any error in pair 0, on an incarnation that never completes a stream in
// each mode, on the backend exiting, and on the backend's memory or
// descriptors growing (see checkFlat).
func TestSoak(t *testing.T) {
	if os.Getenv("ISM_SOAK") != "1" {
		t.Skip("ISM_SOAK=1 not set (make soak)")
	}
	dur, err := time.ParseDuration(envOr("ISM_SOAK_DURATION", "30m"))
	if err != nil || dur <= 0 {
		t.Fatalf("ISM_SOAK_DURATION: %v", err)
	}
	guests, err := strconv.Atoi(envOr("ISM_SOAK_GUESTS", "4"))
	if err != nil || guests < 4 || guests%2 != 0 {
		t.Fatalf("ISM_SOAK_GUESTS=%q: want an even number, at least 4", os.Getenv("ISM_SOAK_GUESTS"))
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("ISM_SOAK_SEED"); s != "" {
		if seed, err = strconv.ParseUint(s, 0, 64); err != nil {
			t.Fatalf("ISM_SOAK_SEED: %v", err)
		}
	}
	t.Logf("soak: %d guests in %d pairs for %v, kill schedule seed %d (ISM_SOAK_SEED)", guests, guests/2, dur, seed)

	r := vmharness.New(t)
	r.RequireBackend()
	args := []string{"-socket-dir", r.Dir, "-stats-file", r.Path("stats.json"), "-stats-interval", "10s"}
	var socks []string
	pairs := make([]*pair, guests/2)
	for i := range pairs {
		p := &pair{idx: i, server: fmt.Sprintf("s%d", i), client: fmt.Sprintf("c%d", i), churn: i > 0}
		pairs[i] = p
		for _, name := range []string{p.server, p.client} {
			args = append(args, "-vm", name)
			socks = append(socks, r.Path(name+".sock"))
		}
	}
	b := r.StartBackend(args, socks...)
	mon := startSampler(b.PID(), 10*time.Second)
	// With more than one pair killing clients, "a restarted client is
	// up" says nothing about the others: the count is only reported.
	mon.checkFDs = len(pairs) == 2
	defer mon.stop()

	end := time.Now().Add(dur)
	for _, p := range pairs {
		p.srvNet, p.cliNet = r.NetPair()
		p.srv = r.StartVM(vmharness.VMConfig{Name: p.server, Scenario: "soak-server", Net: &p.srvNet, Control: true,
			Timeout: dur + 10*time.Minute, HugePages: 16,
			Args: map[string]string{"ip": "169.254.7.1/24", "clc_timeout": "60s"},
			ISM:  []vmharness.ISMDevice{{Socket: r.Path(p.server + ".sock")}}})
	}
	var wg sync.WaitGroup
	for _, p := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Each pair its own generator: the schedule stays the
			// seed's, whatever order the pairs run in.
			p.run(t, r, end, rand.New(rand.NewPCG(seed, uint64(p.idx))), mon)
		}()
	}
	wg.Wait()
	for _, p := range pairs {
		if err := p.srv.Send("stop"); err != nil {
			t.Errorf("%s: %v", p.server, err)
		}
	}
	for _, p := range pairs {
		o, _, err := p.srv.Wait(0)
		p.srvOut = o
		if err != nil || !o.OK {
			t.Errorf("%s: %v %s", p.server, err, o.Fail)
		}
	}
	if exited, err := b.Exited(); exited {
		t.Errorf("backend exited: %v", err)
	}
	mon.stop()
	report(t, pairs, mon, b)
}

// pair is one server guest and its client guest (and the client's
// incarnations, in a churn pair).
type pair struct {
	idx            int
	server, client string
	churn          bool
	srvNet, cliNet vmharness.NetEnd
	srv            *vmharness.VM

	mu      sync.Mutex
	lives   []life // the client's incarnations
	srvOut  vmharness.Outcome
	lastErr string
}

// life is one incarnation of a client guest.
type life struct {
	name     string
	killed   bool
	ok       bool // its agent ended ok (the last one, not killed)
	results  map[string]string
	duration time.Duration
}

func (l life) n(key string) int64 {
	v, _ := strconv.ParseInt(l.results["soak."+key], 10, 64)
	return v
}

// run boots the pair's client, again and again in a churn pair, until end.
func (p *pair) run(t *testing.T, r *vmharness.Run, end time.Time, rng *rand.Rand, mon *sampler) {
	for k := 0; ; k++ {
		left := time.Until(end)
		if left < time.Minute && k > 0 {
			return
		}
		name := p.client
		if p.churn {
			name = fmt.Sprintf("%s-%d", p.client, k)
		}
		args := map[string]string{"ip": "169.254.7.2/24", "connect": "169.254.7.1:7000", "conns": "2",
			"bytes": strconv.Itoa(4 << 20), "dur": left.Round(time.Second).String(), "clc_timeout": "60s"}
		if !p.churn {
			args["strict"] = "1"
		}
		started := time.Now()
		v := r.StartVM(vmharness.VMConfig{Name: name, Scenario: "soak-client", Net: &p.cliNet,
			Timeout: left + 5*time.Minute, HugePages: 16, Args: args,
			ISM: []vmharness.ISMDevice{{Socket: r.Path(p.client + ".sock")}}})
		// Kill only an incarnation that has proved itself: a stream
		// through in each mode. Its time to then: the kill moment is
		// random within the next minute (or what is left of the run).
		if !p.churn || !waitBothModes(v, end) {
			o, took, err := v.Wait(0)
			l := life{name: name, ok: err == nil && o.OK, results: o.Results, duration: took}
			if !l.ok {
				t.Errorf("%s: %v %s", name, err, o.Fail)
			}
			p.add(l)
			return
		}
		mon.fds()
		time.Sleep(time.Duration(rng.Int64N(int64(min(time.Minute, max(time.Until(end), time.Second))))))
		o := v.Outcome()
		v.Kill()
		p.add(life{name: name, killed: true, results: o.Results, duration: time.Since(started)})
		if m := o.Results["soak.mismatch"]; m != "" && m != "0" {
			t.Errorf("%s: %s streams arrived changed", name, m)
		}
	}
}

// waitBothModes waits until the client reports a stream through in attach
// and in copy mode, or it exits, or the run's time is up. It polls the
// console: the counters come every few seconds.
func waitBothModes(v *vmharness.VM, end time.Time) bool {
	for !v.Exited() && time.Now().Before(end) {
		o := v.Outcome()
		if n(o, "ok_attach") > 0 && n(o, "ok_copy") > 0 {
			return true
		}
		time.Sleep(time.Second)
	}
	return false
}

func n(o vmharness.Outcome, key string) int64 {
	v, _ := strconv.ParseInt(o.Results["soak."+key], 10, 64)
	return v
}

func (p *pair) add(l life) {
	p.mu.Lock()
	p.lives = append(p.lives, l)
	p.mu.Unlock()
}

func report(t *testing.T, pairs []*pair, mon *sampler, b *vmharness.Backend) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n== soak ==\n")
	var mism int64
	for _, p := range pairs {
		var att, cp, errs, bytes int64
		for _, l := range p.lives {
			att += l.n("ok_attach")
			cp += l.n("ok_copy")
			errs += l.n("errors")
			bytes += l.n("bytes")
			mism += l.n("mismatch")
			if l.n("ok_attach") == 0 || l.n("ok_copy") == 0 {
				t.Errorf("pair %d: client %s completed %d attach and %d copy streams: want some of each",
					p.idx, l.name, l.n("ok_attach"), l.n("ok_copy"))
			}
		}
		kills := 0
		for _, l := range p.lives {
			if l.killed {
				kills++
			}
		}
		kind := "undisturbed"
		if p.churn {
			kind = fmt.Sprintf("client killed %d times", kills)
		}
		fmt.Fprintf(&sb, "pair %d (%s): %d streams in attach mode, %d in copy mode, %.1f MiB sent; client errors %d; server %s bytes, errors %s (last: %s)\n",
			p.idx, kind, att, cp, float64(bytes)/(1<<20), errs, p.srvOut.Results["soak.bytes"], p.srvOut.Results["soak.errors"], p.srvOut.Results["soak.last_error"])
		if !p.churn && errs > 0 {
			t.Errorf("pair %d is never disturbed but its client saw %d errors", p.idx, errs)
		}
	}
	fmt.Fprintf(&sb, "streams that arrived changed: %d\n", mism)
	if mism > 0 {
		t.Errorf("%d streams arrived with another SHA-256 than was sent", mism)
	}
	if st, err := b.ReadStats(); err == nil {
		fmt.Fprintf(&sb, "backend: %+v\n", st.Total)
	}
	mon.write(&sb)
	if err := mon.checkFlat(); err != nil {
		t.Error(err)
	}
	fmt.Print(sb.String())
}

// sampler reads the backend's RSS and descriptor count.
type sampler struct {
	pid  int
	quit chan struct{}
	once sync.Once
	done chan struct{}

	mu       sync.Mutex
	checkFDs bool // checkFlat judges the descriptors too

	anon    []int64 // RssAnon, KiB, every tick
	rss     []int64 // VmRSS, KiB, every tick
	upFDs   []int   // descriptors each time a restarted client is up
	allFDs  []int
	started time.Time
}

func startSampler(pid int, every time.Duration) *sampler {
	s := &sampler{pid: pid, quit: make(chan struct{}), done: make(chan struct{}), started: time.Now()}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			s.sample()
			select {
			case <-s.quit:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *sampler) stop() {
	s.once.Do(func() { close(s.quit) })
	<-s.done
}

func (s *sampler) sample() {
	anon, rss := readStatus(s.pid, "RssAnon:"), readStatus(s.pid, "VmRSS:")
	fds := countFDs(s.pid)
	s.mu.Lock()
	defer s.mu.Unlock()
	if anon > 0 && rss > 0 {
		s.anon = append(s.anon, anon)
		s.rss = append(s.rss, rss)
	}
	if fds > 0 {
		s.allFDs = append(s.allFDs, fds)
	}
}

// fds records the descriptor count at a moment a restarted client is up.
func (s *sampler) fds() {
	n := countFDs(s.pid)
	s.mu.Lock()
	defer s.mu.Unlock()
	if n > 0 {
		s.upFDs = append(s.upFDs, n)
	}
}

// readStatus returns a kB field of /proc/PID/status (0 if missing).
func readStatus(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == field {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	return 0
}

func countFDs(pid int) int {
	e, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	if err != nil {
		return 0
	}
	return len(e)
}

func (s *sampler) write(sb *strings.Builder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range []struct {
		name string
		v    []int64
	}{{"anonymous memory (RssAnon)", s.anon}, {"RSS with the mapped guest RAM (VmRSS)", s.rss}} {
		if len(m.v) > 0 {
			fmt.Fprintf(sb, "backend %s, MiB, %d samples: first %.1f, max %.1f, last %.1f; quarters' medians %s\n",
				m.name, len(m.v), mib(m.v[0]), mib(slices.Max(m.v)), mib(m.v[len(m.v)-1]), quarterMedians(m.v))
		}
	}
	if len(s.allFDs) > 0 {
		fmt.Fprintf(sb, "backend descriptors: every 10 s min %d max %d last %d; each time all guests were up: %v\n",
			slices.Min(s.allFDs), slices.Max(s.allFDs), s.allFDs[len(s.allFDs)-1], s.upFDs)
	}
}

// checkFlat fails a backend whose memory grows: the last quarter's median
// RssAnon above the second quarter's (the first holds the guests' boot) by
// more than 10% plus 8 MiB; or whose descriptors grow: each time a restarted
// client is up, the later half's median count above the earlier half's by
// more than fdSlack. A leak per restart (a memory table's memfds, a queue's
// eventfds) shows as several descriptors per kill.
func (s *sampler) checkFlat() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []string
	if len(s.anon) >= 8 {
		q := len(s.anon) / 4
		second, last := median(s.anon[q:2*q]), median(s.anon[len(s.anon)-q:])
		if float64(last) > float64(second)*1.1+8<<10 {
			errs = append(errs, fmt.Sprintf("backend anonymous memory grew: median %.1f MiB in the second quarter, %.1f MiB in the last", mib(second), mib(last)))
		}
	}
	if n := len(s.upFDs); s.checkFDs && n >= 2 {
		early, late := medianInt(s.upFDs[:n/2]), medianInt(s.upFDs[n/2:])
		if late > early+fdSlack {
			errs = append(errs, fmt.Sprintf("backend descriptors grew with the same guests up: %v", s.upFDs))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// fdSlack allows for the DMBs of the connections open at the moment of
// counting: attach-mode DMBs are memfds of the backend's.
const fdSlack = 8

func medianInt(v []int) int {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func quarterMedians(v []int64) string {
	if len(v) < 4 {
		return "(too few)"
	}
	q := len(v) / 4
	var parts []string
	for i := range 4 {
		hi := (i + 1) * q
		if i == 3 {
			hi = len(v)
		}
		parts = append(parts, fmt.Sprintf("%.1f", mib(median(v[i*q:hi]))))
	}
	return strings.Join(parts, " / ")
}

func median(v []int64) int64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func mib(kib int64) float64 { return float64(kib) / 1024 }

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
