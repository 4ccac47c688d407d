// Package bench is the host side of `make bench`: it boots guests through
// test/vm/vmharness, runs the ism-agent bench scenarios (cmd/ism-agent/
// scenario_bench.go) in them, and turns their ISM-RESULT lines into a table
// of SMC-D against TCP (and UNIX sockets inside one guest) with ratios, plus
// JSON, CSV and an SVG chart under bench-results/.
//
// This file holds the parsing, aggregation and formatting, chart.go the
// chart; bench_test.go (ISM_BENCH=1) runs the guests; cmd/benchchart
// re-renders the chart from a results JSON.
package bench

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Test describes one measurement as the guest scenarios name it.
type Test struct {
	Name  string `json:"name"`
	Title string `json:"title"`
	// Short labels the test's group of bars in the chart.
	Short         string `json:"short"`
	Unit          string `json:"unit"`
	LowerIsBetter bool   `json:"lower_is_better"`
}

// Better is "lower" or "higher": which way this test's figures improve.
func (t Test) Better() string {
	if t.LowerIsBetter {
		return "lower"
	}
	return "higher"
}

// Tests in table order. lat, lat_p99 and lat_p999 are percentiles of one
// ping-pong run; msgrate counts the round trips of another; http_p99 is the
// request latency of the http run.
var Tests = []Test{
	{Name: "tput", Title: "throughput, 64000 B writes, 1 connection", Short: "tput 1 conn", Unit: "MB/s"},
	{Name: "tput32", Title: "throughput, 64000 B writes, 32 connections (sum)", Short: "tput 32 conns", Unit: "MB/s"},
	{Name: "lat", Title: "latency p50, 14 B ping-pong", Short: "lat p50", Unit: "us/RTT", LowerIsBetter: true},
	{Name: "lat_p99", Title: "latency p99, 14 B ping-pong", Short: "lat p99", Unit: "us/RTT", LowerIsBetter: true},
	{Name: "lat_p999", Title: "latency p99.9, 14 B ping-pong", Short: "lat p99.9", Unit: "us/RTT", LowerIsBetter: true},
	{Name: "msgrate", Title: "message rate, 100 B ping-pong", Short: "msgrate 100 B", Unit: "RTT/s"},
	{Name: "http", Title: "HTTP keep-alive, 32 connections", Short: "HTTP 32 conns", Unit: "req/s"},
	{Name: "http_p99", Title: "HTTP request latency p99, 32 connections", Short: "HTTP p99", Unit: "us/req", LowerIsBetter: true},
}

// Scopes in table order: two guests, one guest.
var Scopes = []string{"inter-VM", "intra-VM"}

// Transports in table order: SMC-D with the sender writing straight into an
// attached peer DMB, SMC-D copying through the device (both our Go stack),
// the Linux kernel's own SMC-D (AF_SMC) through our device with our DIBS
// driver (inter-VM) and through its loopback-ism (intra-VM), TCP (inter-VM
// over the guests' NICs, intra-VM over 127.0.0.1), UNIX sockets (intra-VM
// only).
var Transports = []string{"smcd-attach", "smcd-copy", "kernel-smcd", "kernel-lo", "tcp", "unix"}

// legacySMCD is the one SMC-D transport of result files from before the
// attach/copy split: such files still aggregate, with their own ratios.
const legacySMCD = "smcd"

// SMCDTransports are the transports the chart draws against TCP.
var SMCDTransports = []string{"smcd-attach", "smcd-copy", "kernel-smcd", "kernel-lo", legacySMCD}

// transportOrder sorts transports: Transports with the legacy one after the
// new SMC-D ones; unknown names sort last, by name.
var transportOrder = []string{"smcd-attach", "smcd-copy", legacySMCD, "kernel-smcd", "kernel-lo", "tcp", "unix"}

// RatioPairs are the ratios computed: numerator / denominator.
var RatioPairs = [][2]string{
	{"smcd-attach", "tcp"}, {"smcd-copy", "tcp"},
	{"smcd-attach", "unix"}, {"smcd-copy", "unix"},
	{"smcd-attach", "smcd-copy"},
	// The kernel's SMC-D against TCP in the same guests, and our Go stack
	// against the kernel's (through our device inter-VM; intra-VM against
	// the kernel's loopback-ism, the anchor for intra-VM SMC-D).
	{"kernel-smcd", "tcp"}, {"kernel-lo", "tcp"}, {"kernel-lo", "unix"},
	{"smcd-attach", "kernel-smcd"}, {"smcd-copy", "kernel-smcd"},
	{"smcd-attach", "kernel-lo"}, {"smcd-copy", "kernel-lo"},
	{legacySMCD, "tcp"}, {legacySMCD, "unix"},
}

