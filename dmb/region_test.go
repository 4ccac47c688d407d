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

// TestRegionAllocatorFragmentation: a region cut into a checkerboard of
// used and free pages refuses what fits no hole even though enough bytes are
// free in total, fills every hole with what fits, and gives the whole region
// back as one range once everything is freed in a scrambled order.
func TestRegionAllocatorFragmentation(t *testing.T) {
	const page, pages = 4096, 64
	a, _ := NewRegionAllocator(pages*page, page)
	offs := make([]uint64, pages)
	for i := range offs {
		off, err := a.Alloc(page)
		if err != nil || off != uint64(i)*page {
			t.Fatalf("page %d: %d %v", i, off, err)
		}
		offs[i] = off
	}
	for i := 0; i < pages; i += 2 { // free every other page
		if err := a.Free(offs[i]); err != nil {
			t.Fatal(err)
		}
	}
	if a.Used() != pages/2*page {
		t.Fatalf("used %d", a.Used())
	}
	if _, err := a.Alloc(2 * page); err != abi.StatusNoSpace {
		t.Fatalf("2 pages in a region of 1-page holes: %v", err)
	}
	// Free two neighbours of one hole: a 3-page hole at pages 8..10.
	if a.Free(offs[9]) != nil {
		t.Fatal("Free")
	}
	if off, err := a.Alloc(3 * page); err != nil || off != 8*page {
		t.Fatalf("3 pages: %d %v, want the merged hole at %d", off, err, 8*page)
	}
	// Every remaining 1-page hole is still usable, and then nothing is.
	n := 0
	for {
		off, err := a.Alloc(1)
		if err == abi.StatusNoSpace {
			break
		}
		if err != nil || off%(2*page) != 0 {
			t.Fatalf("hole at %d: %v", off, err)
		}
		offs[off/page] = off
		n++
	}
	if n != pages/2-2 || a.Used() != pages*page {
		t.Fatalf("filled %d holes, used %d", n, a.Used())
	}
	// Free all in a scrambled order (the 3-page range by its start).
	rng := rand.New(rand.NewPCG(5, 6))
	starts := []uint64{}
	for i := 0; i < pages; i++ {
		if i == 9 || i == 10 {
			continue
		}
		starts = append(starts, uint64(i)*page)
	}
	rng.Shuffle(len(starts), func(i, j int) { starts[i], starts[j] = starts[j], starts[i] })
	for _, off := range starts {
		if err := a.Free(off); err != nil {
			t.Fatalf("Free(%d): %v", off, err)
		}
	}
	if a.Used() != 0 || len(a.free) != 1 {
		t.Fatalf("used %d, %d free ranges after freeing all", a.Used(), len(a.free))
	}
	if off, err := a.Alloc(pages * page); err != nil || off != 0 {
		t.Fatalf("whole region: %d %v", off, err)
	}
}

func TestRegionRangeLimit(t *testing.T) {
	a, err := NewRegionAllocator(1<<20, 4096)
	if err != nil {
		t.Fatal(err)
	}
	a.LimitRanges(2)
	x, err := a.Alloc(4096)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Alloc(4096); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Alloc(4096); err != abi.StatusNoSpace {
		t.Fatalf("third range of a 2-range region: %v", err)
	}
	if err := a.Free(x); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Alloc(4096); err != nil {
		t.Fatalf("after a free: %v", err)
	}
}
