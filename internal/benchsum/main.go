// Command benchsum summarises `go test -bench` output read from stdin: for
// each benchmark (by package), the median and the range of every metric over
// the runs, one benchmark per block. `make bench-device` pipes its runs
// through it. Lines starting with "# " are echoed (the caller's notes, such
// as the load average); other lines that are not benchmark results are
// ignored.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

type bench struct {
	name    string
	runs    int
	units   []string // in order of first appearance
	samples map[string][]float64
}

var procSuffix = regexp.MustCompile(`-\d+$`)

func main() {
	if err := summarise(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "benchsum:", err)
		os.Exit(1)
	}
}

func summarise(r io.Reader, w io.Writer) error {
	var order []*bench
	byName := map[string]*bench{}
	pkg := ""
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "# "):
			fmt.Fprintln(w, line)
			continue
		case strings.HasPrefix(line, "pkg: "):
			pkg = path.Base(strings.TrimSpace(strings.TrimPrefix(line, "pkg: ")))
			continue
		case !strings.HasPrefix(line, "Benchmark"):
			continue
		}
		f := strings.Fields(line)
		if len(f) < 4 || len(f)%2 != 0 {
			continue
		}
		name := strings.TrimPrefix(procSuffix.ReplaceAllString(f[0], ""), "Benchmark")
		if pkg != "" {
			name = pkg + "." + name
		}
		b := byName[name]
		if b == nil {
			b = &bench{name: name, samples: map[string][]float64{}}
			byName[name] = b
			order = append(order, b)
		}
		b.runs++
		// f[1] is the iteration count; then value-unit pairs.
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			u := f[i+1]
			if _, ok := b.samples[u]; !ok {
				b.units = append(b.units, u)
			}
			b.samples[u] = append(b.samples[u], v)
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	for _, b := range order {
		fmt.Fprintf(w, "\n%s  (%d runs: median, min .. max)\n", b.name, b.runs)
		for _, u := range b.units {
			s := slices.Clone(b.samples[u])
			slices.Sort(s)
			med := median(s)
			spread := ""
			if med != 0 && len(s) > 1 {
				spread = fmt.Sprintf("  ±%.0f%%", 100*(s[len(s)-1]-s[0])/2/med)
			}
			fmt.Fprintf(w, "  %-14s %12s   %s .. %s%s\n", u, num(med), num(s[0]), num(s[len(s)-1]), spread)
		}
	}
	return nil
}

func median(s []float64) float64 {
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// num prints v with about four significant digits.
func num(v float64) string {
	switch a := max(v, -v); {
	case a == 0:
		return "0"
	case a >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 1:
		return strconv.FormatFloat(v, 'f', 3-digits(a), 64)
	case a >= 0.1:
		return strconv.FormatFloat(v, 'f', 3, 64)
	default:
		return strconv.FormatFloat(v, 'g', 3, 64)
	}
}

func digits(a float64) int {
	n := 0
	for ; a >= 10; a /= 10 {
		n++
	}
	return n
}