// NoisySpread is the spread above which the table and the chart flag a cell:
// the middle half of its rounds disagree by more than a quarter of their
// median.
const NoisySpread = 0.25

// Sample is one measurement a guest reported.
type Sample struct {
	Scope     string  `json:"scope"`
	Test      string  `json:"test"`
	Transport string  `json:"transport"`
	Round     int     `json:"round"`
	Value     float64 `json:"value"`
}

// Failure is a measurement the guest reported as failed.
type Failure struct {
	Scope     string `json:"scope"`
	Test      string `json:"test"`
	Transport string `json:"transport"`
	Round     int    `json:"round"`
	Error     string `json:"error"`
}

// ParseResults picks the samples out of a guest's ISM-RESULT map: keys
// bench.<test>.<transport>.<round> with a numeric value, and failed
// measurements: bench.<test>.<transport>.<round>.error. Other bench.* keys
// (bench.config, bench.listening) are neither; a key of either shape with a
// bad round or value, or an unknown test, is an error.
func ParseResults(scope string, results map[string]string) ([]Sample, []Failure, error) {
	var out []Sample
	var fails []Failure
	for k, v := range results {
		parts := strings.Split(k, ".")
		isFail := len(parts) == 5 && parts[4] == "error"
		if parts[0] != "bench" || (len(parts) != 4 && !isFail) {
			continue
		}
		if testByName(parts[1]) == nil {
			return nil, nil, fmt.Errorf("result %s: unknown test %q", k, parts[1])
		}
		r, err := strconv.Atoi(parts[3])
		if err != nil || r < 0 {
			return nil, nil, fmt.Errorf("result %s: bad round %q", k, parts[3])
		}
		if isFail {
			fails = append(fails, Failure{Scope: scope, Test: parts[1], Transport: parts[2], Round: r, Error: v})
			continue
		}
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
			return nil, nil, fmt.Errorf("result %s: bad value %q", k, v)
		}
		out = append(out, Sample{Scope: scope, Test: parts[1], Transport: parts[2], Round: r, Value: f})
	}
	sortSamples(out)
	sort.Slice(fails, func(i, j int) bool {
		a, b := fails[i], fails[j]
		if a.Test != b.Test {
			return testIndex(a.Test) < testIndex(b.Test)
		}
		if a.Round != b.Round {
			return a.Round < b.Round
		}
		return a.Transport < b.Transport
	})
	return out, fails, nil
}

func testByName(n string) *Test {
	for i := range Tests {
		if Tests[i].Name == n {
			return &Tests[i]
		}
	}
	return nil
}

func index(l []string, s string) int {
	for i, x := range l {
		if x == s {
			return i
		}
	}
	return len(l) // unknown names sort last
}

func testIndex(n string) int {
	for i, t := range Tests {
		if t.Name == n {
			return i
		}
	}
	return len(Tests)
}

func sortSamples(s []Sample) {
	sort.Slice(s, func(i, j int) bool {
		a, b := s[i], s[j]
		if x, y := index(Scopes, a.Scope), index(Scopes, b.Scope); x != y {
			return x < y
		}
		if a.Scope != b.Scope {
			return a.Scope < b.Scope
		}
		if x, y := testIndex(a.Test), testIndex(b.Test); x != y {
			return x < y
		}
		if x, y := index(transportOrder, a.Transport), index(transportOrder, b.Transport); x != y {
			return x < y
		}
		if a.Transport != b.Transport {
			return a.Transport < b.Transport
		}
		return a.Round < b.Round
	})
}

// Cell is one (scope, test, transport): the median of its rounds, their
// quartiles and their range.
type Cell struct {
	Scope     string  `json:"scope"`
	Test      string  `json:"test"`
	Unit      string  `json:"unit"`
	Transport string  `json:"transport"`
	N         int     `json:"n"`
	Median    float64 `json:"median"`
	Q1        float64 `json:"q1"`
	Q3        float64 `json:"q3"`
	Min       float64 `json:"min"`
	Max       float64 `json:"max"`
}

// Spread is the interquartile range over the median, (q3-q1)/median: how
// much the middle half of the rounds disagree. On a shared host one round in
// five or so can be hit by someone else's work; the range (Range) shows
// that round, the spread does not let it hide how well the others agree.
func (c Cell) Spread() float64 { return spread(c.Q1, c.Q3, c.Median) }

