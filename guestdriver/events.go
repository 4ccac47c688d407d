package guestdriver

import (
	"sync"

	"github.com/ism-backend/ism-backend/abi"
)

// Events from the device reach the application through Events, a channel
// the poller must never block on (it also watches the SBA). What the
// application has not taken yet waits here, in two queues as in the
// backend: device events (a GID or a DMB gone) are never dropped, for a
// driver that misses one waits for ever on a peer that is gone; software
// events (a peer's SIGNAL) are dropped, and counted, past
// maxQueuedSoftEvents. The backend bounds what a peer can make it post
// (its SIGNAL rate and per-source queue), and each device event stands for
// one GID or DMB that went away, so the device queue is bounded by what the
// fabric can hold; maxQueuedDeviceEvents is the last guard. Within each
// queue the order is the device's; device events go out first.
const (
	maxQueuedSoftEvents   = 256
	maxQueuedDeviceEvents = 1 << 16
)

type eventQueue struct {
	mu     sync.Mutex
	device []abi.Event
	soft   []abi.Event
	wake   chan struct{} // 1-buffered: something was pushed
}

func newEventQueue() *eventQueue { return &eventQueue{wake: make(chan struct{}, 1)} }

// push queues ev; false if it was dropped.
func (q *eventQueue) push(ev abi.Event) bool {
	q.mu.Lock()
	ok := true
	switch {
	case ev.Type != abi.EventSWR && len(q.device) < maxQueuedDeviceEvents:
		q.device = append(q.device, ev)
	case ev.Type == abi.EventSWR && len(q.soft) < maxQueuedSoftEvents:
		q.soft = append(q.soft, ev)
	default:
		ok = false
	}
	q.mu.Unlock()
	if ok {
		select {
		case q.wake <- struct{}{}:
		default:
		}
	}
	return ok
}

// pop takes the next event, device events first.
func (q *eventQueue) pop() (abi.Event, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, l := range []*[]abi.Event{&q.device, &q.soft} {
		if len(*l) > 0 {
			ev := (*l)[0]
			*l = (*l)[1:]
			if len(*l) == 0 {
				*l = nil // let the backing array go after a burst
			}
			return ev, true
		}
	}
	return abi.Event{}, false
}

// pumpEvents hands queued events to the Events channel, in order, until
// the driver stops (or the poller ends and nothing is left), then closes
// the channel.
func (d *Driver) pumpEvents() {
	defer close(d.pumped)
	defer close(d.events)
	for {
		ev, ok := d.evq.pop()
		if !ok {
			select {
			case <-d.evq.wake:
				continue
			case <-d.polled:
				if ev, ok = d.evq.pop(); !ok {
					return
				}
			case <-d.stop:
				return
			}
		}
		select {
		case d.events <- ev:
		case <-d.stop:
			return
		}
	}
}
