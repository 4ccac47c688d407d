package ismvirtio

import "github.com/ism-backend/ism-backend/abi"

// Events wait in the backend while the driver has no event buffer posted.
// Device events (a peer or a DMB gone) and software events (peers'
// SIGNALs) are held apart and bounded apart, so that no SIGNAL flood can
// take the room of a device event: a driver that misses one waits for ever
// on a peer or a DMB that is gone. Device events go out first.
const (
	// MaxPendingEvents bounds the software events held for one driver, so
	// that a guest that never reads its event queue cannot grow the
	// backend's memory (32 bytes each).
	MaxPendingEvents = 4096
	// DefaultEventsPerSource bounds the software events of one sender among
	// them (Options.EventsPerSource): a flooding peer fills its own share,
	// and the others' SIGNALs still find room.
	DefaultEventsPerSource = 256
	// MaxPendingDeviceEvents bounds the device events held, after identical
	// ones are coalesced. The fabric cannot reach it: there is at most one
	// EventGID per peer GID and one EventDMB per DMB the driver attached
	// (at most ism.MaxMappings at once), and a pending duplicate of either
	// says nothing new. Should it be reached, the event is refused, and
	// the model counts and logs it.
	MaxPendingDeviceEvents = 1024
)

// eventQueue is what one driver's event queue holds; the Backend's evMu
// guards it.
type eventQueue struct {
	dev       fifo // device events, in order
	sw        fifo // software events, in order
	perSource map[uint64]int
	maxSource int
}

func newEventQueue(perSource int) eventQueue {
	return eventQueue{perSource: make(map[uint64]int), maxSource: perSource}
}

// push queues ev, or refuses it (false): a software event when its sender
// has its share queued or all software events are, a device event only
// past MaxPendingDeviceEvents. A device event identical to one queued is
// taken but not queued twice.
func (q *eventQueue) push(ev abi.Event) bool {
	if ev.Type != abi.EventSWR {
		if q.dev.contains(ev) {
			return true
		}
		if q.dev.len() >= MaxPendingDeviceEvents {
			return false
		}
		q.dev.push(ev)
		return true
	}
	if q.sw.len() >= MaxPendingEvents || q.perSource[ev.GID] >= q.maxSource {
		return false
	}
	q.perSource[ev.GID]++
	q.sw.push(ev)
	return true
}

func (q *eventQueue) len() int { return q.dev.len() + q.sw.len() }

// front is the event to deliver next: device events first; len must be > 0.
func (q *eventQueue) front() abi.Event {
	if q.dev.len() > 0 {
		return q.dev.front()
	}
	return q.sw.front()
}

// pop removes front's event.
func (q *eventQueue) pop() {
	if q.dev.len() > 0 {
		q.dev.pop()
		return
	}
	gid := q.sw.front().GID
	if q.perSource[gid]--; q.perSource[gid] <= 0 {
		delete(q.perSource, gid)
	}
	q.sw.pop()
}

func (q *eventQueue) clear() {
	q.dev, q.sw = fifo{}, fifo{}
	clear(q.perSource)
}

// fifo is a queue of events that reuses its array: pops move a head, and
// pushes move what is left to the front once the array is full.
type fifo struct {
	buf  []abi.Event
	head int
}

func (f *fifo) len() int           { return len(f.buf) - f.head }
func (f *fifo) front() abi.Event   { return f.buf[f.head] }
func (f *fifo) items() []abi.Event { return f.buf[f.head:] }

func (f *fifo) push(ev abi.Event) {
	if f.head > 0 && len(f.buf) == cap(f.buf) {
		f.buf = f.buf[:copy(f.buf, f.buf[f.head:])]
		f.head = 0
	}
	f.buf = append(f.buf, ev)
}

func (f *fifo) pop() {
	f.head++
	if f.head == len(f.buf) {
		f.buf, f.head = f.buf[:0], 0
	}
}

func (f *fifo) contains(ev abi.Event) bool {
	for _, e := range f.items() {
		if e == ev {
			return true
		}
	}
	return false
}