// Range is (max-min)/median: how much all rounds disagree.
func (c Cell) Range() float64 { return spread(c.Min, c.Max, c.Median) }

// Noisy says whether the spread is above NoisySpread.
func (c Cell) Noisy() bool { return c.Spread() > NoisySpread }

func spread(lo, hi, mid float64) float64 {
	if mid == 0 {
		return 0
	}
	return (hi - lo) / mid
}

// Median of v (not modified); NaN for none.
func Median(v []float64) float64 { return Quantile(v, 0.5) }

// Quantile is the q-quantile (0 <= q <= 1) of v (not modified), interpolated
// linearly between the two nearest ranks (R's type 7, numpy's default); NaN
// for none. Of 5 rounds the quartiles are the 2nd and the 4th.
func Quantile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	h := q * float64(len(s)-1)
	i := int(math.Floor(h))
	if i+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[i] + (h-float64(i))*(s[i+1]-s[i])
}

// Aggregate groups samples into cells, in table order.
func Aggregate(samples []Sample) []Cell {
	s := append([]Sample(nil), samples...)
	sortSamples(s)
	var cells []Cell
	var vals []float64
	flush := func() {
		if len(cells) == 0 {
			return
		}
		c := &cells[len(cells)-1]
		c.N, c.Median = len(vals), Median(vals)
		c.Q1, c.Q3 = Quantile(vals, 0.25), Quantile(vals, 0.75)
		c.Min, c.Max = slices.Min(vals), slices.Max(vals)
		vals = nil
	}
	for _, x := range s {
		if n := len(cells); n == 0 || cells[n-1].Scope != x.Scope || cells[n-1].Test != x.Test || cells[n-1].Transport != x.Transport {
			flush()
			unit := ""
			if t := testByName(x.Test); t != nil {
				unit = t.Unit
			}
			cells = append(cells, Cell{Scope: x.Scope, Test: x.Test, Unit: unit, Transport: x.Transport})
		}
		vals = append(vals, x.Value)
	}
	flush()
	return cells
}

