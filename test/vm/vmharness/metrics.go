package vmharness

import (
	"fmt"
	"net/http"
	"regexp"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// metricsURL is the backend's log line for -metrics-addr; it is written
// before the VM sockets exist, so StartBackend's return has it.
var metricsURL = regexp.MustCompile(`msg="serving metrics" url="(http://[^"]+/metrics)"`)

// Metrics scrapes the backend's /metrics (it must run with -metrics-addr)
// and returns the metric families by name.
func (b *Backend) Metrics() (map[string]*dto.MetricFamily, error) {
	m := metricsURL.FindStringSubmatch(b.Log())
	if m == nil {
		return nil, fmt.Errorf("the backend's log names no metrics URL (started without -metrics-addr?)")
	}
	c := &http.Client{Timeout: b.r.Scaled(10 * time.Second)}
	resp, err := c.Get(m[1])
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", m[1], resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

// MetricValue is the value of the series of family name whose labels
// include all of labels; false if there is none.
func MetricValue(fams map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		for k, v := range labels {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Untyped != nil:
			return m.GetUntyped().GetValue(), true
		}
	}
	return 0, false
}
