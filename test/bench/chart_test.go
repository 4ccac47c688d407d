package bench

import (
	"bytes"
	"encoding/xml"
	"errors"
	"flag"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// synthReport is a made-up but plausible run: both scopes, every test, 5
// rounds with some jitter, a noisy cell, an SMC-D tail latency worse than
// TCP's, and one transport that failed every round of one test. The tests
// here and cmd/benchchart's share it through testdata/synth.json.
func synthReport() *Report {
	base := map[string]map[string][]float64{ // scope -> test -> smcd-attach, smcd-copy, tcp, unix
		"inter-VM": {
			"tput":     {950, 720, 310, 0},
			"tput32":   {1480, 1150, 590, 0},
			"lat":      {41, 47, 118, 0},
			"lat_p99":  {88, 104, 260, 0},
			"lat_p999": {420, 380, 330, 0},
			"msgrate":  {21500, 18200, 8100, 0},
			"http":     {31000, 28500, 19800, 0},
			"http_p99": {2100, 2400, 3300, 0},
		},
		"intra-VM": {
			"tput":     {2600, 1850, 1450, 3100},
			"tput32":   {3900, 2900, 2300, 4700},
			"lat":      {22, 25, 38, 14},
			"lat_p99":  {51, 60, 95, 33},
			"lat_p999": {300, 210, 240, 120},
			"msgrate":  {41000, 36000, 24500, 61000},
			"http":     {52000, 0, 40500, 57000}, // smcd-copy: every round failed
			"http_p99": {1300, 0, 1700, 1100},
		},
	}
	jitter := []float64{1.00, 0.97, 1.03, 0.98, 1.02}
	var s []Sample
	var fails []Failure
	for _, scope := range Scopes {
		for ti, t := range Tests {
			for tri, tr := range []string{"smcd-attach", "smcd-copy", "tcp", "unix"} {
				v := base[scope][t.Name][tri]
				if tr == "unix" && scope == "inter-VM" {
					continue
				}
				for round, j := range jitter {
					if v == 0 {
						fails = append(fails, Failure{scope, t.Name, tr, round, "no answer within 32s"})
						continue
					}
					// Rotate the jitter by transport and test, so the
					// ratios vary from round to round too.
					f := jitter[(round+tri+ti)%len(jitter)]
					if scope == "intra-VM" && t.Name == "lat_p999" && tr == "smcd-attach" {
						f *= []float64{1, 0.6, 1.4, 0.8, 1.2}[round] // noisy: the middle half spreads over 25%
					}
					s = append(s, Sample{scope, t.Name, tr, round, math.Round(v*f*j*100) / 100})
				}
			}
		}
	}
	r := NewReport(s)
	r.Failures = fails
	r.Started = time.Date(2025, 6, 1, 12, 34, 56, 0, time.UTC)
	r.Accel, r.QEMU, r.Host = "kvm", "QEMU emulator version 9.2.0", "bench-host, 16 CPUs"
	r.VCPUs, r.Rounds, r.Dur = 1, 5, "2s"
	r.Load = "0.10 0.20 0.30 -> 1.10 0.90 0.50"
	r.Config = map[string]string{"inter-VM": "dur=2s rounds=5", "intra-VM": "dur=2s rounds=5"}
	r.Duration = "7m12s"
	return r
}

// checkXML decodes the whole document and returns its root element's name.
func checkXML(t *testing.T, doc []byte) string {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(doc))
	root, depth := "", 0
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v", err)
		}
		switch e := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				if root != "" {
					t.Fatalf("a second root element %s", e.Name.Local)
				}
				root = e.Name.Space + " " + e.Name.Local
			}
			depth++
		case xml.EndElement:
			depth--
		}
	}
	if depth != 0 {
		t.Fatalf("unbalanced elements: depth %d at the end", depth)
	}
	return root
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (go test ./test/bench -run %s -update writes it)", err, t.Name())
	}
	if !bytes.Equal(got, want) {
		gl, wl := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
		for i := range min(len(gl), len(wl)) {
			if gl[i] != wl[i] {
				t.Fatalf("%s differs from the output (-update rewrites it), first at line %d:\ngot  %s\nwant %s", path, i+1, gl[i], wl[i])
			}
		}
		t.Fatalf("%s differs from the output (-update rewrites it): %d lines, want %d", path, len(gl), len(wl))
	}
}

