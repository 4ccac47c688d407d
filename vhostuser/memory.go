package vhostuser

import (
	"errors"
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// ErrBadAddress is returned when a guest address range is not entirely
// inside guest RAM (or wraps around).
var ErrBadAddress = errors.New("vhost-user: guest address outside guest memory")

// MemoryRegion describes one region of guest RAM as the front-end announced
// it, plus the back-end's mapping of it.
type MemoryRegion struct {
	GuestPhysAddr uint64
	Size          uint64
	UserAddr      uint64 // the front-end's virtual address: vring addresses use it
	MmapOffset    uint64

	host   []byte // exactly Size bytes, starting at GuestPhysAddr
	mapped []byte // what mmap returned (page-aligned), for munmap
	fd     int
	file   fileKey // the file behind fd (ShmemMap matches its own fds by it)

	// tables counts the live Memory snapshots holding the region: it is
	// unmapped when the last of them is retired (see Memory.Release).
	tables atomic.Int64
}

// fileKey identifies an open file whatever fd refers to it: the memfd a
// SHMEM_MAP passes comes back, as another fd, in the front-end's memory
// table once the mapping is in the guest's address space.
type fileKey struct{ dev, ino uint64 }

func fileKeyOf(fd int) (fileKey, bool) {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return fileKey{}, false
	}
	return fileKey{uint64(st.Dev), st.Ino}, true
}

// regionsOf counts the regions of m backed by file k.
func (m *Memory) regionsOf(k fileKey) int {
	n := 0
	for _, r := range m.Regions() {
		if r.file == k {
			n++
		}
	}
	return n
}

// Host returns the back-end's view of the whole region.
func (r *MemoryRegion) Host() []byte { return r.host }

func (r *MemoryRegion) unmap() {
	if r.mapped != nil {
		unix.Munmap(r.mapped)
		r.mapped, r.host = nil, nil
	}
	if r.fd >= 0 {
		unix.Close(r.fd)
		r.fd = -1
	}
}

// mapRegion mmaps fd for r (MAP_SHARED, read-write) and returns r. It takes
// ownership of fd: on error fd is closed.
func mapRegion(r *MemoryRegion, fd int) (*MemoryRegion, error) {
	fail := func(err error) (*MemoryRegion, error) {
		unix.Close(fd)
		return nil, err
	}
	if r.Size == 0 {
		return fail(fmt.Errorf("vhost-user: empty memory region at %#x", r.GuestPhysAddr))
	}
	if r.GuestPhysAddr+r.Size < r.GuestPhysAddr || r.UserAddr+r.Size < r.UserAddr {
		return fail(fmt.Errorf("vhost-user: memory region %#x+%#x wraps", r.GuestPhysAddr, r.Size))
	}
	page := uint64(unix.Getpagesize())
	base := r.MmapOffset &^ (page - 1)
	skew := r.MmapOffset - base
	length := r.Size + skew
	if length < r.Size || length > uint64(maxInt) || base > uint64(maxInt64) {
		return fail(fmt.Errorf("vhost-user: memory region size %#x too large", r.Size))
	}
	// Pages beyond the end of a file raise SIGBUS when touched: refuse a
	// region its file cannot back (memfd, shm and hugetlbfs files are
	// regular files with a size).
	var st unix.Stat_t
	err := unix.Fstat(fd, &st)
	if err == nil {
		r.file = fileKey{uint64(st.Dev), st.Ino}
	}
	if err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG &&
		(st.Size < 0 || uint64(st.Size) < r.MmapOffset || uint64(st.Size)-r.MmapOffset < r.Size) {
		return fail(fmt.Errorf("vhost-user: memory region %#x+%#x at offset %#x beyond its file of %#x bytes",
			r.GuestPhysAddr, r.Size, r.MmapOffset, st.Size))
	}
	m, err := unix.Mmap(fd, int64(base), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail(fmt.Errorf("vhost-user: mmap region gpa %#x size %#x: %w", r.GuestPhysAddr, r.Size, err))
	}
	r.mapped = m
	r.host = m[skew : skew+r.Size : skew+r.Size]
	r.fd = fd
	return r, nil
}

const (
	maxInt   = int(^uint(0) >> 1)
	maxInt64 = 1<<63 - 1
)

// Memory is one immutable memory table: a snapshot of a VM's guest RAM. A
// new SET_MEM_TABLE or ADD/REM_MEM_REG makes a new Memory and installs it as
// the Guest's current one without waiting for anyone still using the old
// one (as rust-vmm's GuestMemoryAtomic does).
//
// Lifetime. A Memory is reference-counted: one reference while it is its
// Guest's current table, one per Guest.AcquireMemory until the matching
// Release. When the count drops to 0 the Memory is retired: each region that
// no other live snapshot holds is unmapped and its fd closed. So a region
// is never unmapped while anyone may touch it, and slices taken from a
// Memory are valid while a reference to it is held:
//
//   - inside HandleQueue (or Guest.WithMemoryLock) through Guest.Memory,
//     Queue and Chain: the current table cannot be replaced while the
//     device's lock is held, and the current table holds its own reference;
//   - anywhere, between Guest.AcquireMemory and Release (a peer's MOVE into
//     this VM). Hold it for one use, not longer: the old table's regions
//     (the VM's old RAM) stay mapped until then.
type Memory struct {
	regions []*MemoryRegion
	refs    atomic.Int64
	// last is the index of the region that served the last lookup: chains
	// mostly stay in one region.
	last atomic.Uint32
}

