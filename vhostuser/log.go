package vhostuser

import (
	"sync"
	"time"
)

// Complaints a guest can cause (malformed chains and a broken queue, per
// queue; refused front-end messages, per connection) are logged at most
// logBurst at once and then one per logEvery, so that a guest cannot flood
// the host's log; the count of lines left out goes with the next line.
const (
	logBurst = 10
	logEvery = time.Second
)

// logLimiter is a token bucket of log lines.
type logLimiter struct {
	mu         sync.Mutex
	tokens     int
	last       time.Time
	suppressed uint64
}

// allow takes a token if there is one. When it does, it also returns how
// many lines were suppressed since the last allowed one.
func (l *logLimiter) allow(now time.Time) (bool, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last.IsZero() {
		l.tokens, l.last = logBurst, now
	} else if k := now.Sub(l.last) / logEvery; k > 0 {
		l.tokens += int(min(k, logBurst))
		l.last = l.last.Add(k * logEvery)
		if l.tokens >= logBurst {
			l.tokens, l.last = logBurst, now
		}
	}
	if l.tokens == 0 {
		l.suppressed++
		return false, 0
	}
	l.tokens--
	s := l.suppressed
	l.suppressed = 0
	return true, s
}
