package guestdriver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// intx waits for the device's legacy PCI interrupt through the kernel's
// uio_pci_generic driver. The kernel's handler masks INTx at the PCI
// command register and counts the interrupt; a read of /dev/uioN blocks
// until the count moves, and a write of 1 unmasks INTx again. The device's
// ISR status register is the INTx source: reading it deasserts the line.
type intx struct {
	f   *os.File // /dev/uioN; in Go's poller, so Close ends a blocked wait
	cfg *os.File // the device's sysfs config space
	irq string   // the kernel's IRQ number, for the log
}

// The high byte of the PCI command register, and its Interrupt Disable bit
// (bit 10 of the register).
const (
	pciCommandHigh    = 5
	pciIntxDisableBit = 1 << 2
)

// uioDriver is the kernel driver that must own the device for interrupts.
const uioDriver = "uio_pci_generic"

// ErrNoUIO means the device cannot be bound to uio_pci_generic (the module
// is not loaded, or another kernel driver owns the device).
var ErrNoUIO = errors.New("guestdriver: no uio_pci_generic for the device")

// openINTx binds the device at sysfs path dev (its /sys/bus/pci/devices/
// entry) to uio_pci_generic, unless it already is, and opens its uio node.
// It never unbinds another driver (Open's takeOver has taken an ISM device
// from any other driver by then).
func openINTx(dev, devRoot string) (*intx, error) {
	drvRoot := filepath.Join(filepath.Dir(filepath.Dir(dev)), "drivers", uioDriver)
	if _, err := os.Stat(drvRoot); err != nil {
		return nil, fmt.Errorf("%w: %s missing (modprobe uio_pci_generic)", ErrNoUIO, drvRoot)
	}
	cur, err := os.Readlink(filepath.Join(dev, "driver"))
	switch {
	case err == nil && filepath.Base(cur) != uioDriver:
		return nil, fmt.Errorf("%w: the device is bound to %s", ErrNoUIO, filepath.Base(cur))
	case err != nil:
		// driver_override makes the bind ours alone: new_id would bind
		// every device with the same ids.
		if err := os.WriteFile(filepath.Join(dev, "driver_override"), []byte(uioDriver), 0); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrNoUIO, err)
		}
		if err := os.WriteFile(filepath.Join(drvRoot, "bind"), []byte(filepath.Base(dev)), 0); err != nil {
			return nil, fmt.Errorf("%w: bind: %v", ErrNoUIO, err)
		}
	}
	// uio_pci_generic binds a device with no IRQ too, and then fails
	// every read: find out now.
	irq, err := os.ReadFile(filepath.Join(dev, "irq"))
	if err != nil || strings.TrimSpace(string(irq)) == "0" {
		return nil, fmt.Errorf("%w: the device has no INTx IRQ (irq %q)", ErrNoUIO, strings.TrimSpace(string(irq)))
	}
	ents, err := os.ReadDir(filepath.Join(dev, "uio"))
	if err != nil || len(ents) == 0 {
		return nil, fmt.Errorf("%w: no uio node under %s", ErrNoUIO, dev)
	}
	name := ents[0].Name()
	if !strings.HasPrefix(name, "uio") {
		return nil, fmt.Errorf("%w: unexpected %s", ErrNoUIO, name)
	}
	cfg, err := os.OpenFile(filepath.Join(dev, "config"), os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoUIO, err)
	}
	f, err := os.OpenFile(filepath.Join(devRoot, name), os.O_RDWR, 0)
	if err != nil {
		cfg.Close()
		return nil, fmt.Errorf("%w: %v", ErrNoUIO, err)
	}
	return &intx{f: f, cfg: cfg, irq: strings.TrimSpace(string(irq))}, nil
}

// unmask lets the next interrupt through: it clears Interrupt Disable. It
// reads (and, if set, writes) PCI config space, which the hypervisor serves
// under its own lock:
// under single-threaded TCG, where the guest's fences are no-ops, that is
// what orders the driver's earlier stores (used_event) before its later
// loads (the rechecks). Only the one byte is rewritten; if the kernel masks
// again in between, the interrupt that made it do so is level-triggered and
// comes again.
func (x *intx) unmask() error {
	var b [1]byte
	if _, err := x.cfg.ReadAt(b[:], pciCommandHigh); err != nil {
		return err
	}
	if b[0]&pciIntxDisableBit == 0 {
		return nil
	}
	b[0] &^= pciIntxDisableBit
	_, err := x.cfg.WriteAt(b[:], pciCommandHigh)
	return err
}

// wait blocks until an interrupt has come since the last wait (or the
// open), or until close.
func (x *intx) wait() error {
	var b [4]byte
	_, err := x.f.Read(b[:])
	return err
}

func (x *intx) close() error {
	x.cfg.Close()
	return x.f.Close()
}
