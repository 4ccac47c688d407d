package dmb

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

func TestRegionAllocator(t *testing.T) {
	if _, err := NewRegionAllocator(1<<20, 3); err == nil {
		t.Fatal("alignment 3 accepted")
	}
	const page = 4096
	a, err := NewRegionAllocator(16*page+100, page) // the tail under a page is unusable
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Alloc(0); err != abi.StatusRange {
		t.Fatalf("Alloc(0): %v", err)
	}
	if _, err := a.Alloc(math.MaxUint64); err != abi.StatusRange {
		t.Fatalf("Alloc(max): %v", err)
	}
	x, _ := a.Alloc(1)        // one page
	y, _ := a.Alloc(page + 1) // two
	z, _ := a.Alloc(13 * page)
	if x != 0 || y != page || z != 3*page || a.Used() != 16*page {
		t.Fatalf("offsets %d %d %d used %d", x, y, z, a.Used())
	}
	if _, err := a.Alloc(1); err != abi.StatusNoSpace {
		t.Fatalf("full: %v", err)
	}
	if a.Free(y+page) != ErrNotAllocated || a.Free(y) != nil || a.Free(y) != ErrNotAllocated {
		t.Fatal("Free of y")
	}
	if _, err := a.Alloc(3 * page); err != abi.StatusNoSpace {
		t.Fatal("3 pages fit in a 2-page hole")
	}
	// Freeing x and z merges everything back into one range.
	if a.Free(x) != nil || a.Free(z) != nil || a.Used() != 0 {
		t.Fatal("Free")
	}
	if off, err := a.Alloc(16 * page); err != nil || off != 0 {
		t.Fatalf("whole region after merging: %d %v", off, err)
	}
}

// Random allocations and frees never overlap and always fit the region.
func TestRegionAllocatorRandom(t *testing.T) {
	const page, size = 4096, 256 * 4096
	a, _ := NewRegionAllocator(size, page)
	rng := rand.New(rand.NewPCG(3, 4))
	owner := make([]int, size/page) // page -> allocation id+1
	live := map[uint64]uint64{}     // off -> pages
	for i := range 5000 {
		if rng.IntN(2) == 0 && len(live) > 0 {
			for off, n := range live {
				if err := a.Free(off); err != nil {
					t.Fatal(err)
				}
				for p := off / page; p < off/page+n; p++ {
					owner[p] = 0
				}
				delete(live, off)
				break
			}
			continue
		}
		n := uint64(1 + rng.IntN(16*page))
		off, err := a.Alloc(n)
		if err == abi.StatusNoSpace {
			continue
		}
		if err != nil || off%page != 0 || off+n > size {
			t.Fatalf("Alloc(%d) = %d, %v", n, off, err)
		}
		pages := (n + page - 1) / page
		for p := off / page; p < off/page+pages; p++ {
			if owner[p] != 0 {
				t.Fatalf("page %d handed out twice", p)
			}
			owner[p] = i + 1
		}
		live[off] = pages
	}
}
