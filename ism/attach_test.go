package ism

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
)

// fakeMapper plays a transport's mapping worker: Map maps the memfd into
// this process (what the guest's BAR would show) at the region offset;
// Unmap is queued until flush, as the worker would queue it.
type fakeMapper struct {
	mu      sync.Mutex
	maps    map[uint64][]byte // region offset -> mapping
	queued  []func()
	mapErr  error
	onMap   func() // runs inside Map, before it returns
	mapLog  []uint64
	unmapOK bool
}

func newFakeMapper() *fakeMapper { return &fakeMapper{maps: map[uint64][]byte{}, unmapOK: true} }

func (m *fakeMapper) Map(fd int, off, size uint64) error {
	if m.onMap != nil {
		m.onMap()
	}
	if m.mapErr != nil {
		return m.mapErr
	}
	b, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, dup := m.maps[off]; dup {
		unix.Munmap(b)
		return errors.New("fake: offset mapped twice")
	}
	m.maps[off] = b
	m.mapLog = append(m.mapLog, off)
	return nil
}

func (m *fakeMapper) Unmap(off, size uint64, done func(bool)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.queued = append(m.queued, func() {
		m.mu.Lock()
		b, ok := m.maps[off]
		delete(m.maps, off)
		m.mu.Unlock()
		if ok {
			unix.Munmap(b)
		}
		done(ok && m.unmapOK)
	})
}

// flush carries out the queued unmaps and returns how many there were.
func (m *fakeMapper) flush() int {
	m.mu.Lock()
	q := m.queued
	m.queued = nil
	m.mu.Unlock()
	for _, f := range q {
		f()
	}
	return len(q)
}

func (m *fakeMapper) at(off uint64) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.maps[off]
}

func (m *fakeMapper) mapped() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.maps)
}

type attachGuest struct {
	*guest
	m *fakeMapper
}

const testRegion = 64 << 20

func newAttachGuest(t *testing.T, f *Fabric, name string, gid uint64, modes uint16) *attachGuest {
	t.Helper()
	return newAttachGuestConfig(t, f, name, gid, DeviceConfig{Modes: modes})
}

// newAttachGuestConfig is newAttachGuest with cfg's modes and limits; the
// mapper and the region size are the tests'.
func newAttachGuestConfig(t *testing.T, f *Fabric, name string, gid uint64, cfg DeviceConfig) *attachGuest {
	t.Helper()
	g := &guest{low: make([]byte, lowSize), high: make([]byte, highSize), n: &notifier{}}
	var err error
	if g.mem, err = NewSliceMemory(Region{GPA: lowGPA, Data: g.low}, Region{GPA: highGPA, Data: g.high}); err != nil {
		t.Fatal(err)
	}
	m := newFakeMapper()
	cfg.Mapper, cfg.RegionSize = m, testRegion
	if g.dev, err = f.ConnectDevice(name, gid, g.mem, g.n, cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.dev.Disconnect(); m.flush() })
	return &attachGuest{g, m}
}

const both = abi.ModeCopy | abi.ModeAttach

func registerAttach(t *testing.T, g *attachGuest, n, rgid uint64, index uint32) (tok, off uint64) {
	t.Helper()
	r := do(t, g.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: n, GID: rgid, Index: index}, nil, abi.StatusOK)
	if r.Value == 0 {
		t.Fatal("token 0")
	}
	return r.Value, uint64(r.Index) * abi.ShmPage
}

func attach(t *testing.T, g *attachGuest, tok uint64, want abi.Status) abi.Response {
	t.Helper()
	return do(t, g.dev, abi.Request{Op: abi.OpAttachDMB, Token: tok}, nil, want)
}

