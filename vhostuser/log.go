package vhostuser

import (
	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/internal/ratelog"
)

// Complaints a guest can cause (malformed chains and a broken queue, per
// queue; refused front-end messages, per connection) are logged at most
// logBurst at once and then one per logEvery, so that a guest cannot flood
// the host's log; the count of lines left out goes with the next line.
const (
	logBurst = ratelog.Burst
	logEvery = ratelog.Every
)

type logLimiter = ratelog.Limiter

// Every log line a guest or its QEMU can repeat goes through one of these:
// each returns the entry to log with, or nil when the line is left out.
//
//   - guestLog: lines one front-end message or kick causes (refusals,
//     unknown requests, rings that do not translate), per connection.
//   - traceLog: the Debug trace of messages, per connection, apart so that
//     a debug log cannot use up the warnings' allowance.
//   - lifeLog: connects, disconnects, device start and stop, per VM, so
//     that neither a guest's reset loop nor a QEMU's reconnect loop floods.
func (d *Guest) guestLog(level logrus.Level) *logrus.Entry {
	return d.lim.Entry(d.srv.now(), d.log, level)
}

func (d *Guest) traceLog() *logrus.Entry {
	return d.traceLim.Entry(d.srv.now(), d.log, logrus.DebugLevel)
}

func (d *Guest) lifeLog(level logrus.Level) *logrus.Entry {
	return d.lifeLim.Entry(d.srv.now(), d.log, level)
}
