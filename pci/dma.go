package pci

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// HugePageSize is the size of the pages DMA memory comes from. One huge page
// is physically contiguous, so any chunk inside one is too.
const HugePageSize = 2 << 20

// DMA is a chunk of memory a device may access: its bytes in this process
// and the guest-physical address of its first byte. It never crosses a huge
// page, so [GPA, GPA+Len) is contiguous.
type DMA struct {
	buf  []byte
	gpa  uint64
	page *page
	off  int // in the page
}

// Bytes is the chunk's memory.
func (c *DMA) Bytes() []byte { return c.buf }

// Len is the chunk's size.
func (c *DMA) Len() int { return len(c.buf) }

// GPA is the physical address of byte 0.
func (c *DMA) GPA() uint64 { return c.gpa }

// Addr is the physical address of byte off, which must be inside the chunk.
func (c *DMA) Addr(off int) uint64 {
	if off < 0 || off > len(c.buf) {
		panic(fmt.Sprintf("pci: offset %d outside %d-byte DMA chunk", off, len(c.buf)))
	}
	return c.gpa + uint64(off)
}

type page struct {
	mem  []byte
	gpa  uint64
	free []span // sorted by offset, coalesced
}

type span struct{ off, n int }

// PageSource provides a huge page and its physical address.
type PageSource func() (mem []byte, gpa uint64, err error)

// Allocator hands out DMA chunks from huge pages taken from a PageSource as
// needed, up to MaxPages. Safe for concurrent use.
type Allocator struct {
	mu       sync.Mutex
	src      PageSource
	release  func([]byte) error
	maxPages int
	pages    []*page
}

// NewAllocator builds an allocator over src. release, if not nil, gives a
// page back on Close.
func NewAllocator(src PageSource, release func([]byte) error, maxPages int) *Allocator {
	return &Allocator{src: src, release: release, maxPages: maxPages}
}

// NewHugeAllocator allocates from anonymous MAP_HUGETLB pages, locked and
// populated, with addresses from /proc/self/pagemap (needs root: for
// others the kernel reports PFN 0, which is refused).
func NewHugeAllocator(maxPages int) *Allocator {
	return NewAllocator(hugePage, unix.Munmap, maxPages)
}

// ErrNoMemory is returned when the page limit is reached.
var ErrNoMemory = errors.New("pci: DMA memory exhausted")

// Alloc returns a zeroed chunk of size bytes aligned to align (a power of two,
// at least 8) inside one huge page.
func (a *Allocator) Alloc(size, align int) (*DMA, error) {
	if size <= 0 || size > HugePageSize || align <= 0 || align&(align-1) != 0 || align > HugePageSize {
		return nil, fmt.Errorf("pci: DMA alloc of %d bytes aligned %d: out of range", size, align)
	}
	align = max(align, 8)
	size = (size + 7) &^ 7 // keep every chunk 8-byte aligned after it
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range a.pages {
		if c := p.take(size, align); c != nil {
			return c, nil
		}
	}
	if len(a.pages) >= a.maxPages {
		return nil, fmt.Errorf("%w (%d huge pages in use)", ErrNoMemory, len(a.pages))
	}
	mem, gpa, err := a.src()
	if err != nil {
		return nil, err
	}
	if len(mem) != HugePageSize || gpa%HugePageSize != 0 {
		return nil, fmt.Errorf("pci: page source gave %d bytes at %#x, want a %d-aligned huge page", len(mem), gpa, HugePageSize)
	}
	p := &page{mem: mem, gpa: gpa, free: []span{{0, HugePageSize}}}
	a.pages = append(a.pages, p)
	c := p.take(size, align)
	if c == nil {
		return nil, fmt.Errorf("pci: DMA alloc of %d bytes failed in an empty page", size)
	}
	return c, nil
}

// take carves size bytes at the first aligned fit (first fit keeps it simple;
// the driver's allocations are few and long-lived).
func (p *page) take(size, align int) *DMA {
	for i, s := range p.free {
		// Align the physical address, which is what the device sees;
		// the page is huge-page aligned in both spaces.
		start := (s.off + align - 1) &^ (align - 1)
		if start+size > s.off+s.n {
			continue
		}
		var repl []span
		if start > s.off {
			repl = append(repl, span{s.off, start - s.off})
		}
		if end := start + size; end < s.off+s.n {
			repl = append(repl, span{end, s.off + s.n - end})
		}
		p.free = append(p.free[:i], append(repl, p.free[i+1:]...)...)
		buf := p.mem[start : start+size : start+size]
		clear(buf)
		return &DMA{buf: buf, gpa: p.gpa + uint64(start), page: p, off: start}
	}
	return nil
}

