// Package bench is the host side of `make bench`: it boots guests through
// test/vm/vmharness, runs the ism-agent bench scenarios (cmd/ism-agent/
// scenario_bench.go) in them, and turns their ISM-RESULT lines into a table
// of SMC-D against TCP (and UNIX sockets inside one guest) with ratios, plus
// JSON and CSV files under bench-results/.
//
// This file holds the parsing, aggregation and formatting; bench_test.go
// (ISM_BENCH=1) runs the guests.
package bench

import (
	"encoding/csv"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Test describes one measurement as the guest scenarios name it.
type Test struct {
	Name, Title, Unit string
	LowerIsBetter     bool
}

// Tests in table order.
var Tests = []Test{
	{"tput", "throughput, 64 KiB writes", "MB/s", false},
	{"lat", "latency, 14 B ping-pong", "us/RTT", true},
	{"msgrate", "message rate, 64 B one way", "msg/s", false},
	{"http", "HTTP keep-alive, 4 clients", "req/s", false},
}

// Scopes in table order: two guests, one guest.
var Scopes = []string{"inter-VM", "intra-VM"}

// Transports in table order.
var Transports = []string{"smcd", "tcp", "unix"}

// Ratios the table shows: numerator / denominator.
var RatioPairs = [][2]string{{"smcd", "tcp"}, {"smcd", "unix"}}

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
		if x, y := index(Transports, a.Transport), index(Transports, b.Transport); x != y {
			return x < y
		}
		if a.Transport != b.Transport {
			return a.Transport < b.Transport
		}
		return a.Round < b.Round
	})
}

// Cell is one (scope, test, transport): the median of its rounds and their
// range.
type Cell struct {
	Scope     string  `json:"scope"`
	Test      string  `json:"test"`
	Unit      string  `json:"unit"`
	Transport string  `json:"transport"`
	N         int     `json:"n"`
	Median    float64 `json:"median"`
	Min       float64 `json:"min"`
	Max       float64 `json:"max"`
}

// Spread is (max-min)/median: how much the rounds disagree.
func (c Cell) Spread() float64 {
	if c.Median == 0 {
		return 0
	}
	return (c.Max - c.Min) / c.Median
}

// Median of v (not modified); NaN for none.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
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
		c.Min, c.Max = vals[0], vals[0]
		for _, v := range vals {
			c.Min, c.Max = math.Min(c.Min, v), math.Max(c.Max, v)
		}
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

// Ratio is num/den of two transports' medians in one scope and test.
type Ratio struct {
	Scope string  `json:"scope"`
	Test  string  `json:"test"`
	Num   string  `json:"num"`
	Den   string  `json:"den"`
	Value float64 `json:"value"`
	// Better says whether the numerator transport did better than the
	// denominator (for latency that is a ratio below 1).
	Better bool `json:"num_better"`
}

// Ratios computes RatioPairs wherever both cells exist.
func Ratios(cells []Cell) []Ratio {
	type k struct{ scope, test, tr string }
	m := map[k]Cell{}
	for _, c := range cells {
		m[k{c.Scope, c.Test, c.Transport}] = c
	}
	var out []Ratio
	for _, c := range cells {
		for _, p := range RatioPairs {
			if c.Transport != p[0] {
				continue
			}
			d, ok := m[k{c.Scope, c.Test, p[1]}]
			if !ok || d.Median == 0 {
				continue
			}
			r := Ratio{Scope: c.Scope, Test: c.Test, Num: p[0], Den: p[1], Value: c.Median / d.Median}
			lower := false
			if t := testByName(c.Test); t != nil {
				lower = t.LowerIsBetter
			}
			r.Better = r.Value > 1
			if lower {
				r.Better = r.Value < 1
			}
			out = append(out, r)
		}
	}
	return out
}

// Report is everything one `make bench` run measured.
type Report struct {
	Started  time.Time         `json:"started"`
	Accel    string            `json:"accel"`
	QEMU     string            `json:"qemu"`
	Host     string            `json:"host"`
	Load     string            `json:"load_average"` // host's, before -> after
	Config   map[string]string `json:"config"`       // per scope: the guest's bench.config
	Samples  []Sample          `json:"samples"`
	Cells    []Cell            `json:"cells"`
	Ratios   []Ratio           `json:"ratios"`
	Failures []Failure         `json:"failures"`
	Duration string            `json:"duration"`
}

