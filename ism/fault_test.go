package ism

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
)

// shrunkRAM maps a file of size bytes and truncates it to 0, as a front-end
// shrinking its guest-memory file under the backend's mapping: every access
// to the slice faults.
func shrunkRAM(t *testing.T, size int) []byte {
	t.Helper()
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
	t.Cleanup(func() { unix.Munmap(ram) })
	if err := os.Truncate(file, 0); err != nil {
		t.Fatal(err)
	}
	return ram
}

// moveCatching runs a MOVE as a transport's queue goroutine does: faults
// become panics (debug.SetPanicOnFault), recovered here.
func moveCatching(d *Device, tok uint64, data []byte) (err error, p any) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() { p = recover() }()
	return d.Move(tok, 0, 0, false, [][]byte{data}), nil
}

// TestMoveFaultInOwnerRAM: a MOVE whose copy faults in the owner's RAM (the
// owner's front-end shrank its memory file) is the owner's problem: the
// sender gets StatusFault, no panic that would end the sender's connection,
// and the owner's lock is free, so its Disconnect does not hang.
func TestMoveFaultInOwnerRAM(t *testing.T) {
	const size = 64 << 10
	ram := make([]byte, size)
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
	// A's RAM is replaced by a mapping of a shrunk file.
	shrunk, err := NewSliceMemory(Region{GPA: 0, Data: shrunkRAM(t, size)})
	if err != nil {
		t.Fatal(err)
	}
	a.SetMemory(shrunk)

	err, p := moveCatching(b.dev, tok, b.low[:64])
	if p != nil {
		t.Fatalf("the fault in the owner's RAM panicked in the sender: %v", p)
	}
	if err != abi.StatusFault {
		t.Fatalf("MOVE into the owner's shrunk RAM: %v, want %v", err, abi.StatusFault)
	}
	if !a.mu.TryLock() {
		t.Fatal("the owner's lock is still held after the faulted MOVE")
	}
	a.mu.Unlock()
	a.Disconnect()
}

// TestMoveFaultInSenderDataReleasesOwnerLock: a fault in the sender's own
// data panics on to the sender's transport (which closes that connection),
// and the owner's lock is released on the way: the owner could otherwise
// never unregister, reset or disconnect, and its teardown would hang with
// the transport's locks held.
func TestMoveFaultInSenderDataReleasesOwnerLock(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	tok := register(t, a.dev, dmbGPA, 4096, b.dev.GID(), 1)
	_, p := moveCatching(b.dev, tok, shrunkRAM(t, 4096)[:64])
	if p == nil {
		t.Fatal("the MOVE from truncated memory did not fault")
	}
	if !a.dev.mu.TryLock() {
		t.Fatal("the owner's lock is still held after the faulted MOVE")
	}
	a.dev.mu.Unlock()
	a.dev.Disconnect()
}