// Free returns c to its page. Freeing twice, or a chunk of another
// allocator, panics: either is a use-after-free waiting to happen.
func (a *Allocator) Free(c *DMA) {
	if c == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	p := c.page
	if p == nil {
		panic("pci: DMA chunk freed twice")
	}
	owned := false
	for _, q := range a.pages {
		owned = owned || q == p
	}
	if !owned {
		panic("pci: DMA chunk of another allocator")
	}
	s := span{c.off, len(c.buf)}
	i := sort.Search(len(p.free), func(i int) bool { return p.free[i].off >= s.off })
	if (i < len(p.free) && s.off+s.n > p.free[i].off) || (i > 0 && p.free[i-1].off+p.free[i-1].n > s.off) {
		panic("pci: DMA chunk overlaps free memory (double free?)")
	}
	p.free = append(p.free[:i], append([]span{s}, p.free[i:]...)...)
	// Coalesce with the neighbours.
	if i+1 < len(p.free) && p.free[i].off+p.free[i].n == p.free[i+1].off {
		p.free[i].n += p.free[i+1].n
		p.free = append(p.free[:i+1], p.free[i+2:]...)
	}
	if i > 0 && p.free[i-1].off+p.free[i-1].n == p.free[i].off {
		p.free[i-1].n += p.free[i].n
		p.free = append(p.free[:i], p.free[i+1:]...)
	}
	c.page, c.buf = nil, nil
}

// Close gives every page back. Chunks still held become invalid: call it
// only once the device can no longer touch them (after a reset).
func (a *Allocator) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var first error
	for _, p := range a.pages {
		if a.release != nil {
			if err := a.release(p.mem); err != nil && first == nil {
				first = err
			}
		}
	}
	a.pages = nil
	return first
}

// hugePage maps one anonymous huge page and looks up its physical address.
// MAP_LOCKED|MAP_POPULATE fault it in now and keep it there: hugetlb pages
// are never swapped or migrated, so the address stays valid.
func hugePage() ([]byte, uint64, error) {
	mmap := func() ([]byte, error) {
		return unix.Mmap(-1, 0, HugePageSize, unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_HUGETLB|unix.MAP_POPULATE|unix.MAP_LOCKED)
	}
	mem, err := mmap()
	if err != nil && growHugePages() {
		mem, err = mmap()
	}
	if err != nil {
		return nil, 0, fmt.Errorf("pci: mmap huge page: %w (reserve some: hugepages=N on the kernel command line or /proc/sys/vm/nr_hugepages)", err)
	}
	// Touch it, in case POPULATE was best effort.
	mem[0] = 0
	gpa, err := VirtToPhys(uintptr(unsafe.Pointer(&mem[0])))
	if err != nil {
		unix.Munmap(mem)
		return nil, 0, err
	}
	return mem, gpa, nil
}

// growHugePages asks the kernel for one more 2 MiB page in the pool (the
// reservation from the command line may be used up); it reports whether
// the pool grew. At runtime this can fail on fragmented memory, hence only
// a fallback.
func growHugePages() bool {
	const path = "/proc/sys/vm/nr_hugepages"
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return false
	}
	if os.WriteFile(path, []byte(strconv.Itoa(n+1)), 0) != nil {
		return false
	}
	b, err = os.ReadFile(path)
	m, err2 := strconv.Atoi(strings.TrimSpace(string(b)))
	return err == nil && err2 == nil && m > n
}

// VirtToPhys looks a virtual address of this process up in
// /proc/self/pagemap: bit 63 present, bits 0..54 the PFN.
func VirtToPhys(va uintptr) (uint64, error) {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	ps := uintptr(os.Getpagesize())
	var b [8]byte
	if _, err := f.ReadAt(b[:], int64(va/ps*8)); err != nil {
		return 0, fmt.Errorf("pci: pagemap: %w", err)
	}
	e := binary.LittleEndian.Uint64(b[:])
	if e&(1<<63) == 0 {
		return 0, fmt.Errorf("pci: page at %#x not present", va)
	}
	pfn := e & (1<<55 - 1)
	if pfn == 0 {
		return 0, errors.New("pci: pagemap shows PFN 0 (not root?)")
	}
	return pfn*uint64(ps) + uint64(va%ps), nil
}