func TestRenderChart(t *testing.T) {
	r := synthReport()
	var a, b bytes.Buffer
	if err := r.WriteSVG(&a); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("two renderings differ")
	}
	if root := checkXML(t, a.Bytes()); root != "http://www.w3.org/2000/svg svg" {
		t.Errorf("root element %q", root)
	}
	out := a.String()
	for _, want := range []string{
		"accelerator kvm · 1 vCPU per guest · 5 rounds × 2s per transport · 2025-06-01 12:34 UTC",
		`<g id="panel-inter-VM">`, `<g id="panel-intra-VM">`,
		"above 1 = SMC-D better", "tcp/smcd", "smcd-attach", "smcd-copy",
		"10 measurements failed", // intra-VM http smcd-copy, every round
		"n/a",                    // and so no bar there
		"*</text>",               // the noisy intra-VM lat_p999 smcd-attach
		"QEMU emulator version 9.2.0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("chart lacks %q", want)
		}
	}
	// The JSON shared with cmd/benchchart's test is this report.
	js, err := r.EncodeJSON()
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "synth.json", js)
	golden(t, "synth.svg", a.Bytes())
}

func TestChartOrientation(t *testing.T) {
	// Latency: smcd/tcp 0.5 (SMC-D twice as fast) is drawn as tcp/smcd 2,
	// its range inverted end for end.
	b := orient(Ratio{Value: 0.5, Min: 0.25, Max: 0.8, Rounds: 3}, true)
	if b.value != 2 || b.lo != 1.25 || b.hi != 4 {
		t.Errorf("latency bar %+v", b)
	}
	b = orient(Ratio{Value: 0.5, Min: 0.25, Max: 0.8, Rounds: 3}, false)
	if b.value != 0.5 || b.lo != 0.25 || b.hi != 0.8 {
		t.Errorf("throughput bar %+v", b)
	}
	if b := orient(Ratio{Value: 0, Min: 0, Max: 0}, true); !math.IsInf(b.value, 1) {
		t.Errorf("latency 0: %+v", b)
	}
}

func TestChartScale(t *testing.T) {
	for _, c := range []struct{ x, below, above float64 }{
		{1, 1, 1}, {1.3, 1, 2}, {3, 2, 5}, {7, 5, 10}, {0.07, 0.05, 0.1}, {0.031, 0.02, 0.05}, {120, 100, 200},
	} {
		if got := niceBelow(c.x); got != c.below {
			t.Errorf("niceBelow(%v) = %v, want %v", c.x, got, c.below)
		}
		if got := niceAbove(c.x); got != c.above {
			t.Errorf("niceAbove(%v) = %v, want %v", c.x, got, c.above)
		}
	}
	if got := chartTicks(0.05, 2); !equalFloats(got, []float64{0.05, 0.1, 0.2, 0.5, 1, 2}) {
		t.Errorf("ticks %v", got)
	}
	if got := chartTicks(0.001, 1000); !equalFloats(got, []float64{0.001, 0.01, 0.1, 1, 10, 100, 1000}) {
		t.Errorf("ticks %v", got)
	}
}

func equalFloats(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestRenderChartEmpty(t *testing.T) {
	var b bytes.Buffer
	if err := NewReport(nil).WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	checkXML(t, b.Bytes())
	if !strings.Contains(b.String(), "no samples") {
		t.Errorf("empty chart:\n%s", b.String())
	}
}
