// Package pci is userspace PCI through Linux sysfs: enumeration, config
// space, capability walks, enable and bus mastering, BAR mmap with
// exact-width MMIO accessors; the virtio-pci modern transport (virtio 1.2
// §4.1) on top of it; DMA memory from huge pages with guest-physical
// addresses from /proc/self/pagemap; and the driver side of the split
// virtqueue.
//
// Nothing the device returns is trusted: capability lists are bounds- and
// loop-checked, BAR offsets are checked against the mapped size, and ring
// indices from the device are checked before use.
package pci

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

// DefaultSysfsRoot is where Linux lists PCI devices.
const DefaultSysfsRoot = "/sys/bus/pci/devices"

// Config-space offsets and bits used here (PCI Local Bus 3.0).
const (
	CfgVendorID   = 0x00
	CfgDeviceID   = 0x02
	CfgCommand    = 0x04
	CfgStatus     = 0x06
	CfgCapPointer = 0x34

	CommandMemory    = 1 << 1
	CommandBusMaster = 1 << 2
	StatusCapList    = 1 << 4

	CapIDVendor = 0x09
	CapIDMSIX   = 0x11
)

// Function is one PCI function as seen in sysfs.
type Function struct {
	Addr     string // domain:bus:dev.fn, e.g. 0000:00:04.0
	Path     string // its sysfs directory
	Vendor   uint16
	DeviceID uint16
	Class    uint32
}

func (d *Function) String() string {
	return fmt.Sprintf("%s [%04x:%04x] class %06x", d.Addr, d.Vendor, d.DeviceID, d.Class)
}

// readHex reads a sysfs attribute such as "0x1af4\n".
func readHex(path string, bits int) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	v, err := strconv.ParseUint(strings.TrimPrefix(s, "0x"), 16, bits)
	if err != nil {
		return 0, fmt.Errorf("pci: %s: %q: %w", path, s, err)
	}
	return v, nil
}

// Open describes the device at root/addr.
func Open(root, addr string) (*Function, error) {
	if root == "" {
		root = DefaultSysfsRoot
	}
	if addr == "" || strings.ContainsAny(addr, "/\x00") || addr == "." || addr == ".." {
		return nil, fmt.Errorf("pci: bad device address %q", addr)
	}
	d := &Function{Addr: addr, Path: filepath.Join(root, addr)}
	v, err := readHex(filepath.Join(d.Path, "vendor"), 16)
	if err != nil {
		return nil, err
	}
	d.Vendor = uint16(v)
	if v, err = readHex(filepath.Join(d.Path, "device"), 16); err != nil {
		return nil, err
	}
	d.DeviceID = uint16(v)
	if v, err = readHex(filepath.Join(d.Path, "class"), 32); err != nil {
		return nil, err
	}
	d.Class = uint32(v)
	return d, nil
}

// List returns every device under root (DefaultSysfsRoot if empty), sorted
// by address. Entries that cannot be read are skipped: one odd device must
// not hide the others.
func List(root string) ([]*Function, error) {
	if root == "" {
		root = DefaultSysfsRoot
	}
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	var out []*Function
	for _, e := range ents {
		d, err := Open(root, e.Name())
		if err != nil {
			continue
		}
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr < out[j].Addr })
	return out, nil
}

// ErrNotFound is returned by Find when no device matches.
var ErrNotFound = errors.New("pci: no such device")

// Find returns the devices with the given vendor and device id.
func Find(root string, vendor, device uint16) ([]*Function, error) {
	all, err := List(root)
	if err != nil {
		return nil, err
	}
	var out []*Function
	for _, d := range all {
		if d.Vendor == vendor && d.DeviceID == device {
			out = append(out, d)
		}
	}
	if len(out) == 0 {
		if root == "" {
			root = DefaultSysfsRoot
		}
		return nil, fmt.Errorf("%w: %04x:%04x under %s", ErrNotFound, vendor, device, root)
	}
	return out, nil
}

