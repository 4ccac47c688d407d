package guestdriver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/pci"
)

// fakeSysfs is a /sys/bus/pci look-alike: devices/<addr> with vendor,
// device, class, driver_override and config, and, for a bound device, a
// driver symlink to drivers/<name> whose unbind is a plain file (so a test
// can see what was written to it).
type fakeSysfs struct {
	t    *testing.T
	root string
}

func newFakeSysfs(t *testing.T) *fakeSysfs { return &fakeSysfs{t: t, root: t.TempDir()} }

func (s *fakeSysfs) devices() string { return filepath.Join(s.root, "devices") }

func (s *fakeSysfs) write(path, v string) {
	s.t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		s.t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(v), 0o644); err != nil {
		s.t.Fatal(err)
	}
}

func (s *fakeSysfs) read(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// add makes an ISM-id device (1af4:1066) at addr bound to drv ("" for none)
// with config space cfg (nil for none).
func (s *fakeSysfs) add(addr, drv string, cfg []byte) *pci.Function {
	s.t.Helper()
	dev := filepath.Join(s.devices(), addr)
	s.write(filepath.Join(dev, "vendor"), "0x1af4\n")
	s.write(filepath.Join(dev, "device"), fmt.Sprintf("%#x\n", pci.VirtioDeviceBase+abi.DefaultVirtioID))
	s.write(filepath.Join(dev, "class"), "0xff0000\n")
	s.write(filepath.Join(dev, "driver_override"), "(null)\n")
	if cfg != nil {
		s.write(filepath.Join(dev, "config"), string(cfg))
	}
	if drv != "" {
		s.write(filepath.Join(s.root, "drivers", drv, "unbind"), "")
		if err := os.Symlink("../../drivers/"+drv, filepath.Join(dev, "driver")); err != nil {
			s.t.Fatal(err)
		}
	}
	d, err := pci.Open(s.devices(), addr)
	if err != nil {
		s.t.Fatal(err)
	}
	return d
}

func (s *fakeSysfs) unbound(drv string) string {
	return s.read(filepath.Join(s.root, "drivers", drv, "unbind"))
}

func TestTakeOver(t *testing.T) {
	ism := func(*pci.Function) (abi.Config, uint8, error) {
		return abi.Config{Magic: abi.Magic, Version: abi.Version}, pci.StatusAcknowledge, nil
	}
	foreign := func(*pci.Function) (abi.Config, uint8, error) {
		return abi.Config{}, 0, errors.New("abi: config magic 0x0, want 0x764d5349: not an ISM device")
	}
	mustNotIdentify := func(*pci.Function) (abi.Config, uint8, error) {
		t.Error("identify called for a device that needs no takeover")
		return abi.Config{}, 0, errors.New("no")
	}
	for _, c := range []struct {
		name, drv string
		identify  identifyFunc
		unbind    bool   // unbound from drv
		errWant   string // "" for success
	}{
		{"unbound", "", mustNotIdentify, false, ""},
		{"uio", uioDriver, mustNotIdentify, false, ""},
		{"virtio-pci ISM", "virtio-pci", ism, true, ""},
		{"vfio ISM", "vfio-pci", ism, true, ""},
		{"virtio-pci foreign", "virtio-pci", foreign, false, "left alone"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := newFakeSysfs(t)
			dev := s.add("0000:00:03.0", c.drv, nil)
			var logs []string
			err := takeOver(dev, c.identify, func(f string, a ...any) { logs = append(logs, fmt.Sprintf(f, a...)) })
			if c.errWant == "" && err != nil || c.errWant != "" && (err == nil || !strings.Contains(err.Error(), c.errWant)) {
				t.Fatalf("takeOver: %v, want error %q", err, c.errWant)
			}
			override := s.read(filepath.Join(dev.Path, "driver_override"))
			if !c.unbind {
				if c.drv != "" && s.unbound(c.drv) != "" {
					t.Errorf("device unbound from %s", c.drv)
				}
				if override != "(null)\n" {
					t.Errorf("driver_override set to %q", override)
				}
				if len(logs) != 0 {
					t.Errorf("logged %q", logs)
				}
				return
			}
			if got := s.unbound(c.drv); got != "0000:00:03.0" {
				t.Errorf("%s/unbind got %q", c.drv, got)
			}
			if override != uioDriver {
				t.Errorf("driver_override %q, want %s", override, uioDriver)
			}
			if len(logs) != 1 || !strings.Contains(logs[0], "bound to kernel driver "+c.drv) || !strings.Contains(logs[0], "unbound") || !strings.Contains(logs[0], "status 0x1") {
				t.Errorf("log %q: want one line naming %s", logs, c.drv)
			}
		})
	}
}

