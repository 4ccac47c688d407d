package ismvirtio

import (
	"testing"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
)

func swr(from uint64, code uint16) abi.Event {
	return abi.Event{Type: abi.EventSWR, GID: from, Code: code}
}

// TestEventQueueBounds: one sender's software events stop at its share,
// all of them at MaxPendingEvents; device events are never refused for
// them, come out first, and a pending duplicate is not queued twice.
func TestEventQueueBounds(t *testing.T) {
	q := newEventQueue(3)
	for i := range 3 {
		if !q.push(swr(1, uint16(i))) {
			t.Fatalf("event %d of sender 1 refused", i)
		}
	}
	if q.push(swr(1, 3)) {
		t.Fatal("sender 1 got past its share")
	}
	if !q.push(swr(2, 0)) {
		t.Fatal("sender 2 refused for sender 1's events")
	}
	gone := abi.Event{Type: abi.EventGID, GID: 1}
	dmbGone := abi.Event{Type: abi.EventDMB, Token: 7, GID: 2}
	if !q.push(gone) || !q.push(dmbGone) || !q.push(gone) {
		t.Fatal("device event refused")
	}
	want := []abi.Event{gone, dmbGone, swr(1, 0), swr(1, 1), swr(1, 2), swr(2, 0)}
	if q.len() != len(want) {
		t.Fatalf("%d queued, want %d", q.len(), len(want))
	}
	for i, w := range want[:3] {
		if ev := q.front(); ev != w {
			t.Fatalf("event %d: %+v, want %+v", i, ev, w)
		}
		q.pop()
	}
	// Sender 1 has room for one again.
	if !q.push(swr(1, 9)) || q.push(swr(1, 10)) {
		t.Fatal("sender 1's share after a delivery")
	}
	q.clear()
	if q.len() != 0 || len(q.perSource) != 0 {
		t.Fatal("clear left events")
	}

	// All senders together stop at MaxPendingEvents; device events still fit.
	q = newEventQueue(MaxPendingEvents)
	for i := range MaxPendingEvents {
		if !q.push(swr(uint64(i%7+1), uint16(i))) {
			t.Fatalf("software event %d refused", i)
		}
	}
	if q.push(swr(99, 0)) {
		t.Fatal("software event past MaxPendingEvents")
	}
	for i := range MaxPendingDeviceEvents {
		if !q.push(abi.Event{Type: abi.EventDMB, Token: uint64(i + 1)}) {
			t.Fatalf("device event %d refused", i)
		}
	}
	if q.push(abi.Event{Type: abi.EventDMB, Token: 1 << 40}) {
		t.Fatal("device event past MaxPendingDeviceEvents")
	}
	// Order within each class survives the array's reuse.
	for i := range MaxPendingDeviceEvents {
		if ev := q.front(); ev.Token != uint64(i+1) {
			t.Fatalf("device event %d: %+v", i, ev)
		}
		q.pop()
	}
	for i := range MaxPendingEvents {
		if ev := q.front(); ev.Code != uint16(i) {
			t.Fatalf("software event %d: %+v", i, ev)
		}
		q.pop()
		if !q.push(swr(uint64(i%7+1), uint16(MaxPendingEvents+i))) {
			t.Fatalf("software event refused after a delivery")
		}
	}
}