// Driver returns the name of the kernel driver bound to d ("virtio-pci",
// "uio_pci_generic"), or "" if none is.
func (d *Function) Driver() (string, error) {
	l, err := os.Readlink(filepath.Join(d.Path, "driver"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("pci: %s: %w", d.Addr, err)
	}
	return filepath.Base(l), nil
}

// Unbind detaches d from its kernel driver: it writes d's address to the
// driver's unbind attribute. The kernel runs the driver's remove before the
// write returns, and fails the write if the device is not bound to that
// driver (any more).
func (d *Function) Unbind() error {
	if err := os.WriteFile(filepath.Join(d.Path, "driver", "unbind"), []byte(d.Addr), 0); err != nil {
		return fmt.Errorf("pci: %s: unbind: %w", d.Addr, err)
	}
	return nil
}

// SetDriverOverride makes drv the only driver the kernel will bind to d
// from now on ("" clears it). It does not touch a driver already bound.
func (d *Function) SetDriverOverride(drv string) error {
	if drv == "" {
		drv = "\n"
	}
	if err := os.WriteFile(filepath.Join(d.Path, "driver_override"), []byte(drv), 0); err != nil {
		return fmt.Errorf("pci: %s: driver_override: %w", d.Addr, err)
	}
	return nil
}

// ReadConfig reads the whole config space the kernel exposes (256 bytes, or
// 4096 for PCIe; only 64 for a non-root reader).
func (d *Function) ReadConfig() ([]byte, error) {
	return os.ReadFile(filepath.Join(d.Path, "config"))
}

// WriteConfig writes b at off in config space.
func (d *Function) WriteConfig(off int64, b []byte) error {
	f, err := os.OpenFile(filepath.Join(d.Path, "config"), os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := f.WriteAt(b, off)
	if err == nil && n != len(b) {
		err = fmt.Errorf("pci: %s: short config write (%d of %d bytes)", d.Addr, n, len(b))
	}
	return err
}

// Enable writes 1 to the sysfs enable attribute, which turns on decoding of
// the BARs (the kernel keeps a count; it stays on until disabled). The
// kernel refuses the write (EBUSY) while a driver is bound; such a driver
// (uio_pci_generic, for interrupts) has enabled the device itself.
func (d *Function) Enable() error {
	err := os.WriteFile(filepath.Join(d.Path, "enable"), []byte("1"), 0)
	if errors.Is(err, syscall.EBUSY) {
		if b, rerr := os.ReadFile(filepath.Join(d.Path, "enable")); rerr == nil && strings.TrimSpace(string(b)) != "0" {
			return nil
		}
	}
	return err
}

// SetBusMaster sets the command register's bus-master and memory bits so
// the device may DMA. Read-modify-write of the 16-bit register only.
func (d *Function) SetBusMaster() error {
	f, err := os.OpenFile(filepath.Join(d.Path, "config"), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	var b [2]byte
	if _, err := f.ReadAt(b[:], CfgCommand); err != nil {
		return fmt.Errorf("pci: %s: read command: %w", d.Addr, err)
	}
	cmd := binary.LittleEndian.Uint16(b[:])
	want := cmd | CommandBusMaster | CommandMemory
	if want == cmd {
		return nil
	}
	binary.LittleEndian.PutUint16(b[:], want)
	if _, err := f.WriteAt(b[:], CfgCommand); err != nil {
		return fmt.Errorf("pci: %s: write command: %w", d.Addr, err)
	}
	return nil
}

// Resource is one line of the sysfs resource file: a BAR's bus range.
type Resource struct {
	Start, End, Flags uint64
}

// Size is the BAR's size in bytes, 0 if unused.
func (r Resource) Size() uint64 {
	if r.End <= r.Start {
		return 0
	}
	return r.End - r.Start + 1
}

// Resources parses the sysfs resource file (BAR0..BAR5 first).
func (d *Function) Resources() ([]Resource, error) {
	b, err := os.ReadFile(filepath.Join(d.Path, "resource"))
	if err != nil {
		return nil, err
	}
	var out []Resource
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			return nil, fmt.Errorf("pci: %s: bad resource line %q", d.Addr, line)
		}
		var v [3]uint64
		for i := range f {
			if v[i], err = strconv.ParseUint(strings.TrimPrefix(f[i], "0x"), 16, 64); err != nil {
				return nil, fmt.Errorf("pci: %s: bad resource line %q", d.Addr, line)
			}
		}
		out = append(out, Resource{v[0], v[1], v[2]})
	}
	return out, nil
}

// Capability is one entry of the standard capability list.
type Capability struct {
	ID     uint8
	Offset int    // of the capability header in config space
	Data   []byte // from Offset to the end of what was read; callers bound it by the length they expect
}

// Capabilities walks the standard capability list in cfg (a config space as
// read by ReadConfig). It refuses pointers into the header, past the end of
// cfg, and loops (a list longer than the space could hold).
func Capabilities(cfg []byte) ([]Capability, error) {
	if len(cfg) < 64 {
		return nil, fmt.Errorf("pci: config space is %d bytes", len(cfg))
	}
	if binary.LittleEndian.Uint16(cfg[CfgStatus:])&StatusCapList == 0 {
		return nil, nil
	}
	var out []Capability
	seen := make(map[int]bool)
	ptr := int(cfg[CfgCapPointer]) &^ 3
	for ptr != 0 {
		if ptr < 0x40 || ptr+2 > len(cfg) {
			return out, fmt.Errorf("pci: capability pointer %#x outside config space (%d bytes)", ptr, len(cfg))
		}
		if seen[ptr] {
			return out, fmt.Errorf("pci: capability list loops at %#x", ptr)
		}
		seen[ptr] = true
		out = append(out, Capability{ID: cfg[ptr], Offset: ptr, Data: cfg[ptr:]})
		ptr = int(cfg[ptr+1]) &^ 3
	}
	return out, nil
}