// fakeVirtioConfig is a 256-byte config space with common, notify, device
// and PCI-access capabilities; the access window's data field holds data.
// Read back from a plain file, the window returns data for every register.
func fakeVirtioConfig(data string) []byte {
	b := make([]byte, 256)
	le := binary.LittleEndian
	le.PutUint16(b[pci.CfgVendorID:], pci.VirtioVendor)
	le.PutUint16(b[pci.CfgStatus:], pci.StatusCapList)
	b[pci.CfgCapPointer] = 0x40
	put := func(off, next int, clen, typ, bar byte, o, l uint32) {
		b[off], b[off+1], b[off+2], b[off+3], b[off+4] = pci.CapIDVendor, byte(next), clen, typ, bar
		le.PutUint32(b[off+8:], o)
		le.PutUint32(b[off+12:], l)
	}
	put(0x40, 0x50, 16, pci.CapCommonCfg, 2, 0, 0x1000)
	put(0x50, 0x68, 20, pci.CapNotifyCfg, 2, 0x3000, 0x1000)
	put(0x68, 0x78, 16, pci.CapDeviceCfg, 2, 0x2000, 64)
	put(0x78, 0, 20, pci.CapPCICfg, 0, 0, 0)
	copy(b[0x78+16:], data)
	return b
}

// Open must leave a bound device without the ISM magic bound, and not
// touch its binding; reading its config through the window is all it does.
func TestOpenLeavesForeignBoundDevice(t *testing.T) {
	s := newFakeSysfs(t)
	dev := s.add("0000:00:03.0", "virtio-pci", fakeVirtioConfig("XXXX"))
	_, err := Open(Options{SysfsRoot: s.devices()})
	if err == nil || !strings.Contains(err.Error(), "not an ISM device") || !strings.Contains(err.Error(), "left alone") {
		t.Fatalf("Open: %v", err)
	}
	if got := s.unbound("virtio-pci"); got != "" {
		t.Errorf("foreign device unbound: %q", got)
	}
	if o := s.read(filepath.Join(dev.Path, "driver_override")); o != "(null)\n" {
		t.Errorf("driver_override %q", o)
	}
}

// A bound device with the magic but an ABI version this driver does not
// speak is left bound too: the driver could not use it anyway. (Read back
// from a plain file, every register of the fake reads as the magic, so the
// version field reads 0x5349.) TestTakeOver covers the unbind itself.
func TestOpenLeavesOtherABIVersionBound(t *testing.T) {
	s := newFakeSysfs(t)
	var magic [4]byte
	binary.LittleEndian.PutUint32(magic[:], abi.Magic)
	s.add("0000:00:03.0", "virtio-pci", fakeVirtioConfig(string(magic[:])))
	if _, err := Open(Options{SysfsRoot: s.devices()}); err == nil || !strings.Contains(err.Error(), "ABI version") || !strings.Contains(err.Error(), "left alone") {
		t.Fatalf("Open: %v", err)
	}
	if got := s.unbound("virtio-pci"); got != "" {
		t.Errorf("device of another ABI version unbound: %q", got)
	}
}
