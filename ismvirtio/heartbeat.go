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
func (b *Backend) heartbeat(vdev *vhostuser.Device, dev *ism.Device, stop <-chan struct{}) {
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
