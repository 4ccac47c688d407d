package ism

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"testing"

	"golang.org/x/sys/unix"
)

// TestMoveFaultReleasesOwnerLock: a MOVE whose copy faults (the owner's
// memory file was shrunk under its mapping; the transport turns the SIGBUS
// into a panic with debug.SetPanicOnFault and recovers) must not leave the
// owner's lock held: the owner could then never unregister, reset or
// disconnect, and its teardown would hang with the transport's locks held.
func TestMoveFaultReleasesOwnerLock(t *testing.T) {
	const size = 64 << 10
	file := filepath.Join(t.TempDir(), "ram")
	if err := os.WriteFile(file, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(file, unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	ram, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	unix.Close(fd)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(ram)

	f := newFabric()
	mem, err := NewSliceMemory(Region{GPA: 0, Data: ram})
	if err != nil {
		t.Fatal(err)
	}
	a, err := f.Connect("a", 0xA, mem, &notifier{})
	if err != nil {
		t.Fatal(err)
	}
	b := newGuest(t, f, "b", 0xB)
	tok := register(t, a, 0x1000, 4096, b.dev.GID(), 1)
	if err := os.Truncate(file, 0); err != nil { // the front-end shrinks A's RAM
		t.Fatal(err)
	}

	faulted := func() (p any) {
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer func() { p = recover() }()
		b.dev.Move(tok, 0, 0, false, [][]byte{b.low[:64]})
		return nil
	}()
	if faulted == nil {
		t.Fatal("the MOVE into truncated memory did not fault")
	}
	if !a.mu.TryLock() {
		t.Fatal("the owner's lock is still held after the faulted MOVE")
	}
	a.mu.Unlock()
	a.Disconnect()
}
