package ism

import (
	"fmt"
	"sort"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/dmb"
)

// Memory is one guest's RAM as the device model sees it. The transport may
// replace the guest's memory table at any time (without Device.SetMemory,
// without waiting for the device model): each use of the RAM goes through a
// MemoryView of the table of that moment, which stays mapped until its
// Release. The device model holds a view for one request (one MOVE, one
// SET_SBA check) and never keeps slices of it afterwards.
//
// Acquire is called on the MOVE path, on any guest's goroutine: it must not
// allocate, block or call back into this package.
//
// The device model uses a device's Memory only under that device's lock, so
// once Device.SetMemory or Device.Disconnect has returned the old Memory is
// no longer acquired.
type Memory interface {
	Acquire() MemoryView
}

// MemoryView is one memory table of a guest, kept mapped until Release.
//
// Bytes returns the host view of guest-physical [gpa, gpa+n): a slice of
// exactly n bytes (longer slices are cut, shorter ones are refused), or an
// error if the range is not entirely inside one contiguous host mapping.
// The slice is valid until Release. Neither method may allocate or block.
type MemoryView interface {
	Bytes(gpa, n uint64) ([]byte, error)
	Release()
}

// Notifier reaches a guest's driver. Both methods are called with device
// locks held and from any guest's goroutine: they must not block and must not
// call back into this package. Neither is called after the device's
// Disconnect has returned.
type Notifier interface {
	// Interrupt raises the event-queue interrupt (a DMB was signalled and
	// the guest asked for interrupts).
	Interrupt()
	// PostEvent queues an event for the guest's event queue, or refuses it
	// (false). It must keep room for device events (abi.EventGID,
	// abi.EventDMB), whatever software events (abi.EventSWR, from peers'
	// SIGNALs) it holds: a driver that misses one may wait for ever on a
	// peer or a DMB that is gone. It may refuse software events, to bound
	// what one sender, or all, can make it hold; the SIGNAL is then
	// refused.
	PostEvent(ev abi.Event) bool
}

// Region is one contiguous piece of guest RAM: guest-physical
// [GPA, GPA+len(Data)) backed by Data.
type Region struct {
	GPA  uint64
	Data []byte
}

// SliceMemory is a Memory (and MemoryView) over plain byte slices: test guests, and any
// transport whose memory table is a list of mapped regions. Regions must not
// overlap. It is immutable once built, so it needs no lock.
type SliceMemory struct {
	regions []Region // sorted by GPA
}

// NewSliceMemory builds a SliceMemory; it refuses overlapping or wrapping
// regions.
func NewSliceMemory(regions ...Region) (*SliceMemory, error) {
	rs := append([]Region(nil), regions...)
	sort.Slice(rs, func(i, j int) bool { return rs[i].GPA < rs[j].GPA })
	for i, r := range rs {
		if dmb.AddOverflows(r.GPA, uint64(len(r.Data))) {
			return nil, fmt.Errorf("ism: region at %#x of %d bytes wraps", r.GPA, len(r.Data))
		}
		if i > 0 && rs[i-1].GPA+uint64(len(rs[i-1].Data)) > r.GPA {
			return nil, fmt.Errorf("ism: regions at %#x and %#x overlap", rs[i-1].GPA, r.GPA)
		}
	}
	return &SliceMemory{regions: rs}, nil
}

// Acquire implements Memory: a SliceMemory never changes, so it is its own
// view.
func (m *SliceMemory) Acquire() MemoryView { return m }

// Release implements MemoryView; there is nothing to release.
func (m *SliceMemory) Release() {}

// Bytes implements MemoryView: the range must lie inside one region.
func (m *SliceMemory) Bytes(gpa, n uint64) ([]byte, error) {
	// Few regions (QEMU has a handful): a linear scan beats a binary search.
	for i := range m.regions {
		r := &m.regions[i]
		if gpa < r.GPA {
			break
		}
		off := gpa - r.GPA
		if dmb.CheckRange(off, n, uint64(len(r.Data))) == nil {
			return r.Data[off : off+n : off+n], nil
		}
	}
	return nil, abi.StatusFault
}
