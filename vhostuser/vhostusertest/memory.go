// Package vhostusertest is a vhost-user front-end that plays QEMU 11.1.3 for
// tests: guest RAM from memfds, the handshake in QEMU's message order, split
// rings in guest memory (driver side), chain building (also hostile chains),
// kicks and used-ring waits, and a back-end request channel that answers
// SHMEM_MAP/UNMAP the way QEMU does. No VM is needed.
package vhostusertest

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Region is one region of guest RAM: a memfd mapped into this process. Its
// UserAddr is the address of that mapping, as QEMU sends its own.
type Region struct {
	GPA  uint64
	Size uint64
	FD   int
	Host []byte
}

// UserAddr is the front-end virtual address of the region.
func (r *Region) UserAddr() uint64 { return uint64(uintptr(unsafe.Pointer(&r.Host[0]))) }

// GuestMemory is guest RAM: regions contiguous in GPA from Base, so a buffer
// can cross a region boundary, plus a bump allocator.
type GuestMemory struct {
	Regions []*Region
	next    uint64 // bump allocator: next free GPA
}

// NewGuestMemory makes guest RAM of the given region sizes (each a multiple
// of the page size) starting at GPA base.
func NewGuestMemory(base uint64, sizes ...uint64) (*GuestMemory, error) {
	g := &GuestMemory{next: base}
	gpa := base
	for i, size := range sizes {
		fd, err := unix.MemfdCreate(fmt.Sprintf("guest-ram-%d", i), unix.MFD_CLOEXEC)
		if err != nil {
			g.Close()
			return nil, err
		}
		if err := unix.Ftruncate(fd, int64(size)); err != nil {
			unix.Close(fd)
			g.Close()
			return nil, err
		}
		host, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			unix.Close(fd)
			g.Close()
			return nil, err
		}
		g.Regions = append(g.Regions, &Region{GPA: gpa, Size: size, FD: fd, Host: host})
		gpa += size
	}
	return g, nil
}

// Close unmaps and closes every region.
func (g *GuestMemory) Close() {
	for _, r := range g.Regions {
		if r.Host != nil {
			unix.Munmap(r.Host)
			r.Host = nil
		}
		if r.FD >= 0 {
			unix.Close(r.FD)
			r.FD = -1
		}
	}
}

// End is the first GPA after guest RAM.
func (g *GuestMemory) End() uint64 {
	last := g.Regions[len(g.Regions)-1]
	return last.GPA + last.Size
}

func (g *GuestMemory) find(gpa uint64) (*Region, uint64, bool) {
	for _, r := range g.Regions {
		if gpa >= r.GPA && gpa-r.GPA < r.Size {
			return r, gpa - r.GPA, true
		}
	}
	return nil, 0, false
}

// Host returns the host view of [gpa, gpa+n), which must lie in one region.
func (g *GuestMemory) Host(gpa, n uint64) ([]byte, error) {
	r, off, ok := g.find(gpa)
	if !ok || n > r.Size-off {
		return nil, fmt.Errorf("vhostusertest: %#x+%#x not in one region", gpa, n)
	}
	return r.Host[off : off+n : off+n], nil
}

// Write copies b to guest memory at gpa, across regions.
func (g *GuestMemory) Write(gpa uint64, b []byte) error {
	for len(b) > 0 {
		r, off, ok := g.find(gpa)
		if !ok {
			return fmt.Errorf("vhostusertest: write at %#x outside guest RAM", gpa)
		}
		k := copy(r.Host[off:], b)
		b = b[k:]
		gpa += uint64(k)
	}
	return nil
}

// Read copies n bytes of guest memory at gpa, across regions.
func (g *GuestMemory) Read(gpa, n uint64) ([]byte, error) {
	out := make([]byte, 0, n)
	for uint64(len(out)) < n {
		r, off, ok := g.find(gpa)
		if !ok {
			return nil, fmt.Errorf("vhostusertest: read at %#x outside guest RAM", gpa)
		}
		k := min(r.Size-off, n-uint64(len(out)))
		out = append(out, r.Host[off:off+k]...)
		gpa += k
	}
	return out, nil
}

// ErrNoSpace: the bump allocator ran out of guest RAM.
var ErrNoSpace = errors.New("vhostusertest: guest RAM exhausted")

// Alloc returns n bytes of zeroed guest RAM aligned to align (a power of
// two, 0 means 8), inside one region, and its host view.
func (g *GuestMemory) Alloc(n, align uint64) (uint64, []byte, error) {
	if align == 0 {
		align = 8
	}
	for {
		gpa := (g.next + align - 1) &^ (align - 1)
		r, off, ok := g.find(gpa)
		if !ok {
			return 0, nil, ErrNoSpace
		}
		if n <= r.Size-off {
			g.next = gpa + n
			h := r.Host[off : off+n : off+n]
			clear(h)
			return gpa, h, nil
		}
		g.next = r.GPA + r.Size // try the next region
	}
}

// AllocAcross returns n bytes of guest RAM that start before at bytes before
// the end of region i and so cross into region i+1 (GPA-contiguous). No host
// view: use Write/Read.
func (g *GuestMemory) AllocAcross(i int, before, n uint64) (uint64, error) {
	if i+1 >= len(g.Regions) || before == 0 || before >= n {
		return 0, fmt.Errorf("vhostusertest: cannot cross region %d", i)
	}
	r := g.Regions[i]
	gpa := r.GPA + r.Size - before
	if gpa < g.next || n-before > g.Regions[i+1].Size {
		return 0, ErrNoSpace
	}
	g.next = gpa + n
	return gpa, nil
}