// Ratio compares two transports in one scope and test: numerator over
// denominator, per round where both were measured (the guests interleave the
// transports within a round, so a round's pair saw the same conditions).
type Ratio struct {
	Scope string `json:"scope"`
	Test  string `json:"test"`
	Num   string `json:"num"`
	Den   string `json:"den"`
	// Value is the median of the per-round ratios; Q1 and Q3 their
	// quartiles, Min and Max their range; Rounds how many rounds had both
	// transports. With no such round (failures), all five are OfMedians
	// and Rounds is 0.
	Value  float64 `json:"value"`
	Q1     float64 `json:"q1"`
	Q3     float64 `json:"q3"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	Rounds int     `json:"rounds"`
	// OfMedians is the two cells' medians divided.
	OfMedians float64 `json:"of_medians"`
	// NumSpread and DenSpread are the two cells' spreads (Cell.Spread).
	NumSpread float64 `json:"num_spread"`
	DenSpread float64 `json:"den_spread"`
	// Better says whether the numerator transport did better than the
	// denominator (for a lower-is-better test that is a ratio below 1).
	Better bool `json:"num_better"`
	// Noisy: the ratio's own spread or either cell's is above NoisySpread.
	Noisy bool `json:"noisy"`
}

// Spread is the per-round ratios' (q3-q1)/median, as Cell.Spread.
func (r Ratio) Spread() float64 { return spread(r.Q1, r.Q3, r.Value) }

// Range is the per-round ratios' (max-min)/median.
func (r Ratio) Range() float64 { return spread(r.Min, r.Max, r.Value) }

// Ratios computes RatioPairs wherever both cells exist (and the
// denominator's median is not 0), in the cells' order, then RatioPairs'.
func Ratios(cells []Cell, samples []Sample) []Ratio {
	type ck struct{ scope, test, tr string }
	type sk struct {
		ck
		round int
	}
	cell := map[ck]Cell{}
	for _, c := range cells {
		cell[ck{c.Scope, c.Test, c.Transport}] = c
	}
	val := map[sk]float64{}
	rounds := map[ck][]int{}
	for _, x := range samples {
		k := ck{x.Scope, x.Test, x.Transport}
		if _, dup := val[sk{k, x.Round}]; !dup {
			rounds[k] = append(rounds[k], x.Round)
		}
		val[sk{k, x.Round}] = x.Value
	}
	var out []Ratio
	for _, c := range cells {
		for _, p := range RatioPairs {
			if c.Transport != p[0] {
				continue
			}
			dk := ck{c.Scope, c.Test, p[1]}
			d, ok := cell[dk]
			if !ok || d.Median == 0 {
				continue
			}
			r := Ratio{Scope: c.Scope, Test: c.Test, Num: p[0], Den: p[1],
				OfMedians: c.Median / d.Median, NumSpread: c.Spread(), DenSpread: d.Spread()}
			var per []float64
			rs := append([]int(nil), rounds[ck{c.Scope, c.Test, c.Transport}]...)
			sort.Ints(rs)
			for _, round := range rs {
				dv, ok := val[sk{dk, round}]
				if !ok || dv == 0 {
					continue
				}
				per = append(per, val[sk{ck{c.Scope, c.Test, c.Transport}, round}]/dv)
			}
			r.Rounds = len(per)
			if len(per) == 0 {
				r.Value, r.Min, r.Max = r.OfMedians, r.OfMedians, r.OfMedians
				r.Q1, r.Q3 = r.OfMedians, r.OfMedians
			} else {
				r.Value, r.Min, r.Max = Median(per), slices.Min(per), slices.Max(per)
				r.Q1, r.Q3 = Quantile(per, 0.25), Quantile(per, 0.75)
			}
			lower := false
			if t := testByName(c.Test); t != nil {
				lower = t.LowerIsBetter
			}
			r.Better = r.Value > 1
			if lower {
				r.Better = r.Value < 1
			}
			r.Noisy = r.Spread() > NoisySpread || r.NumSpread > NoisySpread || r.DenSpread > NoisySpread
			out = append(out, r)
		}
	}
	return out
}

// Report is everything one `make bench` run measured. The JSON that
// bench_test.go writes is this struct; cmd/benchchart reads it back.
type Report struct {
	Started time.Time         `json:"started"`
	Accel   string            `json:"accel"`
	QEMU    string            `json:"qemu"`
	Host    string            `json:"host"`
	VCPUs   int               `json:"vcpus"`        // per guest
	Rounds  int               `json:"rounds"`       // asked for; 0: unknown
	Dur     string            `json:"measure_dur"`  // per measurement
	Load    string            `json:"load_average"` // host's, before -> after
	Config  map[string]string `json:"config"`       // per scope: the guest's bench.config
	// Tests are the test definitions this report was written with.
	Tests    []Test    `json:"tests"`
	Samples  []Sample  `json:"samples"`
	Cells    []Cell    `json:"cells"`
	Ratios   []Ratio   `json:"ratios"`
	Failures []Failure `json:"failures"`
	Duration string    `json:"duration"`
}

// NewReport aggregates samples into a report.
func NewReport(samples []Sample) *Report {
	r := &Report{Samples: samples, Config: map[string]string{}}
	r.Recompute()
	return r
}

// Recompute sorts the samples and derives Tests, Cells and Ratios from them
// afresh (e.g. for a report read back from JSON written by older code).
func (r *Report) Recompute() {
	sortSamples(r.Samples)
	r.Tests = Tests
	r.Cells = Aggregate(r.Samples)
	r.Ratios = Ratios(r.Cells, r.Samples)
}

// EncodeJSON is the report as the indented JSON that bench_test.go writes.
func (r *Report) EncodeJSON() ([]byte, error) {
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(js, '\n'), nil
}

// ReadReport reads a report's JSON back and recomputes its cells and ratios
// from the samples (so files written by older code get today's figures).
func ReadReport(rd io.Reader) (*Report, error) {
	var r Report
	d := json.NewDecoder(rd)
	if err := d.Decode(&r); err != nil {
		return nil, fmt.Errorf("reading a bench report: %w", err)
	}
	r.Recompute()
	return &r, nil
}

// FormatValue prints a figure with about four significant digits.
func FormatValue(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "-"
	case a >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}

// FormatRatio prints a ratio with about three significant digits.
func FormatRatio(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "-"
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 0.1 || a == 0:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'g', 2, 64)
	}
}

func percent(v float64) string { return strconv.FormatFloat(v*100, 'f', 0, 64) + "%" }

// WriteTable prints the report as a fixed-width table, one row per scope,
// test and transport: the median of the rounds and their spread, then the
// ratios of this transport to the others (RatioPairs), one column per
// denominator; failed measurements and a legend follow.
func (r *Report) WriteTable(w io.Writer) error {
	type k struct{ scope, test, tr string }
	ratio := map[k]map[string]Ratio{} // numerator's key -> denominator -> ratio
	var dens []string
	for _, p := range RatioPairs {
		for _, x := range r.Ratios {
			if x.Num == p[0] && x.Den == p[1] && !slices.Contains(dens, p[1]) {
				dens = append(dens, p[1])
			}
		}
	}
	for _, x := range r.Ratios {
		kk := k{x.Scope, x.Test, x.Num}
		if ratio[kk] == nil {
			ratio[kk] = map[string]Ratio{}
		}
		ratio[kk][x.Den] = x
	}
	head := []string{"scope", "test", "unit", "better", "transport", "n", "median", "spread", "range"}
	const textCols = 5 // left-aligned; figures right
	for _, d := range dens {
		head = append(head, "vs "+d)
	}
	rows := [][]string{head}
	flag := func(noisy bool) string {
		if noisy {
			return "!"
		}
		return " "
	}
	cells := append([]Cell(nil), r.Cells...)
	for i, c := range cells {
		if i > 0 && (c.Scope != cells[i-1].Scope || c.Test != cells[i-1].Test) {
			rows = append(rows, nil) // a blank line between tests
		}
		unit, better := c.Unit, "?"
		if t := testByName(c.Test); t != nil {
			better = t.Better()
		}
		row := []string{c.Scope, c.Test, unit, better, c.Transport, strconv.Itoa(c.N),
			FormatValue(c.Median), percent(c.Spread()) + flag(c.Noisy()), percent(c.Range())}
		for _, d := range dens {
			x, ok := ratio[k{c.Scope, c.Test, c.Transport}][d]
			if !ok {
				row = append(row, "")
				continue
			}
			plus := " "
			if x.Better {
				plus = "+"
			}
			rng := "[" + FormatRatio(x.Min) + ".." + FormatRatio(x.Max) + "]"
			if x.Rounds == 0 {
				rng = "[unpaired]"
			}
			row = append(row, FormatRatio(x.Value)+plus+" "+rng+flag(x.Noisy))
		}
		rows = append(rows, row)
	}
	width := make([]int, len(head))
	for _, row := range rows {
		for i, f := range row {
			width[i] = max(width[i], utf8.RuneCountInString(f))
		}
	}
	var b strings.Builder
	for n, row := range rows {
		var line strings.Builder
		for i, f := range row {
			if i > 0 {
				line.WriteString("  ")
			}
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(f))
			if i < textCols {
				line.WriteString(f + pad)
			} else {
				line.WriteString(pad + f)
			}
		}
		b.WriteString(strings.TrimRight(line.String(), " ") + "\n")
		if n == 0 {
			total := 2 * (len(width) - 1)
			for _, x := range width {
				total += x
			}
			b.WriteString(strings.Repeat("-", total) + "\n")
		}
	}
	for _, f := range r.Failures {
		fmt.Fprintf(&b, "FAILED: %s %s over %s, round %d: %s\n", f.Scope, f.Test, f.Transport, f.Round, f.Error)
	}
	b.WriteString("n rounds; median of this transport's rounds, their spread ((q3-q1)/median: the middle half)\n" +
		"and range ((max-min)/median: all of them). vs X: this transport's figure over X's, per round\n" +
		"where both ran (rounds interleave the transports): median [min..max]. \"+\": this transport did\n" +
		"better (better: higher or lower figures). \"!\": a spread above 25% (the cell's; for a ratio\n" +
		"its own or either transport's): read with care.\n")
	for _, t := range Tests {
		fmt.Fprintf(&b, "  %-9s %s, %s\n", t.Name, t.Title, t.Unit)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteCSV writes one line per sample and one per failed measurement (its
// value empty, its error set).
func (r *Report) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	cw.Write([]string{"started", "accel", "scope", "test", "unit", "transport", "round", "value", "error"})
	started := ""
	if !r.Started.IsZero() {
		started = r.Started.UTC().Format(time.RFC3339)
	}
	unit := func(test string) string {
		if t := testByName(test); t != nil {
			return t.Unit
		}
		return ""
	}
	for _, s := range r.Samples {
		cw.Write([]string{started, r.Accel, s.Scope, s.Test, unit(s.Test), s.Transport, strconv.Itoa(s.Round),
			strconv.FormatFloat(s.Value, 'g', -1, 64), ""})
	}
	for _, f := range r.Failures {
		cw.Write([]string{started, r.Accel, f.Scope, f.Test, unit(f.Test), f.Transport, strconv.Itoa(f.Round), "", f.Error})
	}
	cw.Flush()
	return cw.Error()
}
