package ism

import (
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
)

// Signal posts a software event (abi.EventSWR with this device's GID, code
// and info) to the device with GID rgid, which may be this device.
//
// Any guest could otherwise flood any other's event queue, so a SIGNAL
// needs a DMB relationship (related), is rate-limited per sender
// (Limits.SignalRate, SignalBurst), and is refused when the target's
// Notifier has no room for it: the sender learns that its event was not
// delivered, rather than the target losing it unseen.
func (d *Device) Signal(rgid uint64, code uint16, info uint64) error {
	req := abi.Request{Op: abi.OpSignal, GID: rgid, Index: uint32(code), Offset: info}
	if d.closed.Load() {
		return d.refuse(req, abi.StatusNotReady, "device disconnected")
	}
	t := d.f.device(rgid)
	if t == nil {
		return d.refuse(req, abi.StatusNoEntry, "rgid not connected")
	}
	if !d.related(t) {
		d.stats.signalsRefusedPeer.Add(1)
		return d.refuse(req, abi.StatusPermission, whyNoRelation)
	}
	f := d.f
	if !d.sig.take(f.now(), f.signalRate.Load(), f.signalBurst.Load()) {
		d.stats.signalsRefusedRate.Add(1)
		return d.refuse(req, abi.StatusBusy, whySignalRate)
	}
	ev := abi.Event{Type: abi.EventSWR, Code: code, GID: d.gid, Info: info}
	if f.faultsOn.Load() {
		if drop, late := f.signalFault(d, t); drop || late != nil {
			if late != nil {
				late.hold(heldSignal{target: t, ev: ev})
			}
			d.stats.swEvents.Add(1) // the sender is told OK: a lossy device
			return nil
		}
	}
	switch t.post(ev) {
	case postGone:
		return d.refuse(req, abi.StatusNoEntry, "rgid not connected")
	case postDropped:
		d.stats.signalsRefusedQueue.Add(1)
		return d.refuse(req, abi.StatusNoSpace, whyEventQueue)
	}
	d.stats.swEvents.Add(1)
	return nil
}

// related reports whether d and t have a DMB relationship, as the two ends
// of an SMC-D link group do: one of them owns a live DMB whose rgid is the
// other. A device is related to itself (both ends of a connection in one
// guest). It takes one device lock at a time.
func (d *Device) related(t *Device) bool {
	if t == d {
		return true
	}
	d.mu.RLock()
	ok := d.rgids[t.gid] > 0
	d.mu.RUnlock()
	if ok {
		return true
	}
	t.mu.RLock()
	ok = t.rgids[d.gid] > 0
	t.mu.RUnlock()
	return ok
}

type postResult int

const (
	postQueued  postResult = iota // the Notifier took it
	postGone                      // the device is disconnected
	postDropped                   // the Notifier had no room for it
)

// post queues ev for the device's driver unless the device is gone or its
// Notifier has no room; a dropped event is counted here, as the target's.
func (d *Device) post(ev abi.Event) postResult {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.gone {
		return postGone
	}
	if !d.n.PostEvent(ev) {
		if ev.Type == abi.EventSWR {
			d.stats.swEventsDropped.Add(1)
			return postDropped
		}
		// The Notifier's contract says this cannot happen: a driver
		// that misses a GID or DMB event may wait for ever.
		d.stats.deviceEventsDropped.Add(1)
		if e := d.lim.Entry(d.f.now(), d.log, logrus.ErrorLevel); e != nil {
			e.WithFields(logrus.Fields{"type": uint16(ev.Type), "token": hex(ev.Token), "event_gid": hex(ev.GID)}).
				Error("ism: device event dropped: the event queue had no room")
		}
		return postDropped
	}
	d.stats.events.Add(1)
	return postQueued
}

// signalBucket is a device's SIGNAL budget: a token bucket refilled at a
// rate per second up to a burst. The zero value starts full.
type signalBucket struct {
	mu     sync.Mutex
	tokens float64
	last   time.Time
}

// take takes a token if there is one. now is the fabric's clock (tests fix
// it); a clock that goes back refills nothing.
func (b *signalBucket) take(now time.Time, rate, burst int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.last.IsZero() {
		b.tokens, b.last = float64(burst), now
	} else if dt := now.Sub(b.last); dt > 0 {
		b.tokens = min(float64(burst), b.tokens+dt.Seconds()*float64(rate))
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