// TestAttachLifecycle: REGISTER maps the memfd into the owner's region,
// ATTACH into the rgid's; both see one memory; a MOVE lands in it and
// signals the owner's SBA; DETACH unmaps the attacher's side only.
func TestAttachLifecycle(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	setSBA(t, a.dev, sbaGPA, false)

	tok, offA := registerAttach(t, a, 10000, 0xB, 7)
	own := a.m.at(offA)
	if len(own) != 12288 {
		t.Fatalf("owner's mapping at %#x is %d bytes, want 3 pages", offA, len(own))
	}
	r := attach(t, b, tok, abi.StatusOK)
	if r.Index != 10000 {
		t.Fatalf("ATTACH returned length %d", r.Index)
	}
	peer := b.m.at(r.Value)
	if peer == nil {
		t.Fatalf("no mapping at the attacher's offset %#x", r.Value)
	}
	// The sender writes through its mapping; the owner reads it in its own.
	copy(peer[100:], "written by b")
	if string(own[100:112]) != "written by b" {
		t.Fatal("owner's and attacher's mappings are not one memory")
	}
	// A copy-only path into the same DMB: MOVE lands in the memfd.
	do(t, b.dev, move(tok, 3, 9990, 10, true), [][]byte{[]byte("0123456789")}, abi.StatusOK)
	if string(own[9990:10000]) != "0123456789" || a.sbaDMBE(t, sbaGPA, 7, 3) != 1 {
		t.Fatal("MOVE into an attach-mode DMB did not land or signal")
	}
	do(t, b.dev, move(tok, 0, 9991, 10, false), [][]byte{make([]byte, 10)}, abi.StatusRange)

	as, bs := a.dev.Stats(), b.dev.Stats()
	if as.AttachDMBs != 1 || as.MappedBytes != 12288 || as.Maps != 1 || bs.Attached != 1 || bs.MappedBytes != 12288 || bs.Maps != 1 || bs.MoveBytes != 10 {
		t.Fatalf("stats a %+v b %+v", as, bs)
	}
	do(t, b.dev, abi.Request{Op: abi.OpDetachDMB, Token: tok}, nil, abi.StatusOK)
	if b.m.flush() != 1 || b.m.mapped() != 0 || a.m.mapped() != 1 {
		t.Fatal("DETACH did not unmap exactly the attacher's mapping")
	}
	do(t, b.dev, abi.Request{Op: abi.OpDetachDMB, Token: tok}, nil, abi.StatusNoEntry) // double detach
	if bs = b.dev.Stats(); bs.Attached != 0 || bs.MappedBytes != 0 || bs.Unmaps != 1 || bs.Refused[abi.StatusNoEntry] != 1 {
		t.Fatalf("stats after detach %+v", bs)
	}
	// The attacher's range is free again: a new attach gets it back.
	if r2 := attach(t, b, tok, abi.StatusOK); r2.Value != r.Value {
		t.Fatalf("re-attach at %#x, want the freed %#x", r2.Value, r.Value)
	}
	if s := f.Stats(); s.Maps != 3 || s.Unmaps != 1 || s.Attached != 1 || s.AttachDMBs != 1 || s.MappedBytes != 2*12288 {
		t.Fatalf("fabric stats %+v", s)
	}
}

// TestAttachRefusals: hostile or mistaken ATTACH/DETACH/REGISTER get their
// status, are counted, and change nothing.
func TestAttachRefusals(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	c := newAttachGuest(t, f, "c", 0xC, both)
	copyOnly := newAttachGuest(t, f, "d", 0xD, abi.ModeCopy)
	attachOnly := newAttachGuest(t, f, "e", 0xE, abi.ModeAttach)

	tok, _ := registerAttach(t, a, 4096, 0xB, 1)
	copyTok := register(t, a.dev, dmbGPA, 4096, 0xB, 2)
	attach(t, b, tok, abi.StatusOK)

	attach(t, b, 0x1234, abi.StatusNoEntry)         // unknown token
	attach(t, c, tok, abi.StatusPermission)         // foreign: c is not the rgid
	attach(t, a, tok, abi.StatusPermission)         // the owner is not the rgid either
	attach(t, b, tok, abi.StatusBusy)               // attached twice
	attach(t, b, copyTok, abi.StatusUnsupported)    // a copy-mode DMB
	attach(t, copyOnly, tok, abi.StatusUnsupported) // device without attach mode
	do(t, c.dev, abi.Request{Op: abi.OpDetachDMB, Token: tok}, nil, abi.StatusPermission)
	do(t, b.dev, abi.Request{Op: abi.OpDetachDMB, Token: copyTok}, nil, abi.StatusNoEntry) // never attached
	do(t, b.dev, abi.Request{Op: abi.OpDetachDMB, Token: 0x1234}, nil, abi.StatusNoEntry)
	do(t, b.dev, abi.Request{Op: abi.OpDetachDMB, Token: tok, Flags: 1}, nil, abi.StatusInvalid)
	do(t, b.dev, abi.Request{Op: abi.OpAttachDMB, Token: tok, Flags: 2}, nil, abi.StatusInvalid)
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Addr: dmbGPA, Len: 4096, GID: 0xB, Index: 3}, nil, abi.StatusInvalid)
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: abi.MaxDMBSize + 1, GID: 0xB, Index: 3}, nil, abi.StatusRange)
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: 0, Index: 3}, nil, abi.StatusInvalid)
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: 0xB, Index: 1}, nil, abi.StatusBusy)
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: 0xB, Index: abi.MaxDMBs}, nil, abi.StatusRange)
	do(t, copyOnly.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: 0xB}, nil, abi.StatusUnsupported)
	do(t, attachOnly.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0xB}, nil, abi.StatusUnsupported)
	// Only the owner unregisters; others are refused and nothing is unmapped.
	do(t, b.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusPermission)

	if b.m.mapped() != 1 || a.m.mapped() != 1 || c.m.mapped() != 0 || b.m.flush()+a.m.flush() != 0 {
		t.Fatal("a refused request changed a mapping")
	}
	if s := c.dev.Stats(); s.Refused[abi.StatusPermission] != 2 {
		t.Fatalf("c's refusals %v", s.Refused)
	}
	if s := b.dev.Stats(); s.Refused[abi.StatusNoEntry] != 3 || s.Refused[abi.StatusBusy] != 1 || s.Refused[abi.StatusUnsupported] != 1 || s.Attached != 1 {
		t.Fatalf("b's stats %+v", s)
	}
}

