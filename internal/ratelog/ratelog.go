// Package ratelog limits the log lines a guest can cause, so that a hostile
// guest cannot flood the host's log: a token bucket of Burst lines, refilled
// one per Every, that counts the lines it left out so the next line can say
// how many.
package ratelog

import (
	"sync"
	"time"

	"github.com/sirupsen/logrus"
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

// Entry is Allow for one line at level on e: it returns e to log the line
// with, carrying the count of lines left out as field "suppressed", or nil
// when the line is to be left out. A level e's logger does not log takes
// no token, so enabled lines are not left out for the sake of disabled ones.
func (l *Limiter) Entry(now time.Time, e *logrus.Entry, level logrus.Level) *logrus.Entry {
	if !e.Logger.IsLevelEnabled(level) {
		return nil
	}
	ok, suppressed := l.Allow(now)
	if !ok {
		return nil
	}
	if suppressed > 0 {
		return e.WithField("suppressed", suppressed)
	}
	return e
}
