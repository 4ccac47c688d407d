package ismvirtio

import (
	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/internal/ratelog"
)

// Complaints about a guest's buffers are logged at most logBurst at once and
// then one per logEvery per connection, so that a guest cannot flood the
// host's log; the count of lines left out goes with the next line.
const (
	logBurst = ratelog.Burst
	logEvery = ratelog.Every
)

type logLimiter = ratelog.Limiter

// warnGuest logs a complaint about the guest's buffers, rate-limited.
func (b *Backend) warnGuest(fields logrus.Fields, msg string) {
	ok, suppressed := b.lim.Allow(b.now())
	if !ok {
		return
	}
	if suppressed > 0 {
		fields["suppressed"] = suppressed
	}
	b.log.WithFields(fields).Warn(msg)
}

// lifeLog: the entry for a start or stop line, or nil when it is left out.
func (b *Backend) lifeLog(level logrus.Level) *logrus.Entry {
	return b.lifeLim.Entry(b.now(), b.log, level)
}