// TestUnregisterWhileAttached: the owner's UNREGISTER unmaps the DMB on
// every side and tells the attacher (EventDMB), also an intra-VM attacher's
// own second mapping, without an event to itself.
func TestUnregisterWhileAttached(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	tok, offA := registerAttach(t, a, 4096, 0xB, 0)
	attach(t, b, tok, abi.StatusOK)
	self, _ := registerAttach(t, a, 8192, 0xA, 1)
	r := attach(t, a, self, abi.StatusOK) // intra-VM: the owner is the rgid
	if r.Value == offA || a.m.mapped() != 3 {
		t.Fatalf("intra-VM attach at %#x, %d mappings", r.Value, a.m.mapped())
	}

	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusOK)
	if a.m.flush() != 1 || b.m.flush() != 1 || b.m.mapped() != 0 || a.m.at(offA) != nil {
		t.Fatal("UNREGISTER did not unmap both sides")
	}
	_, evs := b.n.snapshot()
	if len(evs) != 1 || evs[0] != (abi.Event{Type: abi.EventDMB, Token: tok, GID: 0xA}) {
		t.Fatalf("attacher's events %+v", evs)
	}
	do(t, b.dev, move(tok, 0, 0, 1, false), [][]byte{{1}}, abi.StatusNoEntry)
	attach(t, b, tok, abi.StatusNoEntry)
	do(t, b.dev, abi.Request{Op: abi.OpDetachDMB, Token: tok}, nil, abi.StatusNoEntry)

	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: self}, nil, abi.StatusOK)
	if a.m.flush() != 2 || a.m.mapped() != 0 {
		t.Fatal("intra-VM UNREGISTER left a mapping")
	}
	if _, evs := a.n.snapshot(); len(evs) != 0 {
		t.Fatalf("owner got events %+v", evs)
	}
	if s := f.Stats(); s.MappedBytes != 0 || s.Attached != 0 || s.AttachDMBs != 0 || s.Unmaps != 4 {
		t.Fatalf("stats %+v", s)
	}
}

// TestDisconnectWhileMapped: an owner that goes away takes its DMBs from
// its peers' regions (unmap, EventDMB, then EventGID); an attacher that goes
// away is forgotten by the owner's DMB, and needs no unmap itself (the
// front-end dropped its mappings).
func TestDisconnectWhileMapped(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	tok, _ := registerAttach(t, a, 4096, 0xB, 0)
	attach(t, b, tok, abi.StatusOK)
	back, _ := registerAttach(t, b, 4096, 0xA, 0)
	attach(t, a, back, abi.StatusOK)

	a.dev.Disconnect()
	if b.m.flush() != 1 || b.m.mapped() != 1 {
		t.Fatal("b's mapping of a's DMB not removed (or b's own DMB removed)")
	}
	if a.m.flush() != 0 {
		t.Fatal("unmap queued for the gone device")
	}
	_, evs := b.n.snapshot()
	if len(evs) != 2 || evs[0] != (abi.Event{Type: abi.EventDMB, Token: tok, GID: 0xA}) || evs[1].Type != abi.EventGID {
		t.Fatalf("b's events %+v", evs)
	}
	// b's DMB lost its attacher: unregistering it unmaps only b's side.
	do(t, b.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: back}, nil, abi.StatusOK)
	if b.m.flush() != 1 || a.m.flush() != 0 {
		t.Fatal("unregister after the attacher left")
	}
	if s := f.Stats(); s.MappedBytes != 0 || s.Attached != 0 {
		t.Fatalf("stats %+v", s)
	}
}