// TestSignalFloodKeepsDeviceEvents: B floods A, which posts no event
// buffers, with SIGNALs. B's SIGNALs beyond its share of A's queue get
// NOSPACE and count as A's dropped software events; C's SIGNAL still finds
// room; and when C's device stops, A's EventGID for C is queued and is the
// first event A gets once it posts buffers. No device event is dropped.
func TestSignalFloodKeepsDeviceEvents(t *testing.T) {
	const share = 16
	s := newWrappedFabricServer(t, map[string]uint64{"a": gidA, "b": gidB, "c": gidC}, func(b *Backend) vhostuser.Backend {
		b.pending = newEventQueue(share)
		return b
	})
	s.fabric.SetLimits(ism.Limits{SignalBurst: 1 << 20})
	a, b, c := s.connect("a"), s.connect("b"), s.connect("c")
	a.register(4096, gidB, 0)
	a.register(4096, gidC, 1)

	const flood = 200
	taken := 0
	for i := range flood {
		switch st := b.do(abi.Request{Op: abi.OpSignal, GID: gidA, Index: uint32(i)}, nil).Status; st {
		case abi.StatusOK:
			taken++
		case abi.StatusNoSpace:
		default:
			t.Fatalf("SIGNAL %d: %v", i, st)
		}
	}
	if taken != share {
		t.Fatalf("%d of B's SIGNALs taken, want its share %d", taken, share)
	}
	if st := c.do(abi.Request{Op: abi.OpSignal, GID: gidA, Index: 0xC}, nil).Status; st != abi.StatusOK {
		t.Fatalf("C's SIGNAL during B's flood: %v", st)
	}
	if err := c.fe.SetStatus(0); err != nil { // C's device stops: A hears of it
		t.Fatal(err)
	}
	statsOf := func(name string) ism.Stats {
		for _, d := range s.fabric.DeviceStats() {
			if d.Name == name {
				return d.Stats
			}
		}
		t.Fatalf("no stats for %s", name)
		return ism.Stats{}
	}
	for statsOf("a").Events < share+2 {
		// The stop runs on C's connection: wait for its event to be queued.
		if st := a.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusOK {
			t.Fatalf("QUERY_RGID: %v", st)
		}
	}

	var got []abi.Event
	for range share + 2 {
		_, buf := a.postEventBuffer()
		got = append(got, a.waitEvent(buf))
	}
	if got[0] != (abi.Event{Type: abi.EventGID, GID: gidC}) {
		t.Fatalf("first event %+v, want C's EventGID", got[0])
	}
	for i, ev := range got[1 : share+1] {
		if ev != (abi.Event{Type: abi.EventSWR, GID: gidB, Code: uint16(i)}) {
			t.Fatalf("event %d: %+v, want B's code %d", i+1, ev, i)
		}
	}
	if ev := got[share+1]; ev != (abi.Event{Type: abi.EventSWR, GID: gidC, Code: 0xC}) {
		t.Fatalf("last event %+v, want C's SIGNAL", ev)
	}
	sa, sb := statsOf("a"), statsOf("b")
	if sa.SWEventsDropped != flood-share || sa.DeviceEventsDropped != 0 {
		t.Errorf("A: %d software events dropped (want %d), %d device events dropped", sa.SWEventsDropped, flood-share, sa.DeviceEventsDropped)
	}
	if sb.SignalsRefusedQueue != flood-share {
		t.Errorf("B: %d SIGNALs refused for A's queue, want %d", sb.SignalsRefusedQueue, flood-share)
	}
	// B's share is free again.
	if st := b.do(abi.Request{Op: abi.OpSignal, GID: gidA, Index: 1}, nil).Status; st != abi.StatusOK {
		t.Fatalf("SIGNAL after A read its events: %v", st)
	}
}

// TestOptionsEventsPerSource: the share is checked and defaulted.
func TestOptionsEventsPerSource(t *testing.T) {
	o := Options{}
	if err := o.Check(); err != nil || o.EventsPerSource != DefaultEventsPerSource {
		t.Fatalf("default: %v %+v", err, o)
	}
	for _, n := range []int{-1, MaxPendingEvents + 1} {
		o := Options{EventsPerSource: n}
		if err := o.Check(); err == nil {
			t.Errorf("events per source %d accepted", n)
		}
	}
	o = Options{MaxMapped: 8192, MaxAttach: 1 << 30}
	if err := o.Check(); err != nil || o.MaxAttach != 8192 {
		t.Fatalf("attach memory over the mapped bytes: %v %+v", err, o)
	}
}
