package ism

import (
	"fmt"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/internal/ratelog"
)

// Refusals are logged at most logBurst at once and then one per logEvery per
// device, so that a hostile guest cannot flood the host's log; the count of
// lines left out goes with the next line.
const (
	logBurst = ratelog.Burst
	logEvery = ratelog.Every
)

type limiter = ratelog.Limiter

// refuse counts a refused request, logs it (rate-limited) and returns st as
// the error to give the driver.
func (d *Device) refuse(req abi.Request, st abi.Status, why string) error {
	if int(st) < NumStatus {
		d.stats.refused[st].Add(1)
	}
	level := refusalLevel(st)
	if limitReason(why) {
		level = logrus.InfoLevel
	}
	if !d.log.Logger.IsLevelEnabled(level) {
		return st
	}
	ok, suppressed := d.lim.Allow(d.f.now())
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

// Reasons of refusals by a limit the operator set. A correct driver can meet
// them, but they are worth seeing at the default level: a guest at its
// limits, or one flooding its peers.
const (
	whyDMBLimit    = "device DMB limit"
	whyAttachLimit = "attach-memory limit"
	whyMappedLimit = "mapped-bytes limit"
	whySignalRate  = "signal rate limit"
	whyEventQueue  = "rgid's event queue has no room for the sender's events"
	whyNoRelation  = "no DMB between sender and rgid"
)

func limitReason(why string) bool {
	switch why {
	case whyDMBLimit, whyAttachLimit, whyMappedLimit, whySignalRate, whyEventQueue:
		return true
	}
	return false
}
