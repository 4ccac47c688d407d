package pci

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// ConfigSpace is random access to a device's PCI config space: its sysfs
// config file, or a fake in tests. Each ReadAt and WriteAt must be one
// access of exactly its length (the sysfs file does an aligned 1-, 2- or
// 4-byte access as one config cycle).
type ConfigSpace interface {
	io.ReaderAt
	io.WriterAt
}

// Layout of the PCI configuration access capability (virtio 1.2 §4.1.4.9,
// struct virtio_pci_cfg_cap): the generic virtio capability, then 4 bytes
// of data.
const (
	pciCfgBar    = 4
	pciCfgOffset = 8
	pciCfgLength = 12
	pciCfgData   = 16
	pciCfgCapLen = 20
)

// CfgWindow reads a virtio-pci device's registers through its PCI
// configuration access capability (cfg_type 5): the driver writes BAR,
// offset and length into the capability in PCI config space, then reads
// the data field, and the device fetches the register for it. It needs no
// BAR mapping, so it works while a kernel driver holds the device: a kernel
// built with CONFIG_IO_STRICT_DEVMEM (Debian's is) refuses to mmap a BAR
// whose regions a driver has requested, as virtio_pci does. It only reads:
// device-config and status reads have no side effects (virtio 1.2 §2.5),
// so a device that turns out not to be ours is left as it was, apart from
// the window's own BAR/offset/length fields.
type CfgWindow struct {
	cs     ConfigSpace
	pos    int // of the capability in config space
	common VirtioCap
	devcfg *VirtioCap // nil: the device has no device config
}

// NewCfgWindow finds the access capability and the common and device
// config structures in cfg (the config space as read) and returns a window
// that accesses them through cs.
func NewCfgWindow(cs ConfigSpace, cfg []byte) (*CfgWindow, error) {
	caps, err := VirtioCaps(cfg)
	if err != nil {
		return nil, err
	}
	w := &CfgWindow{cs: cs, pos: -1}
	haveCommon := false
	for _, c := range caps {
		switch {
		case c.Type == CapPCICfg && w.pos < 0:
			if c.Pos+pciCfgCapLen > len(cfg) || cfg[c.Pos+2] < pciCfgCapLen {
				return nil, fmt.Errorf("pci: PCI config access capability at %#x too short", c.Pos)
			}
			w.pos = c.Pos
		case c.Type == CapCommonCfg && !haveCommon:
			w.common, haveCommon = c, true
		case c.Type == CapDeviceCfg && w.devcfg == nil:
			c := c
			w.devcfg = &c
		}
	}
	if w.pos < 0 {
		return nil, fmt.Errorf("pci: no PCI config access capability")
	}
	if !haveCommon || w.common.Length < commonMinLen {
		return nil, fmt.Errorf("pci: no usable common config capability")
	}
	return w, nil
}

// read fetches n (1, 2 or 4) bytes at off in structure c, off aligned to n.
func (w *CfgWindow) read(c VirtioCap, off uint64, n int) (uint32, error) {
	if off%uint64(n) != 0 || off+uint64(n) > c.Length || c.Offset+off+uint64(n) > 1<<32 {
		return 0, fmt.Errorf("pci: config window read of %d bytes at %#x outside %#x-byte structure", n, off, c.Length)
	}
	var b [4]byte
	b[0] = c.BAR
	if _, err := w.cs.WriteAt(b[:1], int64(w.pos+pciCfgBar)); err != nil {
		return 0, err
	}
	binary.LittleEndian.PutUint32(b[:], uint32(c.Offset+off))
	if _, err := w.cs.WriteAt(b[:], int64(w.pos+pciCfgOffset)); err != nil {
		return 0, err
	}
	binary.LittleEndian.PutUint32(b[:], uint32(n))
	if _, err := w.cs.WriteAt(b[:], int64(w.pos+pciCfgLength)); err != nil {
		return 0, err
	}
	// Read the whole data field (one aligned dword): the device puts the
	// register's n bytes at its start.
	if _, err := w.cs.ReadAt(b[:], int64(w.pos+pciCfgData)); err != nil {
		return 0, err
	}
	v := binary.LittleEndian.Uint32(b[:])
	if n < 4 {
		v &= 1<<(8*n) - 1
	}
	return v, nil
}

// Status reads device_status.
func (w *CfgWindow) Status() (uint8, error) {
	v, err := w.read(w.common, commonStatus, 1)
	return uint8(v), err
}

// ReadDeviceConfig reads the first n bytes of the device config, 4 bytes
// at a time, retrying while config_generation changes under it.
func (w *CfgWindow) ReadDeviceConfig(n int) ([]byte, error) {
	if w.devcfg == nil {
		return nil, fmt.Errorf("pci: no device config")
	}
	if n < 0 || uint64(n) > w.devcfg.Length {
		return nil, fmt.Errorf("pci: device config is %d bytes, %d asked", w.devcfg.Length, n)
	}
	gen := func() (uint32, error) { return w.read(w.common, commonCfgGen, 1) }
	b := make([]byte, n)
	for try := 0; try < 10; try++ {
		g0, err := gen()
		if err != nil {
			return nil, err
		}
		for off := 0; off < n; {
			if n-off >= 4 {
				v, err := w.read(*w.devcfg, uint64(off), 4)
				if err != nil {
					return nil, err
				}
				binary.LittleEndian.PutUint32(b[off:], v)
				off += 4
				continue
			}
			v, err := w.read(*w.devcfg, uint64(off), 1)
			if err != nil {
				return nil, err
			}
			b[off] = byte(v)
			off++
		}
		g1, err := gen()
		if err != nil {
			return nil, err
		}
		if g0 == g1 {
			return b, nil
		}
	}
	return nil, fmt.Errorf("pci: device config kept changing while read")
}

// OpenCfgWindow opens d's config space for a CfgWindow; close the
// returned closer when done.
func (d *Function) OpenCfgWindow() (*CfgWindow, io.Closer, error) {
	f, err := os.OpenFile(filepath.Join(d.Path, "config"), os.O_RDWR, 0)
	if err != nil {
		return nil, nil, err
	}
	cfg, err := io.ReadAll(f)
	if err == nil && len(cfg) < 256 {
		err = fmt.Errorf("only %d bytes of config space readable (not root?)", len(cfg))
	}
	var w *CfgWindow
	if err == nil {
		w, err = NewCfgWindow(f, cfg)
	}
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("pci: %s: %w", d.Addr, err)
	}
	return w, f, nil
}
