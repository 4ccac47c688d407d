package bench

import (
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
)

// The chart: SMC-D against TCP, one panel per scope, one group of bars per
// test, one bar per SMC-D transport. Every bar is oriented so that above 1
// means SMC-D did better: smcd/tcp for higher-is-better tests, tcp/smcd for
// lower-is-better ones (latency). The y axis is logarithmic (a ratio of 2
// and one of 1/2 are equally far from 1), shared by the panels.

// Chart geometry, in SVG user units (px).
const (
	chartW       = 960
	chartLeft    = 96  // y tick labels and the axis title
	chartRight   = 110 // "SMC-D better" / "TCP better" beside the 1 line
	chartTop     = 84  // title, conditions, legend
	chartPanelH  = 290
	chartPlotTop = 30  // from the panel's top
	chartPlotH   = 210 // then the x labels
	chartFooterH = 62
)

var chartColors = map[string]string{
	"smcd-attach": "#1f77b4",
	"smcd-copy":   "#ff7f0e",
	legacySMCD:    "#2ca02c",
	"kernel-smcd": "#9467bd",
	"kernel-lo":   "#8c564b",
}

var scopeTitles = map[string]string{
	"inter-VM": "inter-VM: two guests on one backend",
	"intra-VM": "intra-VM: both ends in one guest",
}

// chartBar is one bar as drawn: oriented so that above 1 is SMC-D better.
type chartBar struct {
	value, lo, hi float64
	rounds        int
	noisy         bool
}

// orient turns a smcd/tcp ratio into the chart's orientation.
func orient(x Ratio, lowerIsBetter bool) chartBar {
	b := chartBar{value: x.Value, lo: x.Min, hi: x.Max, rounds: x.Rounds, noisy: x.Noisy}
	if lowerIsBetter {
		inv := func(v float64) float64 {
			if v <= 0 {
				return math.Inf(1)
			}
			return 1 / v
		}
		b.value, b.lo, b.hi = inv(x.Value), inv(x.Max), inv(x.Min)
	}
	return b
}

// svgNum prints a coordinate with one decimal: fixed, so the output is
// byte-for-byte stable.
func svgNum(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) }

func svgText(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s))
	return b.String()
}

// nice is m×10^k, computed so that it prints as short as it reads (0.05,
// not 0.05000000000000001).
func nice(m float64, k int) float64 {
	if k < 0 {
		return m / math.Pow10(-k)
	}
	return m * math.Pow10(k)
}

// niceBelow is the largest 1, 2 or 5 times a power of ten at most x (> 0).
func niceBelow(x float64) float64 {
	k := int(math.Floor(math.Log10(x)))
	for _, m := range []float64{5, 2, 1} {
		if nice(m, k) <= x*(1+1e-9) {
			return nice(m, k)
		}
	}
	return nice(5, k-1)
}

// niceAbove is the smallest 1, 2 or 5 times a power of ten at least x (> 0).
func niceAbove(x float64) float64 {
	k := int(math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 5} {
		if nice(m, k) >= x*(1-1e-9) {
			return nice(m, k)
		}
	}
	return nice(1, k+1)
}

// chartTicks are the 1-2-5 values in [lo, hi], or only the powers of ten
// when those are too many.
func chartTicks(lo, hi float64) []float64 {
	var all, tens []float64
	for k := int(math.Floor(math.Log10(lo))); k <= int(math.Ceil(math.Log10(hi))); k++ {
		for _, m := range []float64{1, 2, 5} {
			v := nice(m, k)
			if v >= lo*(1-1e-9) && v <= hi*(1+1e-9) {
				all = append(all, v)
				if m == 1 {
					tens = append(tens, v)
				}
			}
		}
	}
	if len(all) > 10 {
		return tens
	}
	return all
}

