package ismvirtio

import (
	"fmt"
	"runtime/debug"
	"time"

	"github.com/sirupsen/logrus"

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
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		if _, ok := r.(interface{ Addr() uintptr }); !ok {
			panic(r)
		}
		b.warnGuest(logrus.Fields{"fault": fmt.Sprint(r)}, "fault in this VM's memory writing the heartbeat: closing its connection")
		vdev.Close()
	}()
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
