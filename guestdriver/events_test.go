package guestdriver

import (
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

// TestEventQueueKeepsDeviceEvents: under a flood of software events that
// nobody takes, every device event is kept, in order, and goes out first;
// software events past the bound are refused (the driver counts them).
func TestEventQueueKeepsDeviceEvents(t *testing.T) {
	q := newEventQueue()
	refused := 0
	for i := range 1000 {
		if !q.push(abi.Event{Type: abi.EventSWR, Code: 1, Info: uint64(i)}) {
			refused++
		}
		if i%100 == 0 {
			ev := abi.Event{Type: abi.EventGID, GID: uint64(i)}
			if i%200 == 0 {
				ev = abi.Event{Type: abi.EventDMB, Token: uint64(i)}
			}
			if !q.push(ev) {
				t.Fatalf("device event %+v refused", ev)
			}
		}
	}
	if refused != 1000-maxQueuedSoftEvents {
		t.Fatalf("%d software events refused, want %d", refused, 1000-maxQueuedSoftEvents)
	}
	for i := 0; i < 1000; i += 100 {
		ev, ok := q.pop()
		if !ok || ev.Type == abi.EventSWR || (ev.GID != uint64(i) && ev.Token != uint64(i)) {
			t.Fatalf("device event %d: %+v %v", i/100, ev, ok)
		}
	}
	for i := range maxQueuedSoftEvents {
		ev, ok := q.pop()
		if !ok || ev.Type != abi.EventSWR || ev.Info != uint64(i) {
			t.Fatalf("software event %d: %+v %v", i, ev, ok)
		}
	}
	if ev, ok := q.pop(); ok {
		t.Fatalf("left over: %+v", ev)
	}
	// The device queue has a last bound too.
	for i := range maxQueuedDeviceEvents {
		if !q.push(abi.Event{Type: abi.EventGID, GID: uint64(i)}) {
			t.Fatalf("device event %d refused under the bound", i)
		}
	}
	if q.push(abi.Event{Type: abi.EventGID}) {
		t.Fatal("device event past the bound accepted")
	}
}
