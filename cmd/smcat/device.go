package main

import (
	"errors"
	"flag"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

var loopback = flag.Bool("loopback", false, "use an in-process loopback ISM device (CHID 0xFFFF); only connections within this process use SMC-D")

// openDevice returns the ISM device smcat runs over. It is the one place to
// wire in the guest's virtio ISM driver.
func openDevice() (smcd.Device, error) {
	if *loopback {
		return smcd.NewLoopback(), nil
	}
	return nil, errors.New("no ISM device")
}
