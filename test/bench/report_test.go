package bench

import (
	"bytes"
	"encoding/csv"
	"math"
	"strings"
	"testing"
)

func TestParseResults(t *testing.T) {
	got, fails, err := ParseResults("inter-VM", map[string]string{
		"bench.http.smcd.2.error": "Get: timeout",
		"bench.tput.tcp.1":        "50",
		"bench.tput.smcd.0":       "120.5",
		"bench.tput.tcp.0":        "40",
		"bench.lat.smcd.0":        "900",
		"bench.config":            "dur=2s",
		"bench.listening":         "7100",
		"client_seconds":          "3",
		"agent.scenario_secs":     "1",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []Sample{
		{"inter-VM", "tput", "smcd", 0, 120.5},
		{"inter-VM", "tput", "tcp", 0, 40},
		{"inter-VM", "tput", "tcp", 1, 50},
		{"inter-VM", "lat", "smcd", 0, 900},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("sample %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
	if len(fails) != 1 || fails[0] != (Failure{"inter-VM", "http", "smcd", 2, "Get: timeout"}) {
		t.Errorf("failures %+v", fails)
	}
	for _, bad := range []map[string]string{
		{"bench.tput.smcd.x": "1"},
		{"bench.tput.smcd.0": "fast"},
		{"bench.tput.smcd.0": "NaN"},
		{"bench.tput.smcd.0": "-1"},
		{"bench.bogus.smcd.0": "1"},
		{"bench.tput.smcd.x.error": "e"},
	} {
		if s, _, err := ParseResults("x", bad); err == nil {
			t.Errorf("ParseResults(%v) = %v, want an error", bad, s)
		}
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		in := append([]float64(nil), c.in...)
		if got := Median(c.in); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.in, got, c.want)
		}
		for i := range in {
			if in[i] != c.in[i] {
				t.Fatalf("Median sorted its argument: %v", c.in)
			}
		}
	}
	if !math.IsNaN(Median(nil)) {
		t.Error("Median(nil) is not NaN")
	}
}

func samples() []Sample {
	var s []Sample
	add := func(scope, test, tr string, v ...float64) {
		for i, x := range v {
			s = append(s, Sample{scope, test, tr, i, x})
		}
	}
	add("intra-VM", "lat", "unix", 10, 12, 11)
	add("intra-VM", "lat", "smcd", 30, 20, 40)
	add("intra-VM", "lat", "tcp", 15, 15, 15)
	add("inter-VM", "tput", "tcp", 100, 80, 120)
	add("inter-VM", "tput", "smcd", 300, 200, 250)
	return s
}

func TestAggregateAndRatios(t *testing.T) {
	cells := Aggregate(samples())
	want := []Cell{
		{"inter-VM", "tput", "MB/s", "smcd", 3, 250, 200, 300},
		{"inter-VM", "tput", "MB/s", "tcp", 3, 100, 80, 120},
		{"intra-VM", "lat", "us/RTT", "smcd", 3, 30, 20, 40},
		{"intra-VM", "lat", "us/RTT", "tcp", 3, 15, 15, 15},
		{"intra-VM", "lat", "us/RTT", "unix", 3, 11, 10, 12},
	}
	if len(cells) != len(want) {
		t.Fatalf("cells %+v", cells)
	}
	for i := range want {
		if cells[i] != want[i] {
			t.Errorf("cell %d: got %+v, want %+v", i, cells[i], want[i])
		}
	}
	if s := cells[2].Spread(); math.Abs(s-20.0/30) > 1e-9 {
		t.Errorf("spread %v", s)
	}
	rs := Ratios(cells)
	type k struct{ scope, test, pair string }
	got := map[k]Ratio{}
	for _, r := range rs {
		got[k{r.Scope, r.Test, r.Num + "/" + r.Den}] = r
	}
	if len(rs) != 3 {
		t.Fatalf("ratios %+v", rs)
	}
	if r := got[k{"inter-VM", "tput", "smcd/tcp"}]; r.Value != 2.5 || !r.Better {
		t.Errorf("inter tput smcd/tcp %+v", r)
	}
	// Latency: a higher ratio is worse.
	if r := got[k{"intra-VM", "lat", "smcd/tcp"}]; r.Value != 2 || r.Better {
		t.Errorf("intra lat smcd/tcp %+v", r)
	}
	if r := got[k{"intra-VM", "lat", "smcd/unix"}]; math.Abs(r.Value-30.0/11) > 1e-9 || r.Better {
		t.Errorf("intra lat smcd/unix %+v", r)
	}
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	r := NewReport(samples())
	r.Failures = []Failure{{"inter-VM", "http", "smcd", 4, "timeout"}}
	if err := r.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	lines := strings.Split(out, "\n")
	if !strings.HasPrefix(lines[0], "scope") || !strings.Contains(lines[0], "smcd/tcp") || !strings.HasPrefix(lines[1], "---") {
		t.Fatalf("header:\n%s", out)
	}
	// Scope order: inter before intra; test order within a scope.
	tput := strings.Index(out, "inter-VM  throughput")
	lat := strings.Index(out, "intra-VM  latency")
	if tput < 0 || lat < 0 || tput > lat {
		t.Fatalf("rows out of order:\n%s", out)
	}
	for _, want := range []string{
		"2.50 +", // inter tput smcd/tcp, better
		"2.00",   // intra lat smcd/tcp, worse: no mark
		"2.73",   // intra lat smcd/unix
		"67%",    // intra lat spread (smcd 20..40 around 30)
		"FAILED: inter-VM http over smcd, round 4: timeout",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "2.00 +") {
		t.Errorf("worse latency marked better:\n%s", out)
	}
	// Rows and header have the same width up to the last column.
	if len(lines[2]) != len(lines[0]) && !strings.HasSuffix(lines[2], "%") {
		t.Errorf("ragged rows:\n%s", out)
	}
}

func TestWriteCSV(t *testing.T) {
	r := NewReport(samples())
	r.Accel = "tcg"
	var b bytes.Buffer
	if err := r.WriteCSV(&b); err != nil {
		t.Fatal(err)
	}
	recs, err := csv.NewReader(&b).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 6 || recs[0][0] != "accel" {
		t.Fatalf("csv %v", recs)
	}
	// inter-VM tput tcp: smcd/tcp = 250/100.
	if got := recs[2]; got[1] != "inter-VM" || got[4] != "tcp" || got[6] != "100" || got[9] != "2.5000" {
		t.Errorf("row %v", got)
	}
	if recs[1][9] != "" {
		t.Errorf("smcd row has a ratio to itself: %v", recs[1])
	}
}

func TestFormatValue(t *testing.T) {
	for v, want := range map[float64]string{12345.6: "12346", 123.45: "123.5", 12.345: "12.35", 1.23456: "1.235", math.NaN(): "-"} {
		if got := FormatValue(v); got != want {
			t.Errorf("FormatValue(%v) = %q, want %q", v, got, want)
		}
	}
}
