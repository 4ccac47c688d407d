package ismvirtio

import (
	"runtime/debug"
	"time"

	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
)

// heartbeat beats dev's SBA heartbeat (ism.Device.Beat) every
// Options.Heartbeat until stop is closed. It takes the VM's device lock as a
// queue batch does, and beats only while dev is still this Backend's device
// (Stop clears b.dev under that lock, exclusively, so a beat never follows
// a stop).
// The driver reads the count to tell a live backend from a dead one.
func (b *Backend) heartbeat(vdev *vhostuser.Guest, dev *ism.Device, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	// The SBA is guest RAM: a front-end may have shrunk the memory file
	// under it. A fault closes this VM's connection, not the backend.
	debug.SetPanicOnFault(true)
	defer b.closeOnFault(vdev, "writing the heartbeat")
	t := time.NewTicker(b.opts.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		vdev.WithMemoryLock(func() {
			if b.dev == dev {
				dev.Beat()
			}
		})
	}
}

// startBeat starts the heartbeat of dev, unless it runs already, the
// options have none, or a handover holds it off (Quiesce).
func (b *Backend) startBeat(vdev *vhostuser.Guest, dev *ism.Device) {
	if b.opts.Heartbeat <= 0 {
		return
	}
	b.hbMu.Lock()
	defer b.hbMu.Unlock()
	if b.quiesced || b.stopBeat != nil {
		return
	}
	b.stopBeat, b.beatDone = make(chan struct{}), make(chan struct{})
	go b.heartbeat(vdev, dev, b.stopBeat, b.beatDone)
}

// stopHeartbeat tells the heartbeat to end and returns the channel closed
// once it has (nil if none ran).
func (b *Backend) stopHeartbeat() <-chan struct{} {
	b.hbMu.Lock()
	defer b.hbMu.Unlock()
	if b.stopBeat == nil {
		return nil
	}
	close(b.stopBeat)
	done := b.beatDone
	b.stopBeat, b.beatDone = nil, nil
	return done
}
