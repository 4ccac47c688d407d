package guestdriver

import (
	"fmt"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/pci"
)

// Taking the device from a kernel driver.
//
// A guest that loads virtio_pci (for a virtio-net NIC, say; Debian 6.12 and
// later have it built in) gets every virtio PCI function bound to it, ours
// included: virtio_pci claims any 1af4 device, resets it and sets
// ACKNOWLEDGE; with no kernel driver for the virtio id that is all it does
// (no queues, no interrupts, no DRIVER_OK, so the backend hears nothing of
// it). But it holds the BARs, and with CONFIG_IO_STRICT_DEVMEM the kernel
// then refuses to let userspace map them. So Open looks at the binding first:
//
//   - unbound, or uio_pci_generic (ours, for interrupts): nothing to do;
//   - another driver: read the device config through the PCI config access
//     window (no BAR mapping needed, reads only) and, if it is an ISM device
//     this driver speaks to, set driver_override to uio_pci_generic (so that
//     nothing else can bind it again) and unbind it, with one log line. A
//     device without the magic is left alone, bound as it was.
//
// The driver then starts the device from a reset (pci.Virtio.Start), so
// whatever the kernel driver did to the device status does not matter;
// virtio_pci's remove leaves the function disabled, and OpenVirtio enables
// it again.
//
// This lives in the driver, not in whatever loads virtio_pci, because only
// the driver runs in every case: virtio_pci may be built in, loaded by
// someone else, or loaded before our device is hot-plugged.

// identifyFunc reads a bound device's config and device status without
// mapping its BARs.
type identifyFunc func(dev *pci.Function) (abi.Config, uint8, error)

// identifyByWindow reads and decodes the ISM config, and the status, through
// the device's PCI config access window.
func identifyByWindow(dev *pci.Function) (abi.Config, uint8, error) {
	w, c, err := dev.OpenCfgWindow()
	if err != nil {
		return abi.Config{}, 0, err
	}
	defer c.Close()
	raw, err := w.ReadDeviceConfig(abi.ConfigSize)
	if err != nil {
		return abi.Config{}, 0, err
	}
	cfg, err := abi.DecodeConfig(raw)
	if err != nil {
		return cfg, 0, err
	}
	st, err := w.Status()
	return cfg, st, err
}

// takeOver unbinds dev from a kernel driver other than uio_pci_generic if
// identify says it is an ISM device this driver can drive; see above.
func takeOver(dev *pci.Function, identify identifyFunc, logf func(string, ...any)) error {
	drv, err := dev.Driver()
	if err != nil {
		return err
	}
	if drv == "" || drv == uioDriver {
		return nil
	}
	_, status, err := identify(dev)
	if err != nil {
		return fmt.Errorf("guestdriver: bound to kernel driver %s and not an ISM device this driver can use, left alone: %w", drv, err)
	}
	// Before the unbind, so that no probe in between hands the device to
	// another driver; uio_pci_generic is the one driver we bind.
	override := ""
	if err := dev.SetDriverOverride(uioDriver); err != nil {
		override = fmt.Sprintf(" (%v)", err)
	}
	if err := dev.Unbind(); err != nil {
		return fmt.Errorf("guestdriver: take the device from kernel driver %s: %w", drv, err)
	}
	logf("guestdriver: %s: ISM device was bound to kernel driver %s (device status %#x): unbound it%s", dev.Addr, drv, status, override)
	return nil
}
