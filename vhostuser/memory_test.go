package vhostuser

import (
	"testing"

	"golang.org/x/sys/unix"
)

func anonRegion(t *testing.T, gpa uint64) *MemoryRegion {
	t.Helper()
	m, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	r := &MemoryRegion{GuestPhysAddr: gpa, Size: 4096, host: m, mapped: m, fd: -1}
	t.Cleanup(r.unmap)
	return r
}

func table(t *testing.T, regions ...*MemoryRegion) *Memory {
	t.Helper()
	m, err := newMemory(regions)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// A region stays mapped while any live snapshot holds it, across several
// table changes, and is unmapped when the last of them is released; a
// retired snapshot is never handed out again.
func TestSnapshotRegionLifetime(t *testing.T) {
	d := &Guest{}
	a, b, c := anonRegion(t, 0), anonRegion(t, 0x1000), anonRegion(t, 0x2000)
	mapped := func(rs ...*MemoryRegion) (s string) {
		for _, r := range rs {
			if r.mapped != nil {
				s += "1"
			} else {
				s += "0"
			}
		}
		return s
	}
	d.setMemory(table(t, a, b)) // T0
	t0 := d.AcquireMemory()     // a peer's MOVE into this VM
	d.setMemory(table(t, a, b, c))
	t1 := d.AcquireMemory()
	d.setMemory(table(t, a, c)) // T2: b dropped
	if got := mapped(a, b, c); got != "111" {
		t.Fatalf("with T0 and T1 held: mapped %s, want 111", got)
	}
	t1.Release()
	if got := mapped(a, b, c); got != "111" {
		t.Fatalf("with T0 held: mapped %s, want 111 (T0 holds b)", got)
	}
	if dst, err := t0.Bytes(0x1000, 8); err != nil || len(dst) != 8 {
		t.Fatalf("T0's view of b: %v", err)
	} else {
		copy(dst, "stillok!") // mapped: no fault
	}
	t0.Release()
	if got := mapped(a, b, c); got != "101" {
		t.Fatalf("after the last release: mapped %s, want 101", got)
	}
	if t0.tryAcquire() {
		t.Fatal("a retired snapshot was acquired again")
	}
	if m := d.AcquireMemory(); m == nil || len(m.Regions()) != 2 {
		t.Fatalf("current table: %v", m)
	} else {
		m.Release()
	}
	d.setMemory(nil) // teardown
	if got := mapped(a, b, c); got != "000" {
		t.Fatalf("after teardown: mapped %s, want 000", got)
	}
	if m := d.AcquireMemory(); m != nil {
		t.Fatal("a table after teardown")
	}
}

// Peers acquire, write through and release while the table keeps changing
// (a region dropped and added back, as REM/ADD_MEM_REG do): no write lands
// in an unmapped region (it would crash the test binary) and every region
// dropped for good ends unmapped.
func TestSnapshotSwapsBesideReaders(t *testing.T) {
	d := &Guest{}
	a, b := anonRegion(t, 0), anonRegion(t, 0x1000)
	d.setMemory(table(t, a, b))
	stop := make(chan struct{})
	done := make(chan int)
	for range 4 {
		go func() {
			n := 0
			for {
				select {
				case <-stop:
					done <- n
					return
				default:
				}
				m := d.AcquireMemory()
				if dst, err := m.Bytes(0x1000, 8); err == nil {
					copy(dst, "peerdata")
					n++
				}
				m.Release()
			}
		}()
	}
	for i := range 2000 {
		if i%2 == 0 {
			d.setMemory(table(t, a))
		} else {
			d.setMemory(table(t, a, anonRegion(t, 0x1000)))
		}
	}
	d.setMemory(table(t, a))
	close(stop)
	writes := 0
	for range 4 {
		writes += <-done
	}
	if b.mapped != nil {
		t.Fatal("the first region b is still mapped after every table holding it was released")
	}
	if a.mapped == nil {
		t.Fatal("region a, in the current table, was unmapped")
	}
	t.Logf("%d writes beside 2000 table changes", writes)
}
