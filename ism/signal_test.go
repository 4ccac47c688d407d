package ism

import (
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/abi"
)

func signal(rgid uint64, code uint32) abi.Request {
	return abi.Request{Op: abi.OpSignal, GID: rgid, Index: code}
}

// TestSignalNeedsDMB: a SIGNAL is accepted only toward a GID the sender has
// a live DMB with, owned by either side, or toward itself; anything else is
// PERMISSION, counted, and posts nothing.
func TestSignalNeedsDMB(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	c := newGuest(t, f, "c", 0xC)

	do(t, b.dev, signal(0xA, 1), nil, abi.StatusPermission)
	do(t, a.dev, signal(0xB, 1), nil, abi.StatusPermission)
	do(t, a.dev, signal(0xA, 1), nil, abi.StatusOK) // itself
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 0)
	do(t, b.dev, signal(0xA, 2), nil, abi.StatusOK) // the rgid signals the owner
	do(t, a.dev, signal(0xB, 3), nil, abi.StatusOK) // the owner signals the rgid
	do(t, c.dev, signal(0xA, 4), nil, abi.StatusPermission)
	do(t, a.dev, signal(0xC, 4), nil, abi.StatusPermission)
	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusOK)
	do(t, b.dev, signal(0xA, 5), nil, abi.StatusPermission)

	// Two DMBs for one rgid: one left is enough.
	register(t, b.dev, dmbGPA, 4096, 0xC, 0)
	t2 := register(t, b.dev, dmbGPA+4096, 4096, 0xC, 1)
	do(t, b.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: t2}, nil, abi.StatusOK)
	do(t, c.dev, signal(0xB, 6), nil, abi.StatusOK)
	// A disconnect takes the relationship with it.
	b.dev.Disconnect()
	b2 := newGuest(t, f, "b", 0xB)
	do(t, c.dev, signal(0xB, 7), nil, abi.StatusPermission)

	_, evA := a.n.snapshot()
	_, evB := b.n.snapshot()
	if len(evA) != 2 || evA[0].GID != 0xA || evA[1] != (abi.Event{Type: abi.EventSWR, Code: 2, GID: 0xB}) {
		t.Errorf("A's events %+v: want its own and B's code 2", evA)
	}
	if len(evB) != 2 || evB[0] != (abi.Event{Type: abi.EventSWR, Code: 3, GID: 0xA}) || evB[1] != (abi.Event{Type: abi.EventSWR, Code: 6, GID: 0xC}) {
		t.Errorf("B's events %+v: want A's code 3 and C's code 6", evB)
	}
	if _, ev := b2.n.snapshot(); len(ev) != 0 {
		t.Errorf("the new B got %+v", ev)
	}
	for _, c := range []struct {
		g       *guest
		refused uint64
	}{{a, 2}, {b, 2}, {c, 2}} {
		s := f.DeviceStats()
		var st Stats
		for _, d := range s {
			if d.Name == c.g.dev.Name() {
				st = d.Stats
			}
		}
		if st.SignalsRefusedPeer != c.refused || st.Refused[abi.StatusPermission] != c.refused {
			t.Errorf("%s: %d SIGNALs refused for want of a DMB (%d PERMISSION), want %d",
				c.g.dev.Name(), st.SignalsRefusedPeer, st.Refused[abi.StatusPermission], c.refused)
		}
	}
}