// TestAttachRevokedDuringMap: the owner unregisters while the attacher's
// SHMEM_MAP is in flight: the attach fails, and the unmap queued by the
// unregister runs after the map, so nothing stays mapped.
func TestAttachRevokedDuringMap(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	tok, _ := registerAttach(t, a, 4096, 0xB, 0)
	b.m.onMap = func() {
		b.m.onMap = nil
		do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusOK)
	}
	attach(t, b, tok, abi.StatusNoEntry)
	if b.m.mapped() != 1 || b.m.flush() != 1 || b.m.mapped() != 0 {
		t.Fatal("the revoked attach's mapping was not unmapped after its map")
	}
	if s := b.dev.Stats(); s.Attached != 0 || s.MappedBytes != 0 {
		t.Fatalf("stats %+v", s)
	}
}

// TestAttachMapFails: a failed SHMEM_MAP leaves nothing reserved.
func TestAttachMapFails(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	a.m.mapErr = abi.StatusNotReady
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: 0xB, Index: 5}, nil, abi.StatusNotReady)
	a.m.mapErr = errors.New("front-end said no")
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: 0xB, Index: 5}, nil, abi.StatusInternal)
	a.m.mapErr = nil
	tok, off := registerAttach(t, a, 4096, 0xB, 5) // index 5 and offset 0 are free again
	if off != 0 {
		t.Fatalf("offset %#x after failed maps", off)
	}
	b.m.mapErr = errors.New("no")
	attach(t, b, tok, abi.StatusInternal)
	b.m.mapErr = nil
	if r := attach(t, b, tok, abi.StatusOK); r.Value != 0 {
		t.Fatalf("attach offset %#x after a failed map", r.Value)
	}
	if s := f.Stats(); s.MappedBytes != 8192 || s.Maps != 2 {
		t.Fatalf("stats %+v", s)
	}
}

// TestAttachMaxMapped: the mapped-bytes limit refuses with NOSPACE and
// frees up again on DETACH.
func TestAttachMaxMapped(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuestConfig(t, f, "b", 0xB, DeviceConfig{Modes: both, MaxMapped: 8192})
	t1, _ := registerAttach(t, a, 8192, 0xB, 0)
	t2, _ := registerAttach(t, a, 4096, 0xB, 1)
	attach(t, b, t1, abi.StatusOK)
	attach(t, b, t2, abi.StatusNoSpace)
	if s := b.dev.Stats(); s.MappedLimitRefused != 1 {
		t.Fatalf("%d refusals by the mapped-bytes limit, want 1", s.MappedLimitRefused)
	}
	do(t, b.dev, abi.Request{Op: abi.OpDetachDMB, Token: t1}, nil, abi.StatusOK)
	b.m.flush()
	attach(t, b, t2, abi.StatusOK)
	if !bytes.Equal(b.m.at(0)[:4], make([]byte, 4)) {
		t.Fatal("a new DMB is not zeroed")
	}
}

// TestAttachMaxMappings: a device holds at most MaxMappings mappings (each
// is a memory-table slot in QEMU); beyond, REGISTER and ATTACH say NOSPACE.
func TestAttachMaxMappings(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	for i := range MaxMappings {
		registerAttach(t, a, 4096, 0xA, uint32(i))
	}
	do(t, a.dev, abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: 0xA, Index: MaxMappings}, nil, abi.StatusNoSpace)
	// Attaching a peer's DMB needs a mapping too.
	b := newAttachGuest(t, f, "b", 0xB, both)
	tok, _ := registerAttach(t, b, 4096, 0xA, 0)
	attach(t, a, tok, abi.StatusNoSpace)
}
