package pci

import (
	"errors"
	"testing"
	"unsafe"
)

func unsafeBytes(b []uint64) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&b[0])), 8*len(b))
}

// heapPages is a PageSource of plain memory with made-up, huge-page aligned
// physical addresses, so tests can map a GPA back to bytes like a device.
type heapPages struct {
	pages [][]byte
	base  uint64
}

func (h *heapPages) src() ([]byte, uint64, error) {
	p := unsafeBytes(make([]uint64, HugePageSize/8))
	h.pages = append(h.pages, p)
	return p, h.base + uint64(len(h.pages)-1)*HugePageSize*3, nil // gaps between pages
}

// at returns the n bytes at gpa, or nil if they are not inside one page.
func (h *heapPages) at(gpa uint64, n uint32) []byte {
	for i, p := range h.pages {
		start := h.base + uint64(i)*HugePageSize*3
		if gpa >= start && gpa+uint64(n) <= start+HugePageSize {
			return p[gpa-start : gpa-start+uint64(n)]
		}
	}
	return nil
}

func newHeapAlloc(max int) (*Allocator, *heapPages) {
	h := &heapPages{base: 0x4000_0000}
	return NewAllocator(h.src, nil, max), h
}

func TestAllocatorChunks(t *testing.T) {
	a, h := newHeapAlloc(3)
	var got []*DMA
	for _, sz := range []int{100, 4096, 1 << 20, 7, 1 << 20, HugePageSize} {
		c, err := a.Alloc(sz, 4096)
		if err != nil {
			t.Fatalf("alloc %d: %v", sz, err)
		}
		if c.Len() < sz || c.GPA()%4096 != 0 {
			t.Fatalf("alloc %d: len %d gpa %#x", sz, c.Len(), c.GPA())
		}
		// Contiguous: the whole chunk maps back to one page at its GPA.
		back := h.at(c.GPA(), uint32(c.Len()))
		if back == nil || &back[0] != &c.Bytes()[0] {
			t.Fatalf("alloc %d at %#x crosses a page or maps elsewhere", sz, c.GPA())
		}
		for _, o := range got {
			if c.GPA() < o.GPA()+uint64(o.Len()) && o.GPA() < c.GPA()+uint64(c.Len()) {
				t.Fatalf("chunks overlap: %#x+%d and %#x+%d", c.GPA(), c.Len(), o.GPA(), o.Len())
			}
		}
		c.Bytes()[0] = 0xff
		got = append(got, c)
	}
	if _, err := a.Alloc(1<<20+1, 8); !errors.Is(err, ErrNoMemory) {
		t.Fatalf("over the page limit: %v", err)
	}
	if _, err := a.Alloc(HugePageSize+1, 8); err == nil {
		t.Fatal("chunk over a huge page accepted")
	}
	// Free everything in page 0 and get a whole-page chunk back from it, zeroed.
	for _, c := range got[:4] {
		a.Free(c)
	}
	c, err := a.Alloc(HugePageSize, HugePageSize)
	if err != nil {
		t.Fatalf("after free, coalescing failed: %v", err)
	}
	for i, b := range c.Bytes() {
		if b != 0 {
			t.Fatalf("reused chunk not zeroed at %d", i)
		}
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("double free did not panic")
			}
		}()
		a.Free(got[0])
	}()
}

func TestAllocatorAlignment(t *testing.T) {
	a, _ := newHeapAlloc(1)
	for _, al := range []int{8, 16, 64, 4096, 65536} {
		c, err := a.Alloc(24, al)
		if err != nil || c.GPA()%uint64(al) != 0 || uintptr(unsafe.Pointer(&c.Bytes()[0]))%8 != 0 {
			t.Fatalf("align %d: %v %#x", al, err, c.GPA())
		}
	}
	if _, err := a.Alloc(8, 3); err == nil {
		t.Error("alignment 3 accepted")
	}
}
