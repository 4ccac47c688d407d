package pci

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeWindowDev is a virtio-pci config space whose PCI config access
// capability works as QEMU's does: a read that covers the data field first
// fetches the register named by bar/offset/length (if the length is 1, 2
// or 4) into it. Its BAR 2 holds common config at 0 and device config at
// 0x2000.
type fakeWindowDev struct {
	cfg    []byte
	bar2   []byte
	reads  int // register fetches through the window
	writes [][2]int
}

const fakeCfgCap = 0x90

func newFakeWindowDev(t *testing.T) *fakeWindowDev {
	cfg := cfgWith(0x40, [3]byte{0x40, CapIDVendor, 0x58}, [3]byte{0x58, CapIDVendor, 0x70}, [3]byte{0x70, CapIDVendor, fakeCfgCap}, [3]byte{fakeCfgCap, CapIDVendor, 0})
	le := binary.LittleEndian
	put := func(off int, clen, typ, bar byte, o, l uint32) {
		cfg[off+2], cfg[off+3], cfg[off+4] = clen, typ, bar
		le.PutUint32(cfg[off+8:], o)
		le.PutUint32(cfg[off+12:], l)
	}
	put(0x40, 16, CapCommonCfg, 2, 0, 0x1000)
	put(0x58, 20, CapNotifyCfg, 2, 0x3000, 0x1000)
	put(0x70, 16, CapDeviceCfg, 2, 0x2000, 64)
	put(fakeCfgCap, 20, CapPCICfg, 0, 0, 0)
	f := &fakeWindowDev{cfg: cfg, bar2: make([]byte, 0x4000)}
	f.bar2[commonStatus] = StatusAcknowledge
	copy(f.bar2[0x2000:], "ISMv\x02\x00")
	for i := 6; i < 64; i++ {
		f.bar2[0x2000+i] = byte(i)
	}
	return f
}

func (f *fakeWindowDev) ReadAt(b []byte, off int64) (int, error) {
	data := int64(fakeCfgCap + pciCfgData)
	if off < data+4 && off+int64(len(b)) > data {
		le := binary.LittleEndian
		o, n := le.Uint32(f.cfg[fakeCfgCap+pciCfgOffset:]), le.Uint32(f.cfg[fakeCfgCap+pciCfgLength:])
		if n == 1 || n == 2 || n == 4 {
			if f.cfg[fakeCfgCap+pciCfgBar] != 2 || int(o)+int(n) > len(f.bar2) {
				return 0, fmt.Errorf("fake: window at bar %d offset %#x", f.cfg[fakeCfgCap+pciCfgBar], o)
			}
			copy(f.cfg[data:data+int64(n)], f.bar2[o:o+n])
			f.reads++
		}
	}
	return copy(b, f.cfg[off:]), nil
}

func (f *fakeWindowDev) WriteAt(b []byte, off int64) (int, error) {
	// Only the window's fields are writable here.
	if off < fakeCfgCap+pciCfgBar || off+int64(len(b)) > fakeCfgCap+pciCfgData {
		return 0, fmt.Errorf("fake: write of %d bytes at %#x", len(b), off)
	}
	f.writes = append(f.writes, [2]int{int(off), len(b)})
	return copy(f.cfg[off:], b), nil
}

func TestCfgWindowReadsDeviceConfig(t *testing.T) {
	f := newFakeWindowDev(t)
	w, err := NewCfgWindow(f, f.cfg)
	if err != nil {
		t.Fatal(err)
	}
	st, err := w.Status()
	if err != nil || st != StatusAcknowledge {
		t.Fatalf("status %#x, %v", st, err)
	}
	b, err := w.ReadDeviceConfig(63)
	if err != nil {
		t.Fatal(err)
	}
	if string(b[:4]) != "ISMv" || b[4] != 2 || b[62] != 62 {
		t.Fatalf("read % x", b)
	}
	// 15 dwords and 3 bytes, plus 2 generation reads; the device's state
	// (status, config) is unchanged and only the window was written.
	if f.reads != 1+15+3+2 {
		t.Errorf("%d register reads", f.reads)
	}
	if f.bar2[commonStatus] != StatusAcknowledge {
		t.Error("status changed")
	}
	for _, w := range f.writes {
		if (w[0] != fakeCfgCap+pciCfgBar || w[1] != 1) && (w[0]%4 != 0 || w[1] != 4) {
			t.Errorf("config write of %d bytes at %#x", w[1], w[0])
		}
	}
	if _, err := w.ReadDeviceConfig(65); err == nil {
		t.Error("read past the device config accepted")
	}
}

func TestCfgWindowNeedsCapability(t *testing.T) {
	f := newFakeWindowDev(t)
	f.cfg[0x70+1] = 0 // unlink the access capability
	if _, err := NewCfgWindow(f, f.cfg); err == nil || !strings.Contains(err.Error(), "access capability") {
		t.Fatalf("no access capability: %v", err)
	}
	f = newFakeWindowDev(t)
	f.cfg[fakeCfgCap+2] = 16 // too short for the data field
	if _, err := NewCfgWindow(f, f.cfg); err == nil {
		t.Fatal("short access capability accepted")
	}
}

// fakeSysfsDev makes root/addr with vendor, device and class, bound to drv
// ("" for none) the way sysfs links it: driver -> ../../drivers/<drv>,
// whose unbind attribute is a plain file here.
func fakeSysfsDev(t *testing.T, root, addr, drv string) string {
	t.Helper()
	dev := filepath.Join(root, "devices", addr)
	if err := os.MkdirAll(dev, 0o755); err != nil {
		t.Fatal(err)
	}
	for f, v := range map[string]string{"vendor": "0x1af4\n", "device": "0x1066\n", "class": "0xff0000\n", "driver_override": "(null)\n"} {
		if err := os.WriteFile(filepath.Join(dev, f), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if drv != "" {
		d := filepath.Join(root, "drivers", drv)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "unbind"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../../drivers/"+drv, filepath.Join(dev, "driver")); err != nil {
			t.Fatal(err)
		}
	}
	return dev
}

func TestDriverUnbindOverride(t *testing.T) {
	root := t.TempDir()
	fakeSysfsDev(t, root, "0000:00:03.0", "virtio-pci")
	fakeSysfsDev(t, root, "0000:00:04.0", "")
	bound, err := Open(filepath.Join(root, "devices"), "0000:00:03.0")
	if err != nil {
		t.Fatal(err)
	}
	free, err := Open(filepath.Join(root, "devices"), "0000:00:04.0")
	if err != nil {
		t.Fatal(err)
	}
	if drv, err := bound.Driver(); err != nil || drv != "virtio-pci" {
		t.Fatalf("Driver() = %q, %v", drv, err)
	}
	if drv, err := free.Driver(); err != nil || drv != "" {
		t.Fatalf("unbound: Driver() = %q, %v", drv, err)
	}
	if err := bound.SetDriverOverride("uio_pci_generic"); err != nil {
		t.Fatal(err)
	}
	if err := bound.Unbind(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "drivers/virtio-pci/unbind")); string(b) != "0000:00:03.0" {
		t.Errorf("unbind got %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(bound.Path, "driver_override")); string(b) != "uio_pci_generic" {
		t.Errorf("driver_override %q", b)
	}
	if err := free.Unbind(); err == nil {
		t.Error("Unbind of an unbound device succeeded")
	}
}