// TestSignalRateLimit: a device may SIGNAL SignalBurst times at once, then
// SignalRate per second; beyond, BUSY, counted. The clock is the fabric's,
// fixed here: no sleeps.
func TestSignalRateLimit(t *testing.T) {
	f := newFabric()
	now := time.Unix(1700000000, 0)
	f.now = func() time.Time { return now }
	f.SetLimits(Limits{SignalRate: 100, SignalBurst: 5})
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	c := newGuest(t, f, "c", 0xC)
	register(t, a.dev, dmbGPA, 4096, 0xB, 0)
	register(t, a.dev, dmbGPA+4096, 4096, 0xC, 1)

	for i := range 5 {
		do(t, b.dev, signal(0xA, uint32(i)), nil, abi.StatusOK)
	}
	do(t, b.dev, signal(0xA, 5), nil, abi.StatusBusy)
	do(t, b.dev, signal(0xA, 5), nil, abi.StatusBusy)
	// The limit is the sender's: C is not held back by B.
	do(t, c.dev, signal(0xA, 9), nil, abi.StatusOK)
	now = now.Add(10 * time.Millisecond) // one token at 100/s
	do(t, b.dev, signal(0xA, 6), nil, abi.StatusOK)
	do(t, b.dev, signal(0xA, 7), nil, abi.StatusBusy)
	now = now.Add(-time.Second) // a clock that goes back refills nothing
	do(t, b.dev, signal(0xA, 7), nil, abi.StatusBusy)
	now = now.Add(time.Hour) // refills up to the burst, no more
	for i := range 5 {
		do(t, b.dev, signal(0xA, uint32(10+i)), nil, abi.StatusOK)
	}
	do(t, b.dev, signal(0xA, 15), nil, abi.StatusBusy)

	if s := b.dev.Stats(); s.SWEvents != 11 || s.SignalsRefusedRate != 5 || s.Refused[abi.StatusBusy] != 5 {
		t.Errorf("B: %d SIGNALs sent, %d refused by the rate (%d BUSY); want 11 and 5", s.SWEvents, s.SignalsRefusedRate, s.Refused[abi.StatusBusy])
	}
	if _, evs := a.n.snapshot(); len(evs) != 12 {
		t.Errorf("A got %d events, want 12", len(evs))
	}
	// The budget is the guest's, not its connection's: a reconnect
	// refills nothing.
	b.dev.Disconnect()
	b2 := newGuest(t, f, "b", 0xB)
	do(t, b2.dev, signal(0xA, 16), nil, abi.StatusBusy)
	if l := f.Limits(); l.SignalRate != 100 || l.SignalBurst != 5 {
		t.Errorf("limits %+v", l)
	}
	f.SetLimits(Limits{})
	if l := f.Limits(); l.SignalRate != DefaultSignalRate || l.SignalBurst != DefaultSignalBurst {
		t.Errorf("default limits %+v", l)
	}
}

// TestSignalFloodKeepsDeviceEvents: the target's transport has no room for
// more software events (a flood filled its share): further SIGNALs get
// NOSPACE and count as the target's dropped software events, while a device
// event (a peer gone) is still delivered and nothing counts as a dropped
// device event.
func TestSignalFloodKeepsDeviceEvents(t *testing.T) {
	f := newFabric()
	f.SetLimits(Limits{SignalBurst: 1 << 20})
	a := newGuest(t, f, "a", 0xA)
	room := 3
	a.n.swRoom = &room
	b := newGuest(t, f, "b", 0xB)
	c := newGuest(t, f, "c", 0xC)
	register(t, a.dev, dmbGPA, 4096, 0xB, 0)
	register(t, a.dev, dmbGPA+4096, 4096, 0xC, 1)

	const flood = 1000
	ok := 0
	for i := range flood {
		switch st := b.dev.Handle(signal(0xA, uint32(i)), nil).Status; st {
		case abi.StatusOK:
			ok++
		case abi.StatusNoSpace:
		default:
			t.Fatalf("SIGNAL %d: %v", i, st)
		}
	}
	c.dev.Disconnect()

	_, evs := a.n.snapshot()
	if ok != 3 || len(evs) != 4 || evs[3] != (abi.Event{Type: abi.EventGID, GID: 0xC}) {
		t.Fatalf("%d SIGNALs taken; A's events %+v: want 3 and then C's EventGID", ok, evs)
	}
	sa, sb := a.dev.Stats(), b.dev.Stats()
	if sa.SWEventsDropped != flood-3 || sa.DeviceEventsDropped != 0 || sa.Events != 4 {
		t.Errorf("A: %d software events dropped (want %d), %d device events dropped, %d events", sa.SWEventsDropped, flood-3, sa.DeviceEventsDropped, sa.Events)
	}
	if sb.SignalsRefusedQueue != flood-3 || sb.Refused[abi.StatusNoSpace] != flood-3 || sb.SWEvents != 3 {
		t.Errorf("B: %d SIGNALs refused for the queue, %d NOSPACE, %d sent", sb.SignalsRefusedQueue, sb.Refused[abi.StatusNoSpace], sb.SWEvents)
	}
	// Counters survive in the fabric's totals after B leaves too.
	b.dev.Disconnect()
	if s := f.Stats(); s.SWEventsDropped != flood-3 || s.SignalsRefusedQueue != flood-3 {
		t.Errorf("fabric %+v", s)
	}
}

