package dmb

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
)

// Reserve marks exactly the range taken: Alloc hands out what is around
// it, Free gives it back, and overlapping, unaligned or outside ranges are
// refused.
func TestRegionReserve(t *testing.T) {
	a, err := NewRegionAllocator(16*4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Reserve(4*4096, 2*4096); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ off, n uint64 }{{5 * 4096, 4096}, {3 * 4096, 2 * 4096}, {100, 4096}, {16 * 4096, 4096}, {15 * 4096, 2 * 4096}, {0, 0}} {
		if err := a.Reserve(c.off, c.n); err == nil {
			t.Errorf("Reserve(%#x, %#x) accepted", c.off, c.n)
		}
	}
	var got []uint64
	for {
		off, err := a.Alloc(4096)
		if err != nil {
			break
		}
		got = append(got, off)
	}
	if len(got) != 14 {
		t.Fatalf("%d pages allocated around the reserved two, want 14", len(got))
	}
	for _, off := range got {
		if off == 4*4096 || off == 5*4096 {
			t.Fatalf("Alloc handed out the reserved page %#x", off)
		}
	}
	if err := a.Free(4 * 4096); err != nil {
		t.Fatal(err)
	}
	if off, err := a.Alloc(2 * 4096); err != nil || off != 4*4096 {
		t.Fatalf("after Free: Alloc %#x, %v", off, err)
	}
	l, _ := NewRegionAllocator(16*4096, 4096)
	l.LimitRanges(1)
	if err := l.Reserve(0, 4096); err != nil {
		t.Fatal(err)
	}
	if err := l.Reserve(4096, 4096); err != abi.StatusNoSpace {
		t.Fatalf("Reserve past the range limit: %v", err)
	}
}

func TestTableInsert(t *testing.T) {
	var tb Table[int]
	if err := tb.Insert(7, 1, 2); err != nil {
		t.Fatal(err)
	}
	if err := tb.Insert(7, 2, 2); err != abi.StatusBusy {
		t.Fatalf("second insert of a token: %v", err)
	}
	if err := tb.Insert(0, 2, 2); err == nil {
		t.Fatal("token 0 inserted")
	}
	if err := tb.Insert(8, 2, 2); err != nil {
		t.Fatal(err)
	}
	if err := tb.Insert(9, 3, 2); err != abi.StatusNoSpace {
		t.Fatalf("insert past the limit: %v", err)
	}
	if v, ok := tb.Get(7); !ok || v != 1 {
		t.Fatal("token 7 lost")
	}
}

// A Buffer rebuilt from another's memfd is the same memory; a memfd that
// is too small or not sealed is refused.
func TestBufferFromFD(t *testing.T) {
	b, err := NewBuffer("t", 8192)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	b2, err := BufferFromFD(b.FD(), 8192)
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	b.Bytes()[8191] = 42
	if b2.Bytes()[8191] != 42 {
		t.Fatal("not the same memory")
	}
	if _, err := BufferFromFD(b.FD(), 3*4096); err == nil {
		t.Fatal("a memfd smaller than the size accepted")
	}
	fd, err := unix.MemfdCreate("unsealed", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	unix.Ftruncate(fd, 4096)
	if _, err := BufferFromFD(fd, 4096); err == nil {
		t.Fatal("an unsealed memfd accepted")
	}
}
