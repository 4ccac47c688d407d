package dmb

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestBuffer(t *testing.T) {
	b, err := NewBuffer("test", 1<<20+1)
	if err != nil {
		t.Fatal(err)
	}
	page := uint64(os.Getpagesize())
	if b.Size() != (1<<20+1+page-1)/page*page {
		t.Fatalf("size %d", b.Size())
	}
	// A second mapping of the fd (what a guest BAR is) sees the same bytes.
	other, err := unix.Mmap(b.FD(), 0, int(b.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(other)
	b.Bytes()[12345] = 0x5A
	if other[12345] != 0x5A || other[0] != 0 {
		t.Fatal("memfd not shared or not zeroed")
	}
	seals, err := unix.FcntlInt(uintptr(b.FD()), unix.F_GET_SEALS, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL; seals&want != want {
		t.Fatalf("seals %#x", seals)
	}
	if err := unix.Ftruncate(b.FD(), 4096); err == nil {
		t.Fatal("sealed memfd shrank")
	}
	// A dup outlives Close: a SHMEM_MAP in flight still has its fd.
	dup, err := b.DupFD()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dup)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err := unix.FcntlInt(uintptr(dup), unix.F_GET_SEALS, 0); err != nil || st&unix.F_SEAL_SHRINK == 0 {
		t.Fatalf("dup after Close: seals %#x %v", st, err)
	}
	if _, err := b.DupFD(); err == nil {
		t.Fatal("DupFD after Close")
	}
	if err := b.Close(); err != nil || b.FD() != -1 || b.Bytes() != nil {
		t.Fatal("second Close")
	}
	if _, err := NewBuffer("zero", 0); err == nil {
		t.Fatal("size 0 accepted")
	}
}
