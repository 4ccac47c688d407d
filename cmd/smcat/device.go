package main

import (
	"flag"
	"fmt"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/guestdriver"
	"github.com/ism-backend/ism-backend/guestdriver/smcd"
	"github.com/ism-backend/ism-backend/guestdriver/smcdev"
)

var (
	loopback  = flag.Bool("loopback", false, "use an in-process loopback ISM device (CHID 0xFFFF); only connections within this process use SMC-D")
	virtioID  = flag.Int("virtio-id", abi.DefaultVirtioID, "virtio device id of the ISM device")
	pciAddr   = flag.String("pci", "", "PCI address of the ISM device (default: the first one found)")
	hugePages = flag.Int("hugepages", 8, "most 2 MiB huge pages the driver may use for DMBs and buffers")
	waitMode  = flag.String("wait", "auto", "how the driver waits for signals: interrupts (needs uio_pci_generic loaded), poll (lowest latency, busy CPU), or auto")
)

// openDevice returns the ISM device smcat runs over: the guest's virtio ISM
// device through the userspace driver (as root), or the loopback device.
func openDevice() (smcd.ISM, error) {
	if *loopback {
		return smcd.NewLoopback(), nil
	}
	wait, err := guestdriver.ParseWaitMode(*waitMode)
	if err != nil {
		return nil, err
	}
	d, err := guestdriver.Open(guestdriver.Options{VirtioID: *virtioID, Addr: *pciAddr, MaxHugePages: *hugePages, Wait: wait})
	if err != nil {
		return nil, fmt.Errorf("ISM device: %w (use -loopback without one)", err)
	}
	return smcdev.New(d), nil
}