// NewReport aggregates samples into a report.
func NewReport(samples []Sample) *Report {
	r := &Report{Samples: samples, Config: map[string]string{}}
	sortSamples(r.Samples)
	r.Cells = Aggregate(samples)
	r.Ratios = Ratios(r.Cells)
	return r
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

// WriteTable prints the report as a fixed-width table: one row per scope and
// test, the median per transport, the ratios, and the largest spread of the
// rounds in that row.
func (r *Report) WriteTable(w io.Writer) error {
	type k struct{ scope, test, tr string }
	cell := map[k]Cell{}
	for _, c := range r.Cells {
		cell[k{c.Scope, c.Test, c.Transport}] = c
	}
	ratio := map[string]Ratio{}
	for _, x := range r.Ratios {
		ratio[x.Scope+"|"+x.Test+"|"+x.Num+"/"+x.Den] = x
	}
	var scopes []string
	seen := map[string]bool{}
	for _, c := range r.Cells {
		if !seen[c.Scope] {
			seen[c.Scope] = true
			scopes = append(scopes, c.Scope)
		}
	}
	head := []string{"scope", "test", "unit"}
	head = append(head, Transports...)
	for _, p := range RatioPairs {
		head = append(head, p[0]+"/"+p[1])
	}
	head = append(head, "spread")
	rows := [][]string{head}
	for _, s := range scopes {
		for _, t := range Tests {
			row := []string{s, t.Title, t.Unit}
			any, spread := false, 0.0
			for _, tr := range Transports {
				c, ok := cell[k{s, t.Name, tr}]
				if !ok {
					row = append(row, "-")
					continue
				}
				any = true
				spread = math.Max(spread, c.Spread())
				row = append(row, FormatValue(c.Median))
			}
			if !any {
				continue
			}
			for _, p := range RatioPairs {
				x, ok := ratio[s+"|"+t.Name+"|"+p[0]+"/"+p[1]]
				if !ok {
					row = append(row, "-")
					continue
				}
				mark := ""
				if x.Better {
					mark = " +"
				}
				row = append(row, strconv.FormatFloat(x.Value, 'f', 2, 64)+mark)
			}
			row = append(row, fmt.Sprintf("%.0f%%", spread*100))
			rows = append(rows, row)
		}
	}
	width := make([]int, len(head))
	for _, row := range rows {
		for i, f := range row {
			width[i] = max(width[i], len(f))
		}
	}
	for n, row := range rows {
		var b strings.Builder
		for i, f := range row {
			if i > 0 {
				b.WriteString("  ")
			}
			if i < 3 { // text columns left, figures right
				b.WriteString(f + strings.Repeat(" ", width[i]-len(f)))
			} else {
				b.WriteString(strings.Repeat(" ", width[i]-len(f)) + f)
			}
		}
		if _, err := fmt.Fprintln(w, strings.TrimRight(b.String(), " ")); err != nil {
			return err
		}
		if n == 0 {
			total := len(width)*2 - 2
			for _, x := range width {
				total += x
			}
			fmt.Fprintln(w, strings.Repeat("-", total))
		}
	}
	for _, f := range r.Failures {
		fmt.Fprintf(w, "FAILED: %s %s over %s, round %d: %s\n", f.Scope, f.Test, f.Transport, f.Round, f.Error)
	}
	_, err := fmt.Fprintln(w, "Medians of the rounds. Ratios are medians divided; \"+\" marks where the first transport did better\n"+
		"(higher, or lower for latency). spread: the largest (max-min)/median of one cell's rounds in the row.")
	return err
}

// WriteCSV writes one line per cell, with its ratios to the other transports.
func (r *Report) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	cw.Write([]string{"accel", "scope", "test", "unit", "transport", "rounds", "median", "min", "max", "smcd_over_this"})
	med := map[string]float64{}
	for _, c := range r.Cells {
		med[c.Scope+"|"+c.Test+"|"+c.Transport] = c.Median
	}
	for _, c := range r.Cells {
		ratio := ""
		if s, ok := med[c.Scope+"|"+c.Test+"|smcd"]; ok && c.Transport != "smcd" && c.Median != 0 {
			ratio = strconv.FormatFloat(s/c.Median, 'f', 4, 64)
		}
		cw.Write([]string{r.Accel, c.Scope, c.Test, c.Unit, c.Transport, strconv.Itoa(c.N),
			strconv.FormatFloat(c.Median, 'g', 6, 64), strconv.FormatFloat(c.Min, 'g', 6, 64),
			strconv.FormatFloat(c.Max, 'g', 6, 64), ratio})
	}
	cw.Flush()
	return cw.Error()
}