// install gives a new table its first (current) reference and its regions
// one table each.
func (m *Memory) install() {
	for _, r := range m.regions {
		r.tables.Add(1)
	}
	m.refs.Store(1)
}

// tryAcquire takes a reference unless m is already retired (refs 0), after
// which it must never come back to life.
func (m *Memory) tryAcquire() bool {
	for {
		n := m.refs.Load()
		if n <= 0 {
			return false
		}
		if m.refs.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Release drops a reference taken by Guest.AcquireMemory. The last one
// retires m and unmaps the regions no live table holds any more, on the
// caller's goroutine. Release of a nil Memory does nothing.
func (m *Memory) Release() {
	if m == nil {
		return
	}
	switch n := m.refs.Add(-1); {
	case n == 0:
		for _, r := range m.regions {
			if r.tables.Add(-1) == 0 {
				r.unmap()
			}
		}
	case n < 0:
		panic("vhostuser: Memory released more often than acquired")
	}
}

func newMemory(regions []*MemoryRegion) (*Memory, error) {
	for i, a := range regions {
		for _, b := range regions[i+1:] {
			if a.GuestPhysAddr < b.GuestPhysAddr+b.Size && b.GuestPhysAddr < a.GuestPhysAddr+a.Size {
				return nil, fmt.Errorf("vhost-user: memory regions %#x+%#x and %#x+%#x overlap",
					a.GuestPhysAddr, a.Size, b.GuestPhysAddr, b.Size)
			}
		}
	}
	return &Memory{regions: regions}, nil
}

// Regions returns the regions of the table (do not modify).
func (m *Memory) Regions() []*MemoryRegion {
	if m == nil {
		return nil
	}
	return m.regions
}

// find returns the region holding gpa and the offset of gpa in it.
func (m *Memory) find(gpa uint64) (*MemoryRegion, uint64, bool) {
	if m == nil || len(m.regions) == 0 {
		return nil, 0, false
	}
	l := m.last.Load()
	if int(l) < len(m.regions) {
		r := m.regions[l]
		if off := gpa - r.GuestPhysAddr; gpa >= r.GuestPhysAddr && off < r.Size {
			return r, off, true
		}
	}
	for i, r := range m.regions {
		if off := gpa - r.GuestPhysAddr; gpa >= r.GuestPhysAddr && off < r.Size {
			if uint32(i) != l {
				m.last.Store(uint32(i))
			}
			return r, off, true
		}
	}
	return nil, 0, false
}

// Bytes returns the host view of guest-physical [gpa, gpa+n). The range must
// lie inside one region (guest RAM that is contiguous in GPA but split across
// regions is refused: use AppendSegments). n == 0 gives an empty slice if gpa
// is inside guest RAM.
func (m *Memory) Bytes(gpa, n uint64) ([]byte, error) {
	r, off, ok := m.find(gpa)
	if !ok {
		return nil, fmt.Errorf("%w: %#x+%#x", ErrBadAddress, gpa, n)
	}
	// off < r.Size, so r.Size-off cannot underflow and the comparison
	// cannot overflow.
	if n > r.Size-off {
		return nil, fmt.Errorf("%w: %#x+%#x crosses the end of its region", ErrBadAddress, gpa, n)
	}
	return r.host[off : off+n : off+n], nil
}

// AppendSegments appends to dst the host slices covering guest-physical
// [gpa, gpa+n), one per region the range crosses. On error dst is returned
// with its original length.
func (m *Memory) AppendSegments(dst [][]byte, gpa, n uint64) ([][]byte, error) {
	if gpa+n < gpa {
		return dst, fmt.Errorf("%w: %#x+%#x wraps", ErrBadAddress, gpa, n)
	}
	orig := len(dst)
	for n > 0 {
		r, off, ok := m.find(gpa)
		if !ok {
			return dst[:orig], fmt.Errorf("%w: %#x", ErrBadAddress, gpa)
		}
		k := r.Size - off
		if k > n {
			k = n
		}
		dst = append(dst, r.host[off:off+k:off+k])
		gpa += k
		n -= k
	}
	return dst, nil
}

// Segments calls fn for each host slice covering guest-physical [gpa, gpa+n).
// It checks the whole range first, so fn sees nothing of a bad range.
func (m *Memory) Segments(gpa, n uint64, fn func([]byte) error) error {
	if gpa+n < gpa {
		return fmt.Errorf("%w: %#x+%#x wraps", ErrBadAddress, gpa, n)
	}
	for a, left := gpa, n; left > 0; {
		r, off, ok := m.find(a)
		if !ok {
			return fmt.Errorf("%w: %#x", ErrBadAddress, a)
		}
		k := min(r.Size-off, left)
		a += k
		left -= k
	}
	for n > 0 {
		r, off, _ := m.find(gpa)
		k := min(r.Size-off, n)
		if err := fn(r.host[off : off+k : off+k]); err != nil {
			return err
		}
		gpa += k
		n -= k
	}
	return nil
}

// UserBytes translates a front-end virtual address range (as vring addresses
// are given) into the host view. The range must lie inside one region.
func (m *Memory) UserBytes(uaddr, n uint64) ([]byte, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: no memory table", ErrBadAddress)
	}
	for _, r := range m.regions {
		if uaddr >= r.UserAddr && uaddr-r.UserAddr < r.Size {
			off := uaddr - r.UserAddr
			if n > r.Size-off {
				return nil, fmt.Errorf("%w: user address %#x+%#x crosses its region", ErrBadAddress, uaddr, n)
			}
			return r.host[off : off+n : off+n], nil
		}
	}
	return nil, fmt.Errorf("%w: user address %#x", ErrBadAddress, uaddr)
}