// WriteSVG draws the SMC-D transports' ratios to TCP as a bar chart (a
// standalone SVG document; see the comment at the top of chart.go). The
// title carries the run's conditions from the report's fields. The output
// depends only on the report: stable order, fixed number formats.
func (r *Report) WriteSVG(w io.Writer) error {
	// What to draw: scopes and tests with cells, SMC-D transports with a
	// ratio to TCP.
	var scopes []string
	hasTest := map[string]bool{}
	for _, c := range r.Cells {
		if !slices.Contains(scopes, c.Scope) {
			scopes = append(scopes, c.Scope)
		}
		hasTest[c.Test] = true
	}
	slices.SortStableFunc(scopes, func(a, b string) int { return index(Scopes, a) - index(Scopes, b) })
	var tests []Test
	for _, t := range Tests {
		if hasTest[t.Name] {
			tests = append(tests, t)
		}
	}
	type key struct{ scope, test, tr string }
	bars := map[key]chartBar{}
	var transports []string
	for _, tr := range SMCDTransports {
		for _, x := range r.Ratios {
			t := testByName(x.Test)
			if x.Num != tr || x.Den != "tcp" || t == nil {
				continue
			}
			bars[key{x.Scope, x.Test, tr}] = orient(x, t.LowerIsBetter)
			if !slices.Contains(transports, tr) {
				transports = append(transports, tr)
			}
		}
	}

	// The shared y scale: every finite value, whisker end and 1.
	dlo, dhi := 1.0, 1.0
	for _, b := range bars {
		for _, v := range []float64{b.value, b.lo, b.hi} {
			if v > 0 && !math.IsInf(v, 0) {
				dlo, dhi = math.Min(dlo, v), math.Max(dhi, v)
			}
		}
	}
	lo, hi := math.Min(niceBelow(dlo/1.15), 0.5), math.Max(niceAbove(dhi*1.15), 2)
	ticks := chartTicks(lo, hi)

	rounds := r.Rounds
	if rounds == 0 {
		for _, c := range r.Cells {
			rounds = max(rounds, c.N)
		}
	}
	var cond []string
	if r.Accel != "" {
		cond = append(cond, "accelerator "+r.Accel)
	}
	switch r.VCPUs {
	case 0:
		cond = append(cond, "vCPUs per guest unknown")
	case 1:
		cond = append(cond, "1 vCPU per guest")
	default:
		cond = append(cond, strconv.Itoa(r.VCPUs)+" vCPUs per guest")
	}
	rs := strconv.Itoa(rounds) + " rounds"
	if rounds == 1 {
		rs = "1 round"
	}
	if r.Dur != "" {
		rs += " × " + r.Dur + " per transport"
	}
	cond = append(cond, rs)
	if !r.Started.IsZero() {
		cond = append(cond, r.Started.UTC().Format("2006-01-02 15:04 UTC"))
	}

	nPanels := max(len(scopes), 1)
	height := chartTop + nPanels*chartPanelH + chartFooterH
	plotL, plotR := float64(chartLeft), float64(chartW-chartRight)
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...); b.WriteByte('\n') }
	p(`<?xml version="1.0" encoding="UTF-8"?>`)
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">`,
		chartW, height, chartW, height)
	p(`<rect width="%d" height="%d" fill="#ffffff"/>`, chartW, height)
	p(`<text x="%d" y="26" font-size="17" font-weight="bold">%s</text>`, chartLeft,
		svgText("SMC-D vs TCP in QEMU guests: ratio to TCP per workload (bar above 1 = SMC-D better)"))
	p(`<text x="%d" y="46" font-size="12" fill="#333333">%s</text>`, chartLeft, svgText(strings.Join(cond, " · ")))

	// Legend.
	x := plotL
	for _, tr := range transports {
		p(`<rect x="%s" y="58" width="12" height="12" fill="%s"/>`, svgNum(x), chartColors[tr])
		p(`<text x="%s" y="68">%s</text>`, svgNum(x+16), svgText(tr))
		x += 16 + 7*float64(len(tr)) + 18
	}
	p(`<path d="M%s 58v12M%s 58h8M%s 70h8" stroke="#222222" fill="none"/>`, svgNum(x+4), svgNum(x), svgNum(x))
	p(`<text x="%s" y="68">%s</text>`, svgNum(x+14), svgText("min–max over rounds · label: median ratio, * = its middle half spreads over 25%"))

	if len(scopes) == 0 {
		p(`<text x="%d" y="%d" font-size="14">%s</text>`, chartLeft, chartTop+chartPanelH/2, "no samples")
	}
	for i, scope := range scopes {
		top := float64(chartTop + i*chartPanelH)
		pt, pb := top+chartPlotTop, top+chartPlotTop+chartPlotH
		y := func(v float64) float64 {
			v = math.Min(math.Max(v, lo), hi) // off-scale (or infinite) values stop at the edge
			return pb - (math.Log10(v)-math.Log10(lo))/(math.Log10(hi)-math.Log10(lo))*chartPlotH
		}
		title := scopeTitles[scope]
		if title == "" {
			title = scope
		}
		p(`<g id="panel-%s">`, svgText(scope))
		p(`<text x="%s" y="%s" font-size="13" font-weight="bold">%s</text>`, svgNum(plotL), svgNum(top+18), svgText(title))
		for _, v := range ticks {
			p(`<line x1="%s" x2="%s" y1="%s" y2="%s" stroke="#dddddd"/>`, svgNum(plotL), svgNum(plotR), svgNum(y(v)), svgNum(y(v)))
			p(`<text x="%s" y="%s" text-anchor="end">%s</text>`, svgNum(plotL-6), svgNum(y(v)+4),
				strconv.FormatFloat(v, 'f', -1, 64))
		}
		p(`<line x1="%s" x2="%s" y1="%s" y2="%s" stroke="#888888"/>`, svgNum(plotL), svgNum(plotL), svgNum(pt), svgNum(pb))
		mid := (pt + pb) / 2
		p(`<text transform="translate(%s %s) rotate(-90)" text-anchor="middle">`, svgNum(plotL-54), svgNum(mid))
		p(`<tspan x="0" dy="0">ratio to TCP (log scale)</tspan><tspan x="0" dy="14">above 1 = SMC-D better</tspan></text>`)
		p(`<text x="%s" y="%s" fill="#2a7a2a">▲ SMC-D better</text>`, svgNum(plotR+6), svgNum(y(1)-5))
		p(`<text x="%s" y="%s" fill="#a03030">▼ TCP better</text>`, svgNum(plotR+6), svgNum(y(1)+13))

		gw := (plotR - plotL) / float64(max(len(tests), 1))
		nb := max(len(transports), 1)
		bw := math.Min(32, gw*0.6/float64(nb))
		const gap = 4.0
		for j, t := range tests {
			gx := plotL + gw*float64(j) + gw/2
			orientation := "smcd/tcp"
			if t.LowerIsBetter {
				orientation = "tcp/smcd"
			}
			over := func(tr string) string { return tr + " over tcp" }
			if t.LowerIsBetter {
				over = func(tr string) string { return "tcp over " + tr }
			}
			p(`<text x="%s" y="%s" text-anchor="middle">%s</text>`, svgNum(gx), svgNum(pb+16), svgText(t.Short))
			p(`<text x="%s" y="%s" text-anchor="middle" font-size="10" fill="#555555">%s</text>`, svgNum(gx), svgNum(pb+30), orientation)
			x0 := gx - (float64(nb)*bw+float64(nb-1)*gap)/2
			for k, tr := range transports {
				cx := x0 + float64(k)*(bw+gap) + bw/2
				bar, ok := bars[key{scope, t.Name, tr}]
				if !ok {
					p(`<text x="%s" y="%s" text-anchor="middle" font-size="9" fill="#888888">n/a</text>`, svgNum(cx), svgNum(y(1)-4))
					continue
				}
				y1, yv := y(1), y(bar.value)
				hgt := math.Max(math.Abs(y1-yv), 1)
				p(`<rect x="%s" y="%s" width="%s" height="%s" fill="%s"><title>%s</title></rect>`,
					svgNum(cx-bw/2), svgNum(math.Min(y1, yv)), svgNum(bw), svgNum(hgt), chartColors[tr],
					svgText(fmt.Sprintf("%s, %s, %s: %s (%s–%s, %d rounds)", scope, t.Short, over(tr),
						FormatRatio(bar.value), FormatRatio(bar.lo), FormatRatio(bar.hi), bar.rounds)))
				ylo, yhi := y(bar.lo), y(bar.hi)
				if bar.rounds > 1 {
					p(`<path d="M%s %sV%sM%s %sh%sM%s %sh%s" stroke="#222222" fill="none"/>`,
						svgNum(cx), svgNum(ylo), svgNum(yhi),
						svgNum(cx-bw/4), svgNum(ylo), svgNum(bw/2), svgNum(cx-bw/4), svgNum(yhi), svgNum(bw/2))
				}
				label := FormatRatio(bar.value)
				if math.IsInf(bar.value, 0) {
					label = "∞"
				}
				if bar.noisy {
					label += "*"
				}
				ly := math.Min(yv, yhi) - 4
				if bar.value < 1 {
					ly = math.Max(yv, ylo) + 12
				}
				p(`<text x="%s" y="%s" text-anchor="middle" font-size="10">%s</text>`, svgNum(cx), svgNum(ly), svgText(label))
			}
		}
		p(`<line x1="%s" x2="%s" y1="%s" y2="%s" stroke="#222222" stroke-width="1.5"/>`, svgNum(plotL), svgNum(plotR), svgNum(y(1)), svgNum(y(1)))
		p(`</g>`)
	}

	fy := chartTop + nPanels*chartPanelH + 14
	foot := "Bars: the median over the rounds of the per-round ratio (each round measures every transport in turn); " +
		"whiskers: its min–max."
	if len(r.Failures) > 0 {
		foot += fmt.Sprintf(" %d measurements failed (see the table).", len(r.Failures))
	}
	p(`<text x="%d" y="%d" font-size="10" fill="#333333">%s</text>`, chartLeft, fy, svgText(foot))
	fy += 14
	p(`<text x="%d" y="%d" font-size="10" fill="#333333">%s</text>`, chartLeft, fy,
		svgText("Latency is lower-is-better: its bars show tcp/smcd, so a bar above 1 means SMC-D did better in every group."))
	var env []string
	for _, s := range []string{r.QEMU, r.Host} {
		if s != "" {
			env = append(env, s)
		}
	}
	if r.Load != "" {
		env = append(env, "host load average "+r.Load)
	}
	if len(env) > 0 {
		p(`<text x="%d" y="%d" font-size="10" fill="#333333">%s</text>`, chartLeft, fy+14, svgText(strings.Join(env, "; ")))
	}
	p(`</svg>`)
	_, err := io.WriteString(w, b.String())
	return err
}
