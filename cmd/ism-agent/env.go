package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Env is what a scenario gets: its arguments (every ism.<key>=<value> from the
// kernel command line, without the "ism." prefix) and ways to report.
//
// Output goes to the serial console; the VM harness on the host parses the
// ISM-RESULT lines, so keep keys simple ([A-Za-z0-9_.-]) and values on one
// line (newlines are replaced).
type Env struct {
	// Args holds every ism.<key>=<value> kernel argument, keyed without
	// the "ism." prefix ("ism.peer=1.2.3.4" -> Args["peer"] = "1.2.3.4").
	Args map[string]string
	// Ctx is cancelled when the scenario's time (ism.timeout) is nearly up,
	// so long loops can stop cleanly and report instead of being killed.
	Ctx context.Context

	mu  sync.Mutex
	out *os.File
}

// Arg returns ism.<key>, or def when it is absent.
func (e *Env) Arg(key, def string) string {
	if v, ok := e.Args[key]; ok {
		return v
	}
	return def
}

// ArgInt returns ism.<key> as an int, or def when absent or malformed (a
// malformed value is logged, since it is a test bug).
func (e *Env) ArgInt(key string, def int) int {
	v, ok := e.Args[key]
	if !ok {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		e.Logf("ism.%s=%q is not an int, using %d", key, v, def)
		return def
	}
	return n
}

// ArgDuration returns ism.<key> parsed by time.ParseDuration ("500ms", "3s"),
// or def when absent or malformed.
func (e *Env) ArgDuration(key string, def time.Duration) time.Duration {
	v, ok := e.Args[key]
	if !ok {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		e.Logf("ism.%s=%q is not a duration, using %v", key, v, def)
		return def
	}
	return d
}

// Result prints "ISM-RESULT key=value" for the harness. Values are formatted
// with %v; a time.Duration is printed in nanoseconds-free human form ("1.5ms")
// as Go does.
func (e *Env) Result(key string, value any) {
	e.println(resultLine(key, value))
}

// Logf prints a free-form log line (prefixed "ism-agent: "); the harness keeps
// it in the serial log but does not parse it.
func (e *Env) Logf(format string, args ...any) {
	e.println("ism-agent: " + oneLine(fmt.Sprintf(format, args...)))
}

func (e *Env) println(s string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	// One write per line so concurrent scenario goroutines and kernel
	// messages don't split a marker.
	fmt.Fprint(e.out, s+"\n")
}

func resultLine(key string, value any) string {
	return "ISM-RESULT " + sanitizeKey(key) + "=" + oneLine(fmt.Sprint(value))
}

func sanitizeKey(k string) string {
	if k == "" {
		return "_"
	}
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '.', r == '-':
			return r
		}
		return '_'
	}, k)
}

func oneLine(s string) string {
	return strings.NewReplacer("\r", `\r`, "\n", `\n`).Replace(s)
}

var (
	scenariosMu sync.Mutex
	scenarios   = map[string]func(e *Env) error{}
)

// register makes a scenario runnable as ism.scenario=<name>. Call it from an
// init() in a scenario_*.go file; a duplicate name is a programming error.
func register(name string, fn func(e *Env) error) {
	scenariosMu.Lock()
	defer scenariosMu.Unlock()
	if _, dup := scenarios[name]; dup {
		panic("ism-agent: scenario registered twice: " + name)
	}
	scenarios[name] = fn
}

func lookupScenario(name string) (func(e *Env) error, bool) {
	scenariosMu.Lock()
	defer scenariosMu.Unlock()
	fn, ok := scenarios[name]
	return fn, ok
}

func scenarioNames() []string {
	scenariosMu.Lock()
	defer scenariosMu.Unlock()
	var n []string
	for k := range scenarios {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// parseCmdline extracts ism.<key>=<value> arguments from a kernel command
// line. Double quotes group words, as the kernel does ("ism.x=\"a b\"").
// A bare ism.<key> means "true".
func parseCmdline(cmdline string) map[string]string {
	args := map[string]string{}
	for _, f := range splitCmdline(cmdline) {
		if !strings.HasPrefix(f, "ism.") {
			continue
		}
		k, v, ok := strings.Cut(strings.TrimPrefix(f, "ism."), "=")
		if !ok {
			v = "true"
		}
		if k != "" {
			args[k] = v
		}
	}
	return args
}

func splitCmdline(s string) []string {
	var out []string
	var cur strings.Builder
	inQuote, have := false, false
	for _, r := range s {
		switch {
		case r == '"':
			inQuote = !inQuote
			have = true
		case !inQuote && (r == ' ' || r == '\t' || r == '\n'):
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if have {
		out = append(out, cur.String())
	}
	return out
}
