package vmharness

import (
	"strings"
)

// Outcome is what a guest's ism-agent reported on the serial console.
type Outcome struct {
	Began    bool              // ISM-AGENT-BEGIN seen
	Scenario string            // name from ISM-AGENT-BEGIN
	Ended    bool              // ISM-AGENT-END seen
	OK       bool              // ISM-AGENT-END ok
	Fail     string            // the error after "ISM-AGENT-END fail: "
	Results  map[string]string // ISM-RESULT key=value (the last value wins)
}

// ParseSerial extracts the agent's markers from serial output. Markers are
// found anywhere in a line, since kernel messages can share the console.
func ParseSerial(serial string) Outcome {
	o := Outcome{Results: map[string]string{}}
	for _, line := range strings.Split(serial, "\n") {
		line = strings.TrimRight(line, "\r")
		if i := strings.Index(line, "ISM-AGENT-BEGIN "); i >= 0 {
			o.Began = true
			o.Scenario = strings.TrimSpace(line[i+len("ISM-AGENT-BEGIN "):])
		}
		if i := strings.Index(line, "ISM-RESULT "); i >= 0 {
			if k, v, ok := strings.Cut(line[i+len("ISM-RESULT "):], "="); ok {
				o.Results[k] = v
			}
		}
		if i := strings.Index(line, "ISM-AGENT-END "); i >= 0 && !o.Ended {
			rest := line[i+len("ISM-AGENT-END "):]
			o.Ended = true
			if strings.TrimSpace(rest) == "ok" {
				o.OK = true
			} else {
				o.Fail = strings.TrimPrefix(rest, "fail: ")
			}
		}
	}
	return o
}
