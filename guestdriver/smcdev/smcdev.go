// Package smcdev lets the SMC-D stack (guestdriver/smcd) run over the
// guest's virtio ISM driver (guestdriver). It only converts types: Go's
// interfaces need the exact return types smcd.Device names, and keeping the
// two packages apart keeps smcd testable on its in-process loopback device.
package smcdev

import (
	"fmt"

	"github.com/ism-backend/ism-backend/guestdriver"
	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

// Device is a *guestdriver.Driver as an smcd.Device.
type Device struct{ d *guestdriver.Driver }

var _ smcd.Device = Device{}

// New wraps d.
func New(d *guestdriver.Driver) Device { return Device{d} }

// Driver returns the wrapped driver.
func (v Device) Driver() *guestdriver.Driver { return v.d }

func (v Device) GID() uint64                 { return v.d.GID() }
func (v Device) CHID() uint16                { return v.d.CHID() }
func (v Device) QueryRGID(rgid uint64) error { return v.d.QueryRGID(rgid) }

func (v Device) RegisterDMB(size int, rgid uint64) (smcd.DMB, error) {
	m, err := v.d.RegisterDMB(size, rgid)
	if err != nil {
		return nil, err
	}
	return m, nil
}

func (v Device) UnregisterDMB(m smcd.DMB) error {
	dm, ok := m.(*guestdriver.DMB)
	if !ok {
		return fmt.Errorf("smcdev: DMB %T is not this driver's", m)
	}
	return v.d.UnregisterDMB(dm)
}

func (v Device) AllocBuffer(size int) (smcd.Buffer, error) {
	b, err := v.d.AllocBuffer(size)
	if err != nil {
		return nil, err
	}
	return b, nil
}

func (v Device) Move(token uint64, dmbe uint32, signal bool, offset uint32, src smcd.Buffer, srcOff, n int) error {
	b, ok := src.(*guestdriver.Buffer)
	if !ok {
		return fmt.Errorf("smcdev: buffer %T is not this driver's DMA memory", src)
	}
	return v.d.Move(token, dmbe, signal, offset, b, srcOff, n)
}
