package pci

import (
	"fmt"
	"os"
	"path/filepath"
	"unsafe"

	"golang.org/x/sys/unix"
)

// MMIO is a mapped memory BAR (or a window of one). Every access is checked
// against the window and its natural alignment, and done as one load or
// store of exactly the access width: device registers react to the width
// (a 64-bit write may be split or refused; a byte read of a 32-bit register
// may return part of it), and reads may have side effects (the ISR clears
// on read), so the compiler must neither widen, merge nor drop them. The
// accessors are small noinline functions that touch the address once
// through an unsafe pointer of the exact type. Not sync/atomic: on amd64
// an atomic store is XCHG, a locked read-modify-write, which would read the
// register too (and TCG emulates it as a load plus a store).
type MMIO struct {
	mem  []byte // the window
	base []byte // the whole mapping, for Unmap; nil for windows
}

// MapBAR maps resource<bar> of d read-write, shared, uncached (O_SYNC).
func (d *Function) MapBAR(bar int) (*MMIO, error) {
	if bar < 0 || bar > 5 {
		return nil, fmt.Errorf("pci: BAR %d out of range", bar)
	}
	path := filepath.Join(d.Path, fmt.Sprintf("resource%d", bar))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_SYNC, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	if size <= 0 || size > 1<<40 {
		return nil, fmt.Errorf("pci: %s: BAR %d has size %d", d.Addr, bar, size)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("pci: %s: mmap BAR %d: %w", d.Addr, bar, err)
	}
	return &MMIO{mem: mem, base: mem}, nil
}

// NewMMIO wraps memory that is not a BAR (tests, or a caller's own mapping).
func NewMMIO(mem []byte) *MMIO { return &MMIO{mem: mem} }

// Len is the window's size in bytes.
func (m *MMIO) Len() int { return len(m.mem) }

// Bytes is the window as memory, for a BAR that is RAM rather than
// registers (a virtio shared-memory region): there loads and stores of any
// width are fine and the accessors' exact-width rule does not apply. The
// slice is valid until Unmap.
func (m *MMIO) Bytes() []byte { return m.mem }

// Window returns the sub-range [off, off+n) as its own checked MMIO.
func (m *MMIO) Window(off, n uint64) (*MMIO, error) {
	if off > uint64(len(m.mem)) || n > uint64(len(m.mem))-off {
		return nil, fmt.Errorf("pci: window %#x+%#x outside %#x-byte region", off, n, len(m.mem))
	}
	return &MMIO{mem: m.mem[off : off+n : off+n]}, nil
}

// Unmap releases a mapping made by MapBAR. Windows of it become invalid.
func (m *MMIO) Unmap() error {
	if m == nil || m.base == nil {
		return nil
	}
	err := unix.Munmap(m.base)
	m.base, m.mem = nil, nil
	return err
}

func (m *MMIO) addr(off uint64, width uint64) unsafe.Pointer {
	if off%width != 0 || off > uint64(len(m.mem)) || width > uint64(len(m.mem))-off {
		panic(fmt.Sprintf("pci: %d-byte MMIO access at %#x outside %#x-byte region or misaligned", width, off, len(m.mem)))
	}
	return unsafe.Pointer(&m.mem[off])
}

// The accessors panic on an out-of-range or misaligned offset: offsets come
// from this package's own checked layout, so a bad one is a bug, not input.

func (m *MMIO) Read8(off uint64) uint8       { return load8(m.addr(off, 1)) }
func (m *MMIO) Read16(off uint64) uint16     { return load16(m.addr(off, 2)) }
func (m *MMIO) Read32(off uint64) uint32     { return load32(m.addr(off, 4)) }
func (m *MMIO) Read64(off uint64) uint64     { return load64(m.addr(off, 8)) }
func (m *MMIO) Write8(off uint64, v uint8)   { store8(m.addr(off, 1), v) }
func (m *MMIO) Write16(off uint64, v uint16) { store16(m.addr(off, 2), v) }
func (m *MMIO) Write32(off uint64, v uint32) { store32(m.addr(off, 4), v) }
func (m *MMIO) Write64(off uint64, v uint64) { store64(m.addr(off, 8), v) }

//go:noinline
func load8(p unsafe.Pointer) uint8 { return *(*uint8)(p) }

//go:noinline
func load16(p unsafe.Pointer) uint16 { return *(*uint16)(p) }

//go:noinline
func load32(p unsafe.Pointer) uint32 { return *(*uint32)(p) }

//go:noinline
func load64(p unsafe.Pointer) uint64 { return *(*uint64)(p) }

//go:noinline
func store8(p unsafe.Pointer, v uint8) { *(*uint8)(p) = v }

//go:noinline
func store16(p unsafe.Pointer, v uint16) { *(*uint16)(p) = v }

//go:noinline
func store32(p unsafe.Pointer, v uint32) { *(*uint32)(p) = v }

//go:noinline
func store64(p unsafe.Pointer, v uint64) { *(*uint64)(p) = v }
