package ism

import (
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
)

// Refusals are logged at most logBurst at once and then one per logEvery per
// device, so that a hostile guest cannot flood the host's log; the count of
// lines left out goes with the next line.
const (
	logBurst = 10
	logEvery = time.Second
)

// limiter is a token bucket of log lines.
type limiter struct {
	mu         sync.Mutex
	tokens     int
	last       time.Time
	suppressed uint64
}

// allow takes a token if there is one. When it does, it also returns how
// many lines were suppressed since the last allowed one.
func (l *limiter) allow(now time.Time) (bool, uint64) {
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

// refuse counts a refused request, logs it (rate-limited) and returns st as
// the error to give the driver.
func (d *Device) refuse(req abi.Request, st abi.Status, why string) error {
	if int(st) < NumStatus {
		d.stats.refused[st].Add(1)
	}
	level := refusalLevel(st)
	if !d.log.Logger.IsLevelEnabled(level) {
		return st
	}
	ok, suppressed := d.lim.allow(d.f.now())
	if !ok {
		return st
	}
	fields := logrus.Fields{
		"op":     req.Op.String(),
		"status": uint32(st),
	}
	switch req.Op {
	case abi.OpRegisterDMB:
		fields["addr"], fields["len"], fields["rgid"], fields["index"] = hex(req.Addr), req.Len, hex(req.GID), req.Index
	case abi.OpMove:
		fields["token"], fields["dmbe"], fields["offset"], fields["len"], fields["flags"] = hex(req.Token), req.Index, req.Offset, req.Len, req.Flags
	case abi.OpUnregisterDMB, abi.OpAttachDMB, abi.OpDetachDMB:
		fields["token"] = hex(req.Token)
	case abi.OpSignal:
		fields["rgid"], fields["code"] = hex(req.GID), req.Index
	case abi.OpQueryRGID:
		fields["rgid"] = hex(req.GID)
	case abi.OpSetSBA:
		fields["addr"], fields["flags"] = hex(req.Addr), req.Flags
	}
	if suppressed > 0 {
		fields["suppressed"] = suppressed
	}
	d.log.WithFields(fields).Log(level, "ism: refused request: "+why+": "+st.Error())
	return st
}

func hex(v uint64) string { return fmt.Sprintf("%#x", v) }

// refusalLevel: what a correct driver can meet in normal operation (a peer
// went away, a limit, a race) is Debug; what only a broken or hostile driver
// does is Warn; our own failures are Error.
func refusalLevel(st abi.Status) logrus.Level {
	switch st {
	case abi.StatusNoEntry, abi.StatusNoSpace, abi.StatusBusy, abi.StatusNotReady, abi.StatusUnsupported:
		return logrus.DebugLevel
	case abi.StatusInternal:
		return logrus.ErrorLevel
	}
	return logrus.WarnLevel
}
