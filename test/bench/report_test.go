package bench

import (
	"bytes"
	"encoding/csv"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseResults(t *testing.T) {
	got, fails, err := ParseResults("inter-VM", map[string]string{
		"bench.http.smcd-copy.2.error": "Get: timeout",
		"bench.tput.tcp.1":             "50",
		"bench.tput.smcd-attach.0":     "120.5",
		"bench.tput.smcd-copy.0":       "100",
		"bench.tput.tcp.0":             "40",
		"bench.lat_p999.smcd-attach.0": "900",
		"bench.tput32.unix.0":          "7",
		"bench.config":                 "dur=2s",
		"bench.listening":              "7100",
		"client_seconds":               "3",
		"agent.scenario_secs":          "1",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []Sample{
		{"inter-VM", "tput", "smcd-attach", 0, 120.5},
		{"inter-VM", "tput", "smcd-copy", 0, 100},
		{"inter-VM", "tput", "tcp", 0, 40},
		{"inter-VM", "tput", "tcp", 1, 50},
		{"inter-VM", "tput32", "unix", 0, 7},
		{"inter-VM", "lat_p999", "smcd-attach", 0, 900},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("sample %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
	if len(fails) != 1 || fails[0] != (Failure{"inter-VM", "http", "smcd-copy", 2, "Get: timeout"}) {
		t.Errorf("failures %+v", fails)
	}
	for _, bad := range []map[string]string{
		{"bench.tput.smcd-copy.x": "1"},
		{"bench.tput.smcd-copy.0": "fast"},
		{"bench.tput.smcd-copy.0": "NaN"},
		{"bench.tput.smcd-copy.0": "-1"},
		{"bench.bogus.smcd-copy.0": "1"},
		{"bench.tput.smcd-copy.x.error": "e"},
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
	add("intra-VM", "lat", "smcd-attach", 30, 20, 40)
	add("intra-VM", "lat", "tcp", 15, 15, 15)
	add("inter-VM", "tput", "tcp", 100, 80, 120)
	add("inter-VM", "tput", "smcd-attach", 300, 200, 250)
	add("inter-VM", "tput", "smcd-copy", 200, 180, 210)
	return s
}

func TestAggregateAndRatios(t *testing.T) {
	s := samples()
	// intra-VM lat: round 2 of unix failed, so smcd-attach/unix pairs
	// rounds 0 and 1 only.
	s = slices.DeleteFunc(s, func(x Sample) bool { return x.Transport == "unix" && x.Round == 2 })
	cells := Aggregate(s)
	want := []Cell{
		{"inter-VM", "tput", "MB/s", "smcd-attach", 3, 250, 225, 275, 200, 300},
		{"inter-VM", "tput", "MB/s", "smcd-copy", 3, 200, 190, 205, 180, 210},
		{"inter-VM", "tput", "MB/s", "tcp", 3, 100, 90, 110, 80, 120},
		{"intra-VM", "lat", "us/RTT", "smcd-attach", 3, 30, 25, 35, 20, 40},
		{"intra-VM", "lat", "us/RTT", "tcp", 3, 15, 15, 15, 15, 15},
		{"intra-VM", "lat", "us/RTT", "unix", 2, 11, 10.5, 11.5, 10, 12},
	}
	if len(cells) != len(want) {
		t.Fatalf("cells %+v", cells)
	}
	for i := range want {
		if cells[i] != want[i] {
			t.Errorf("cell %d: got %+v, want %+v", i, cells[i], want[i])
		}
	}
	if s, r := cells[3].Spread(), cells[3].Range(); math.Abs(s-10.0/30) > 1e-9 || math.Abs(r-20.0/30) > 1e-9 || !cells[3].Noisy() {
		t.Errorf("spread %v, range %v", s, r)
	}
	if cells[4].Noisy() {
		t.Errorf("tcp cell noisy: %v", cells[4].Spread())
	}
	rs := Ratios(cells, s)
	type k struct{ scope, test, pair string }
	got := map[k]Ratio{}
	var order []string
	for _, r := range rs {
		got[k{r.Scope, r.Test, r.Num + "/" + r.Den}] = r
		order = append(order, r.Scope+" "+r.Test+" "+r.Num+"/"+r.Den)
	}
	wantOrder := []string{
		"inter-VM tput smcd-attach/tcp", "inter-VM tput smcd-attach/smcd-copy", "inter-VM tput smcd-copy/tcp",
		"intra-VM lat smcd-attach/tcp", "intra-VM lat smcd-attach/unix",
	}
	if !slices.Equal(order, wantOrder) {
		t.Fatalf("ratios %q, want %q", order, wantOrder)
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	// Per round 3, 2.5, 250/120: median 2.5, quartiles halfway to the
	// ends; the cells' spreads are 50/250 and 20/100, so not noisy.
	if r := got[k{"inter-VM", "tput", "smcd-attach/tcp"}]; r.Value != 2.5 || !near(r.Min, 250.0/120) || r.Max != 3 ||
		!near(r.Q1, (2.5+250.0/120)/2) || r.Q3 != 2.75 || r.Rounds != 3 || r.OfMedians != 2.5 || !r.Better ||
		!near(r.NumSpread, 0.2) || !near(r.DenSpread, 0.2) || r.Noisy {
		t.Errorf("inter tput smcd-attach/tcp %+v", r)
	}
	// 300/200, 200/180, 250/210.
	if r := got[k{"inter-VM", "tput", "smcd-attach/smcd-copy"}]; !near(r.Value, 250.0/210) || !near(r.Min, 200.0/180) ||
		r.Max != 1.5 || !r.Better {
		t.Errorf("inter tput smcd-attach/smcd-copy %+v", r)
	}
	// Latency: a higher ratio is worse.
	if r := got[k{"intra-VM", "lat", "smcd-attach/tcp"}]; r.Value != 2 || r.Better || r.Rounds != 3 || r.DenSpread != 0 {
		t.Errorf("intra lat smcd-attach/tcp %+v", r)
	}
	// Rounds 0 and 1 only: 30/10, 20/12.
	if r := got[k{"intra-VM", "lat", "smcd-attach/unix"}]; r.Rounds != 2 || !near(r.Value, (3+20.0/12)/2) ||
		!near(r.Min, 20.0/12) || r.Max != 3 || !near(r.OfMedians, 30.0/11) || r.Better {
		t.Errorf("intra lat smcd-attach/unix %+v", r)
	}
}

func TestQuantile(t *testing.T) {
	v := []float64{50, 10, 40, 20, 30}
	for _, c := range []struct{ q, want float64 }{{0, 10}, {0.25, 20}, {0.5, 30}, {0.75, 40}, {1, 50}, {0.1, 14}} {
		if got := Quantile(v, c.q); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("Quantile(%v, %v) = %v, want %v", v, c.q, got, c.want)
		}
	}
	if v[0] != 50 {
		t.Errorf("Quantile sorted its argument: %v", v)
	}
	if got := Quantile([]float64{7}, 0.75); got != 7 {
		t.Errorf("one value: %v", got)
	}
	if !math.IsNaN(Quantile(nil, 0.5)) || Median([]float64{1, 2}) != 1.5 {
		t.Error("Quantile of none, or Median of two")
	}
}

// One round hit by other work widens the range, not the spread; rounds that
// disagree among themselves are flagged.
func TestSpreadAndRange(t *testing.T) {
	one := func(vals ...float64) Cell {
		var s []Sample
		for i, v := range vals {
			s = append(s, Sample{"inter-VM", "tput", "tcp", i, v})
		}
		return Aggregate(s)[0]
	}
	if c := one(100, 102, 98, 101, 40); c.Noisy() || c.Range() < 0.6 {
		t.Errorf("one outlier: spread %v range %v noisy %v", c.Spread(), c.Range(), c.Noisy())
	}
	if c := one(100, 70, 130, 85, 115); !c.Noisy() {
		t.Errorf("disagreeing rounds: spread %v not flagged", c.Spread())
	}
}

func TestRatiosUnpaired(t *testing.T) {
	s := []Sample{
		{"intra-VM", "tput", "smcd-copy", 0, 300},
		{"intra-VM", "tput", "tcp", 1, 100},
	}
	rs := Ratios(Aggregate(s), s)
	if len(rs) != 1 || rs[0].Rounds != 0 || rs[0].Value != 3 || rs[0].Min != 3 || rs[0].Max != 3 || rs[0].Q1 != 3 || rs[0].Q3 != 3 {
		t.Errorf("unpaired ratio %+v", rs)
	}
	// A zero denominator gives no ratio, and no Inf for the JSON.
	s = []Sample{{"intra-VM", "tput", "smcd-copy", 0, 300}, {"intra-VM", "tput", "tcp", 0, 0}}
	if rs := Ratios(Aggregate(s), s); len(rs) != 0 {
		t.Errorf("ratio over 0: %+v", rs)
	}
}

func TestLegacyTransport(t *testing.T) {
	// Result files from before the attach/copy split name one SMC-D
	// transport "smcd": it still gets its ratios and its column.
	s := []Sample{
		{"intra-VM", "tput", "unix", 0, 50},
		{"intra-VM", "tput", "tcp", 0, 100},
		{"intra-VM", "tput", "smcd", 0, 200},
	}
	r := NewReport(s)
	if r.Cells[0].Transport != "smcd" || len(r.Ratios) != 2 || r.Ratios[0].Value != 2 || r.Ratios[1].Value != 4 {
		t.Errorf("cells %+v ratios %+v", r.Cells, r.Ratios)
	}
	var b bytes.Buffer
	r.WriteTable(&b)
	if !strings.Contains(b.String(), "smcd  ") || !strings.Contains(b.String(), "4.00+ [4.00..4.00]") {
		t.Errorf("table:\n%s", b.String())
	}
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	r := NewReport(samples())
	r.Failures = []Failure{{"inter-VM", "http", "smcd-copy", 4, "timeout"}}
	if err := r.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	lines := strings.Split(out, "\n")
	if !strings.HasPrefix(lines[0], "scope") || !strings.Contains(lines[0], "vs tcp") ||
		!strings.Contains(lines[0], "vs unix") || !strings.Contains(lines[0], "vs smcd-copy") || !strings.HasPrefix(lines[1], "---") {
		t.Fatalf("header:\n%s", out)
	}
	// Scope order: inter before intra; transport order within a test.
	for _, l := range [][2]string{
		{"inter-VM  tput  MB/s    higher  smcd-attach", "inter-VM  tput  MB/s    higher  smcd-copy"},
		{"inter-VM  tput  MB/s    higher  tcp", "intra-VM  lat   us/RTT  lower   smcd-attach"},
	} {
		a, b := strings.Index(out, l[0]), strings.Index(out, l[1])
		if a < 0 || b < 0 || a > b {
			t.Fatalf("rows out of order (%q, %q):\n%s", l[0], l[1], out)
		}
	}
	for _, want := range []string{
		"2.50+ [2.08..3.00] ",    // inter tput smcd-attach/tcp, better; spreads 18%, 20%, 20%
		"1.19+ [1.11..1.50]\n",   // inter tput smcd-attach/smcd-copy, spreads 16%, 20%, 8%
		"2.00  [1.33..2.67]!",    // intra lat smcd-attach/tcp, worse: no mark; smcd-attach's spread
		"3.00  [1.67..3.64]!",    // intra lat smcd-attach/unix
		"33%!    67%",            // intra lat smcd-attach: spread (25..35 around 30), range (20..40)
		"15.00     0%      0%\n", // intra lat tcp: no flag
		"FAILED: inter-VM http over smcd-copy, round 4: timeout",
		"tput32    throughput, 64000 B writes, 32 connections (sum), MB/s",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	// A blank line between tests, none within.
	if !strings.Contains(out, "\n\nintra-VM  lat") || strings.Contains(out, "\n\ninter-VM  tput") {
		t.Errorf("grouping:\n%s", out)
	}
	// The figure columns end in one column on every row that has them.
	// (The first row's last ratio has no flag: its blank is trimmed.)
	if w := len(lines[0]); w == 0 || !strings.HasSuffix(lines[2], "]") || len(lines[2]) != w-1 {
		t.Errorf("ragged rows (%d vs %d):\n%s", len(lines[2]), w, out)
	}
}

func TestWriteCSV(t *testing.T) {
	r := NewReport(samples())
	r.Accel = "tcg"
	r.Started = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	r.Failures = []Failure{{"inter-VM", "http", "smcd-copy", 4, "timeout, again"}}
	var b bytes.Buffer
	if err := r.WriteCSV(&b); err != nil {
		t.Fatal(err)
	}
	recs, err := csv.NewReader(&b).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1+len(r.Samples)+1 {
		t.Fatalf("csv %v", recs)
	}
	if got := strings.Join(recs[0], ","); got != "started,accel,scope,test,unit,transport,round,value,error" {
		t.Errorf("header %s", got)
	}
	// Samples in table order: inter-VM tput smcd-attach rounds 0..2 first.
	if got := strings.Join(recs[2], ","); got != "2025-06-01T12:00:00Z,tcg,inter-VM,tput,MB/s,smcd-attach,1,200," {
		t.Errorf("row %s", got)
	}
	if got := strings.Join(recs[len(recs)-1], "|"); got != "2025-06-01T12:00:00Z|tcg|inter-VM|http|req/s|smcd-copy|4||timeout, again" {
		t.Errorf("failure row %s", got)
	}
}

func TestFormatValue(t *testing.T) {
	for v, want := range map[float64]string{12345.6: "12346", 123.45: "123.5", 12.345: "12.35", 1.23456: "1.235", math.NaN(): "-"} {
		if got := FormatValue(v); got != want {
			t.Errorf("FormatValue(%v) = %q, want %q", v, got, want)
		}
	}
}
