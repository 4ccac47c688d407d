package pci

import (
	"encoding/binary"
	"os"
	"strings"
	"testing"
)

// cfgWith builds a 256-byte config space with the capability list given as
// (offset, id, next) triples.
func cfgWith(first byte, caps ...[3]byte) []byte {
	b := make([]byte, 256)
	binary.LittleEndian.PutUint16(b[CfgVendorID:], 0x1af4)
	binary.LittleEndian.PutUint16(b[CfgStatus:], StatusCapList)
	b[CfgCapPointer] = first
	for _, c := range caps {
		b[c[0]] = c[1]
		b[c[0]+1] = c[2]
	}
	return b
}

func TestCapabilitiesWalk(t *testing.T) {
	cfg := cfgWith(0x40, [3]byte{0x40, CapIDVendor, 0x50}, [3]byte{0x50, CapIDMSIX, 0})
	caps, err := Capabilities(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(caps) != 2 || caps[0].ID != CapIDVendor || caps[0].Offset != 0x40 || caps[1].ID != CapIDMSIX || caps[1].Offset != 0x50 {
		t.Fatalf("got %+v", caps)
	}
}

func TestCapabilitiesHostile(t *testing.T) {
	for name, cfg := range map[string][]byte{
		"loop":        cfgWith(0x40, [3]byte{0x40, 9, 0x50}, [3]byte{0x50, 9, 0x40}),
		"self":        cfgWith(0x40, [3]byte{0x40, 9, 0x40}),
		"into header": cfgWith(0x40, [3]byte{0x40, 9, 0x10}),
		"past end":    cfgWith(0xfc, [3]byte{0xfc, 9, 0}), // fits: header only
	} {
		caps, err := Capabilities(cfg)
		if name == "past end" {
			if err != nil || len(caps) != 1 {
				t.Errorf("%s: %v %v", name, caps, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: walk succeeded: %+v", name, caps)
		}
	}
	short := cfgWith(0x40)[:64]
	short[CfgCapPointer] = 0x40
	if _, err := Capabilities(short); err == nil {
		t.Error("pointer past a 64-byte config space accepted")
	}
	noList := cfgWith(0x40, [3]byte{0x40, 9, 0})
	noList[CfgStatus] = 0
	if caps, err := Capabilities(noList); err != nil || caps != nil {
		t.Errorf("no capability list: %v %v", caps, err)
	}
}

func TestVirtioCapsDecode(t *testing.T) {
	cfg := cfgWith(0x40, [3]byte{0x40, 9, 0x58}, [3]byte{0x58, 9, 0x70}, [3]byte{0x70, 9, 0x90}, [3]byte{0x90, 9, 0})
	le := binary.LittleEndian
	put := func(off int, clen, typ, bar, id byte, o, l uint32) {
		cfg[off+2], cfg[off+3], cfg[off+4], cfg[off+5] = clen, typ, bar, id
		le.PutUint32(cfg[off+8:], o)
		le.PutUint32(cfg[off+12:], l)
	}
	put(0x40, 16, CapCommonCfg, 2, 0, 0, 0x1000)
	put(0x58, 20, CapNotifyCfg, 2, 0, 0x3000, 0x1000)
	le.PutUint32(cfg[0x58+16:], 4)
	put(0x70, 24, CapSharedMem, 4, 7, 0x10, 0x20)
	le.PutUint32(cfg[0x70+16:], 1)
	le.PutUint32(cfg[0x70+20:], 2)
	put(0x90, 16, CapISRCfg, 6, 0, 0, 0) // reserved BAR: ignored
	caps, err := VirtioCaps(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(caps) != 3 {
		t.Fatalf("got %+v", caps)
	}
	if caps[1].NotifyMultiplier != 4 || caps[1].Offset != 0x3000 {
		t.Errorf("notify: %+v", caps[1])
	}
	if c := caps[2]; c.ID != 7 || c.BAR != 4 || c.Offset != 1<<32|0x10 || c.Length != 2<<32|0x20 {
		t.Errorf("shm: %+v", c)
	}
	// A notify capability too short for its multiplier is refused.
	cfg[0x58+2] = 16
	if _, err := VirtioCaps(cfg); err == nil {
		t.Error("short notify capability accepted")
	}
	cfg[0x58+2] = 0xf0 // longer than the space left
	if _, err := VirtioCaps(cfg); err == nil {
		t.Error("overlong capability accepted")
	}
}

// The build machine is a VM: its real devices must enumerate and, for
// virtio ones, show the modern capabilities. Read-only.
func TestRealSysfs(t *testing.T) {
	devs, err := List("")
	if err != nil || len(devs) == 0 {
		t.Skipf("no PCI devices in sysfs: %v", err)
	}
	for _, d := range devs {
		if d.Vendor == 0 || d.Vendor == 0xffff {
			t.Errorf("%s: vendor %#x", d, d.Vendor)
		}
		cfg, err := d.ReadConfig()
		if err != nil {
			t.Errorf("%s: %v", d, err)
			continue
		}
		if got := binary.LittleEndian.Uint16(cfg); got != d.Vendor {
			t.Errorf("%s: config vendor %#x", d, got)
		}
		if _, err := Capabilities(cfg); err != nil {
			t.Errorf("%s: %v", d, err)
		}
		if d.Vendor != VirtioVendor || d.DeviceID < VirtioDeviceBase || len(cfg) < 256 {
			continue
		}
		caps, err := VirtioCaps(cfg)
		if err != nil {
			t.Errorf("%s: %v", d, err)
			continue
		}
		seen := map[uint8]bool{}
		for _, c := range caps {
			seen[c.Type] = true
		}
		if !seen[CapCommonCfg] || !seen[CapNotifyCfg] || !seen[CapISRCfg] {
			t.Errorf("%s: modern virtio device without common/notify/ISR: %+v", d, caps)
		}
		res, err := d.Resources()
		if err != nil {
			t.Errorf("%s: %v", d, err)
			continue
		}
		for _, c := range caps {
			if c.Type == CapPCICfg {
				continue
			}
			if int(c.BAR) >= len(res) || c.Offset+c.Length > res[c.BAR].Size() {
				t.Errorf("%s: capability %+v outside BAR (%+v)", d, c, res)
			}
		}
		t.Logf("%s: %d virtio caps", d, len(caps))
	}
	if _, err := Find("", 0xdead, 0xbeef); err == nil {
		t.Error("Find of a nonexistent device succeeded")
	}
}

func TestOpenRejectsPaths(t *testing.T) {
	for _, a := range []string{"", "..", "../x", "a/b"} {
		if _, err := Open(t.TempDir(), a); err == nil {
			t.Errorf("Open(%q) accepted", a)
		}
	}
	dir := t.TempDir()
	os.Mkdir(dir+"/0000:00:01.0", 0o755)
	for f, v := range map[string]string{"vendor": "0x1af4\n", "device": "0x1066\n", "class": "0xff0000\n"} {
		os.WriteFile(dir+"/0000:00:01.0/"+f, []byte(v), 0o644)
	}
	os.Mkdir(dir+"/junk", 0o755)
	ds, err := Find(dir, 0x1af4, 0x1066)
	if err != nil || len(ds) != 1 || !strings.HasSuffix(ds[0].Path, "0000:00:01.0") || ds[0].Class != 0xff0000 {
		t.Fatalf("%v %v", ds, err)
	}
}

func TestMMIOBounds(t *testing.T) {
	buf := make([]uint64, 4)
	m := NewMMIO(unsafeBytes(buf))
	m.Write32(4, 0xdeadbeef)
	m.Write16(8, 0x1234)
	m.Write8(10, 0x56)
	m.Write64(16, 0x0102030405060708)
	if m.Read32(4) != 0xdeadbeef || m.Read16(8) != 0x1234 || m.Read8(10) != 0x56 || m.Read64(16) != 0x0102030405060708 || m.Read32(8) != 0x561234 {
		t.Fatalf("readback %x", buf)
	}
	w, err := m.Window(8, 8)
	if err != nil || w.Read16(0) != 0x1234 {
		t.Fatal(err)
	}
	if _, err := m.Window(24, 16); err == nil {
		t.Error("window past the end accepted")
	}
	for name, f := range map[string]func(){
		"past end":   func() { m.Read32(32) },
		"straddle":   func() { w.Read64(4) },
		"misaligned": func() { m.Read32(2) },
		"window end": func() { w.Write32(8, 0) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", name)
				}
			}()
			f()
		}()
	}
}
