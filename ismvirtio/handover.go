package ismvirtio

import (
	"context"
	"errors"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
)

// Handover (docs/handover.md). A Backend is a vhostuser.Quiescer: during a
// handover its heartbeat stops (the new process beats on from the same
// count: one writer of the word at any time) and its mapping worker
// finishes what it has (a map waits for QEMU, which needs the control
// channel served meanwhile). It is a vhostuser.Resumer: in the new process
// Resume takes the device over from the imported fabric instead of
// connecting a new one, with the events that were waiting for the driver.

// EventsState are the events that wait for the driver: device events and
// software events, each in order.
type EventsState struct {
	Device   []abi.Event
	Software []abi.Event
}

// current returns the device, session and vhostuser device of the start
// in force (nil when stopped), read under the device's lock so that a
// Start or Stop on the control goroutine is not half seen.
func (b *Backend) current() (*ism.Device, *session, *vhostuser.Guest) {
	b.evMu.Lock()
	vdev := b.vdev
	b.evMu.Unlock()
	if vdev == nil {
		return nil, nil, nil
	}
	var dev *ism.Device
	var s *session
	vdev.WithMemoryLock(func() { dev, s = b.dev, b.sess })
	return dev, s, vdev
}

// Quiesce implements vhostuser.Quiescer: it stops the heartbeat and waits
// for it to end, and for the mapping worker to have nothing in flight. No
// queue of any VM runs (vhostuser.Server.Freeze), so no new request comes.
func (b *Backend) Quiesce(ctx context.Context) error {
	b.hbMu.Lock()
	b.quiesced = true
	b.hbMu.Unlock()
	if done := b.stopHeartbeat(); done != nil {
		select {
		case <-done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	_, s, _ := b.current()
	if s == nil {
		return nil
	}
	stop := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.idle.Broadcast()
		s.mu.Unlock()
	})
	defer stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.jobs) > 0 || s.running {
		if err := ctx.Err(); err != nil {
			return err
		}
		s.idle.Wait()
	}
	return nil
}

// Idle implements vhostuser.Quiescer.
func (b *Backend) Idle() bool {
	b.hbMu.Lock()
	beating := b.stopBeat != nil
	b.hbMu.Unlock()
	if beating {
		return false
	}
	_, s, _ := b.current()
	if s == nil {
		return true
	}
	s.mu.Lock()
	idle := len(s.jobs) == 0 && !s.running
	s.mu.Unlock()
	return idle && !b.asyncBusy()
}

// Unquiesce implements vhostuser.Quiescer: the heartbeat goes on.
func (b *Backend) Unquiesce() {
	b.hbMu.Lock()
	b.quiesced = false
	b.hbMu.Unlock()
	if dev, _, vdev := b.current(); dev != nil {
		b.startBeat(vdev, dev)
	}
}

// ExportEvents returns the events waiting for the driver. The VM is frozen.
func (b *Backend) ExportEvents() EventsState {
	b.evMu.Lock()
	defer b.evMu.Unlock()
	return EventsState{
		Device:   append([]abi.Event(nil), b.pending.dev.items()...),
		Software: append([]abi.Event(nil), b.pending.sw.items()...),
	}
}

// SetImported makes Resume take the device over from imp, with the events
// of ev waiting for the driver. Call it before the connection is served.
//
// The heartbeat is held off until Unquiesce (vhostuser.Server.Unhold): the
// old process may still take the VM back until the handover commits, and
// the heartbeat word has one writer at a time.
func (b *Backend) SetImported(imp *ism.Imported, ev EventsState) {
	b.imp, b.impEvents = imp, &ev
	b.hbMu.Lock()
	b.quiesced = true
	b.hbMu.Unlock()
}

// Resume implements vhostuser.Resumer: the device taken over from the
// imported fabric, as it was in the old process. The mappings of its
// shared-memory region are still QEMU's; the new mapping worker unmaps them
// when their time comes.
func (b *Backend) Resume(vdev *vhostuser.Guest) error {
	if b.imp == nil {
		return errors.New("ismvirtio: Resume without an imported fabric")
	}
	ev := b.impEvents
	b.evMu.Lock()
	for _, list := range [][]abi.Event{ev.Device, ev.Software} {
		for _, e := range list {
			if !b.pending.push(e) {
				b.evMu.Unlock()
				return errors.New("ismvirtio: imported events beyond the bounds")
			}
		}
	}
	b.evMu.Unlock()
	imp := b.imp
	b.imp, b.impEvents = nil, nil // later connections start afresh
	err := b.start(vdev, func(cfg ism.DeviceConfig) (*ism.Device, error) {
		return imp.Adopt(b.name, b.gid, guestMemory{vdev}, b, cfg.Mapper)
	})
	if err != nil {
		b.evMu.Lock()
		b.pending.clear()
		b.evMu.Unlock()
	}
	return err
}