// TestDeviceEventDropCounted: a transport that breaks its contract and
// refuses a device event gets it counted (and logged), not lost unseen.
func TestDeviceEventDropCounted(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	a.n.deviceFull = true
	b := newGuest(t, f, "b", 0xB)
	register(t, a.dev, dmbGPA, 4096, 0xB, 0)
	b.dev.Disconnect()
	if s := a.dev.Stats(); s.DeviceEventsDropped != 1 || s.Events != 0 {
		t.Fatalf("A: %+v", s)
	}
}

// TestDMBLimit: REGISTER_DMB past Limits.DeviceDMBs is NOSPACE, counted as
// a refusal by the DMB limit, in copy and attach mode; an UNREGISTER makes
// room again.
func TestDMBLimit(t *testing.T) {
	f := newFabric()
	f.SetLimits(Limits{DeviceDMBs: 2})
	a := newAttachGuest(t, f, "a", 0xA, both)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 0)
	registerAttach(t, a, 4096, 0xB, 1)
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA + 4096, Len: 4096, GID: 0xB, Index: 2}, nil, abi.StatusNoSpace)
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: 0xB, Index: 2}, nil, abi.StatusNoSpace)
	if s := a.dev.Stats(); s.DMBLimitRefused != 2 || s.Refused[abi.StatusNoSpace] != 2 || s.DMBs != 2 {
		t.Fatalf("stats %+v", s)
	}
	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusOK)
	register(t, a.dev, dmbGPA+4096, 4096, 0xB, 2)
}

// TestAttachMemoryLimit: the bytes of attach-mode DMBs a device may own
// (DeviceConfig.MaxAttach) are a limit apart from the mapped bytes: owning
// past it is NOSPACE and counted, attaching a peer's DMB is not held back by
// it, and an UNREGISTER gives the bytes back.
func TestAttachMemoryLimit(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuestConfig(t, f, "b", 0xB, DeviceConfig{Modes: both, MaxAttach: 8192})

	t1, _ := registerAttach(t, b, 5000, 0xA, 0) // 8192 bytes of memfd
	do(t, b.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 1, GID: 0xA, Index: 1}, nil, abi.StatusNoSpace)
	ta, _ := registerAttach(t, a, 1<<20, 0xB, 0)
	attach(t, b, ta, abi.StatusOK) // attachments are the mapped-bytes limit's
	s := b.dev.Stats()
	if s.AttachLimitRefused != 1 || s.MappedLimitRefused != 0 || s.AttachBytes != 8192 || s.MappedBytes != 8192+1<<20 {
		t.Fatalf("stats %+v", s)
	}
	do(t, b.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: t1}, nil, abi.StatusOK)
	b.m.flush()
	registerAttach(t, b, 8192, 0xA, 1)
	if s := b.dev.Stats(); s.AttachBytes != 8192 {
		t.Fatalf("attach bytes %d after unregister and register", s.AttachBytes)
	}
}
