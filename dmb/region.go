package dmb

import (
	"errors"
	"sort"
	"sync"

	"github.com/ism-backend/ism-backend/abi"
)

// RegionAllocator hands out aligned, non-overlapping ranges of a device's
// shared-memory region (the VIRTIO shared-memory BAR of attach mode): each
// attached DMB occupies one range at the offset ATTACH_DMB returns. It is
// first-fit over a sorted free list; DMBs are at most 1 MiB and a region
// holds a few thousand, so nothing cleverer is needed.
type RegionAllocator struct {
	align     uint64
	size      uint64
	maxRanges int // 0: no limit

	mu   sync.Mutex
	free []extent          // sorted by off, never adjacent (coalesced)
	used map[uint64]uint64 // off -> rounded length
}

type extent struct{ off, n uint64 }

// ErrNotAllocated is returned by Free for an offset Alloc did not return.
var ErrNotAllocated = errors.New("dmb: offset not allocated")

// NewRegionAllocator covers [0, size) in units of align, a power of two
// (the page size, or the huge-page size the guest maps with).
func NewRegionAllocator(size, align uint64) (*RegionAllocator, error) {
	if align == 0 || align&(align-1) != 0 {
		return nil, errors.New("dmb: alignment must be a power of two")
	}
	size &^= align - 1
	a := &RegionAllocator{align: align, size: size, used: make(map[uint64]uint64)}
	if size > 0 {
		a.free = []extent{{0, size}}
	}
	return a, nil
}

// LimitRanges makes Alloc refuse (abi.StatusNoSpace) once n ranges are
// allocated: each range is a mapping the front-end must also put into the
// memory table it shares with the back-end, whose slots are few. Call it
// before the first Alloc.
func (a *RegionAllocator) LimitRanges(n int) { a.maxRanges = n }

// Alloc reserves n bytes (rounded up to the alignment) and returns their
// offset; abi.StatusNoSpace if no free range is large enough, abi.StatusRange
// if n is 0 or so large that rounding it wraps.
func (a *RegionAllocator) Alloc(n uint64) (uint64, error) {
	if n == 0 || AddOverflows(n, a.align-1) {
		return 0, abi.StatusRange
	}
	n = (n + a.align - 1) &^ (a.align - 1)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.maxRanges > 0 && len(a.used) >= a.maxRanges {
		return 0, abi.StatusNoSpace
	}
	for i, e := range a.free {
		if e.n < n {
			continue
		}
		if e.n == n {
			a.free = append(a.free[:i], a.free[i+1:]...)
		} else {
			a.free[i] = extent{e.off + n, e.n - n}
		}
		a.used[e.off] = n
		return e.off, nil
	}
	return 0, abi.StatusNoSpace
}

// Free returns the range at off, which Alloc returned, to the free list.
func (a *RegionAllocator) Free(off uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	n, ok := a.used[off]
	if !ok {
		return ErrNotAllocated
	}
	delete(a.used, off)
	i := sort.Search(len(a.free), func(i int) bool { return a.free[i].off > off })
	// Merge with the free neighbours so that large ranges come back.
	mergePrev := i > 0 && a.free[i-1].off+a.free[i-1].n == off
	mergeNext := i < len(a.free) && off+n == a.free[i].off
	switch {
	case mergePrev && mergeNext:
		a.free[i-1].n += n + a.free[i].n
		a.free = append(a.free[:i], a.free[i+1:]...)
	case mergePrev:
		a.free[i-1].n += n
	case mergeNext:
		a.free[i] = extent{off, n + a.free[i].n}
	default:
		a.free = append(a.free, extent{})
		copy(a.free[i+1:], a.free[i:])
		a.free[i] = extent{off, n}
	}
	return nil
}

// Size is the usable size of the region (rounded down to the alignment).
func (a *RegionAllocator) Size() uint64 { return a.size }

// Used is the number of bytes allocated.
func (a *RegionAllocator) Used() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	var t uint64
	for _, n := range a.used {
		t += n
	}
	return t
}

// Reserve marks [off, off+n) (n rounded up to the alignment) allocated, as
// an Alloc that returned off would have: for a region rebuilt after a
// handover, whose mappings exist already. The range must be aligned,
// inside the region and free; abi.StatusNoSpace past LimitRanges.
func (a *RegionAllocator) Reserve(off, n uint64) error {
	if n == 0 || AddOverflows(n, a.align-1) || off%a.align != 0 {
		return abi.StatusRange
	}
	n = (n + a.align - 1) &^ (a.align - 1)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.maxRanges > 0 && len(a.used) >= a.maxRanges {
		return abi.StatusNoSpace
	}
	for i, e := range a.free {
		if off < e.off || off-e.off >= e.n || n > e.n-(off-e.off) {
			continue
		}
		// Split e into what lies before and after the range.
		before := extent{e.off, off - e.off}
		after := extent{off + n, e.n - (off - e.off) - n}
		var keep []extent
		if before.n > 0 {
			keep = append(keep, before)
		}
		if after.n > 0 {
			keep = append(keep, after)
		}
		a.free = append(a.free[:i], append(keep, a.free[i+1:]...)...)
		a.used[off] = n
		return nil
	}
	return abi.StatusBusy
}
