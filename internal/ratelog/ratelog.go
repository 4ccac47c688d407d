// Package ratelog limits the log lines a guest can cause, so that a hostile
// guest cannot flood the host's log: a token bucket of Burst lines, refilled
// one per Every, that counts the lines it left out so the next line can say
// how many.
package ratelog

import (
	"sync"
	"time"
)

const (
	Burst = 10
	Every = time.Second
)

// Limiter is a token bucket of log lines. The zero value is ready to use;
// it is safe for concurrent use.
type Limiter struct {
	mu         sync.Mutex
	tokens     int
	last       time.Time
	suppressed uint64
}

// Allow takes a token if there is one. When it does, it also returns how
// many lines were suppressed since the last allowed one. now is the caller's
// clock, so tests can fix it.
func (l *Limiter) Allow(now time.Time) (ok bool, suppressed uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last.IsZero() {
		l.tokens, l.last = Burst, now
	} else if k := now.Sub(l.last) / Every; k > 0 {
		l.tokens += int(min(k, Burst))
		l.last = l.last.Add(k * Every)
		if l.tokens >= Burst {
			l.tokens, l.last = Burst, now
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
