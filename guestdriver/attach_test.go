package guestdriver

import (
	"bytes"
	"errors"
	"testing"
	"unsafe"

	"github.com/ism-backend/ism-backend/abi"
	"golang.org/x/sys/unix"
)

// fakeRegion gives the fake device attach mode as the backend does it: each
// attach-mode DMB is a memfd, mapped into an anonymous "region" with
// MAP_FIXED wherever the device places it, once for the owner and once
// per attachment, so two mappings really share memory.
type fakeRegion struct {
	t     *testing.T
	f     *fakeISM
	mem   []byte
	next  uint64
	place func(size uint64) (uint64, bool) // the test picks the offset
	full  bool                             // answer attach-mode REGISTER with NOSPACE
	dmbs  map[uint64]*fakeShared           // by token
}

type fakeShared struct {
	fd       int
	size     uint64 // page-rounded
	len      uint64
	rgid     uint64
	owner    uint64 // region offset
	attached int64  // region offset of the attachment, -1 if none
}

const fakeShmSize = 1 << 20

// newFakeAttach is newFake with attach mode offered and the region mapped.
func newFakeAttach(t *testing.T) (*Driver, *fakeRegion) {
	d, f := newFake(t, 64, nil)
	mem, err := unix.Mmap(-1, 0, fakeShmSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	r := &fakeRegion{t: t, f: f, mem: mem, dmbs: map[uint64]*fakeShared{}}
	t.Cleanup(func() {
		for _, m := range r.dmbs {
			unix.Close(m.fd)
		}
		unix.Munmap(mem)
	})
	f.serveLock.Lock()
	f.attach = r.handle
	f.serveLock.Unlock()
	d.cfg.Modes |= abi.ModeAttach
	d.cfg.ShmSize = fakeShmSize
	d.shm = &shmRegion{mem: mem, attached: map[uint64]*Attachment{}}
	return d, r
}

func (r *fakeRegion) at(off uint64) unsafe.Pointer { return unsafe.Pointer(&r.mem[off]) }

func (r *fakeRegion) mapAt(fd int, off, size uint64) {
	if _, err := unix.MmapPtr(fd, 0, r.at(off), uintptr(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_FIXED); err != nil {
		panic(err)
	}
}

func (r *fakeRegion) unmapAt(off, size uint64) {
	if _, err := unix.MmapPtr(-1, 0, r.at(off), uintptr(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED); err != nil {
		panic(err)
	}
}

func (r *fakeRegion) alloc(size uint64) uint64 {
	if r.place != nil {
		if off, ok := r.place(size); ok {
			return off
		}
	}
	off := r.next
	r.next += size
	return off
}

// handle serves the attach-mode requests; it runs on the fake's goroutine.
func (r *fakeRegion) handle(q abi.Request, resp *abi.Response) bool {
	switch {
	case q.Op == abi.OpRegisterDMB && q.Flags&abi.FlagAttach != 0 && r.full:
		resp.Status, resp.Index = abi.StatusNoSpace, q.Index
	case q.Op == abi.OpRegisterDMB && q.Flags&abi.FlagAttach != 0:
		fd, err := unix.MemfdCreate("fake-dmb", 0)
		if err != nil {
			panic(err)
		}
		size := pageUp(q.Len)
		if err := unix.Ftruncate(fd, int64(size)); err != nil {
			panic(err)
		}
		m := &fakeShared{fd: fd, size: size, len: q.Len, rgid: q.GID, owner: r.alloc(size), attached: -1}
		r.mapAt(fd, m.owner, size)
		r.f.nextTok += 0x1001
		r.dmbs[r.f.nextTok] = m
		r.f.dmbs[r.f.nextTok] = &fakeDMB{index: q.Index, mem: r.mem[m.owner : m.owner+q.Len], rgid: q.GID}
		resp.Index, resp.Value = uint32(m.owner/abi.ShmPage), r.f.nextTok
	case q.Op == abi.OpAttachDMB:
		m := r.dmbs[q.Token]
		switch {
		case m == nil:
			resp.Status = abi.StatusUnsupported
		case m.rgid != r.f.gid:
			resp.Status = abi.StatusPermission
		case m.attached >= 0:
			resp.Status = abi.StatusBusy
		default:
			off := r.alloc(m.size)
			r.mapAt(m.fd, off, m.size)
			m.attached = int64(off)
			resp.Value, resp.Index = off, uint32(m.len)
		}
	case q.Op == abi.OpDetachDMB:
		m := r.dmbs[q.Token]
		if m == nil || m.attached < 0 {
			resp.Status = abi.StatusNoEntry
			break
		}
		r.unmapAt(uint64(m.attached), m.size)
		m.attached = -1
	case q.Op == abi.OpUnregisterDMB && r.dmbs[q.Token] != nil:
		m := r.dmbs[q.Token]
		r.unmapAt(m.owner, m.size)
		if m.attached >= 0 {
			r.unmapAt(uint64(m.attached), m.size)
		}
		unix.Close(m.fd)
		delete(r.dmbs, q.Token)
		delete(r.f.dmbs, q.Token)
	default:
		return false
	}
	return true
}

// A DMB registered in attach mode and attached by the same device (both
// ends of a connection in one guest): what the sender writes through the
// attachment is what the owner reads, and a MOVE into it still works.
func TestAttachSharesMemory(t *testing.T) {
	d, _ := newFakeAttach(t)
	m, err := d.RegisterDMB(8192, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	if !m.Shared() {
		t.Fatal("DMB registered in copy mode though the driver uses attach mode")
	}
	a, err := d.Attach(m.Token())
	if err != nil {
		t.Fatal(err)
	}
	if a.Len() != 8192 {
		t.Fatalf("attachment of %d bytes, want 8192", a.Len())
	}
	msg := []byte("written through the attachment")
	if _, err := a.WriteAt(msg, 100); err != nil {
		t.Fatal(err)
	}
	if err := a.StoreUint64(8, 0x1122334455667788); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.Bytes()[100:100+len(msg)], msg) {
		t.Fatalf("owner reads %q", m.Bytes()[100:100+len(msg)])
	}
	if *(*uint64)(unsafe.Pointer(&m.Bytes()[8])) != 0x1122334455667788 {
		t.Fatal("cursor store not seen by the owner")
	}
	buf, _ := d.AllocBuffer(64)
	copy(buf.Bytes(), "by MOVE")
	if err := d.Move(m.Token(), 0, true, 4096, buf, 0, 7); err != nil {
		t.Fatal(err)
	}
	if string(m.Bytes()[4096:4103]) != "by MOVE" {
		t.Fatal("MOVE into an attach-mode DMB lost")
	}
	if st := d.AttachStats(); st.Attachments != 1 || st.SharedDMBs != 1 || st.WrittenBytes != uint64(len(msg)) {
		t.Fatalf("stats %+v", st)
	}
	// Out of range writes are refused before touching memory.
	if _, err := a.WriteAt(make([]byte, 2), 8191); !errors.Is(err, abi.StatusRange) {
		t.Fatalf("write past the end: %v", err)
	}
	if err := a.StoreUint64(4, 1); !errors.Is(err, abi.StatusRange) {
		t.Fatalf("misaligned store: %v", err)
	}
	if _, err := d.Attach(m.Token()); !errors.Is(err, abi.StatusBusy) {
		t.Fatalf("second attach: %v", err)
	}
	// Unregistering the DMB ends this driver's own attachment of it.
	if err := d.UnregisterDMB(m); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WriteAt(msg, 0); !errors.Is(err, ErrDetached) {
		t.Fatalf("write after unregister: %v", err)
	}
	if err := a.Detach(); err != nil {
		t.Fatalf("detach of a dead attachment: %v", err)
	}
	if st := d.AttachStats(); st.Attachments != 0 || st.SharedDMBs != 0 {
		t.Fatalf("stats after unregister %+v", st)
	}
}

// The device's DMB event revokes an attachment before anyone hears of it.
func TestAttachRevokedByEvent(t *testing.T) {
	d, r := newFakeAttach(t)
	m, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	a, err := d.Attach(m.Token())
	if err != nil {
		t.Fatal(err)
	}
	r.f.serveLock.Lock()
	r.f.events = append(r.f.events, abi.Event{Type: abi.EventDMB, Token: m.Token(), GID: d.GID()})
	r.f.serveLock.Unlock()
	ev := <-d.Events()
	if ev.Type != abi.EventDMB || ev.Token != m.Token() {
		t.Fatalf("event %+v", ev)
	}
	if err := a.StoreUint64(0, 1); !errors.Is(err, ErrDetached) {
		t.Fatalf("store after the DMB event: %v", err)
	}
}

// A device that maps a new DMB over a range an attachment still holds has
// revoked that attachment (its event may be late): writes through the old
// attachment stop before the new DMB is handed out, so they never land in
// it.
func TestAttachRangeReuseKillsStaleAttachment(t *testing.T) {
	d, r := newFakeAttach(t)
	peer, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	a, err := d.Attach(peer.Token())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.WriteAt([]byte("live"), 64); err != nil {
		t.Fatal(err)
	}
	stale := a.m.off
	r.place = func(uint64) (uint64, bool) { return stale, true }
	fresh, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	if fresh.shared.off != stale {
		t.Fatalf("fake placed the DMB at %#x, want %#x", fresh.shared.off, stale)
	}
	if _, err := a.WriteAt([]byte("stale"), 64); !errors.Is(err, ErrDetached) {
		t.Fatalf("write through a revoked attachment: %v", err)
	}
	if got := fresh.Bytes()[64:69]; !bytes.Equal(got, make([]byte, 5)) {
		t.Fatalf("the new DMB holds %q", got)
	}
}

// Hostile ATTACH answers: a range outside the region or a zero length is a
// broken device, never a view.
func TestAttachHostileAnswers(t *testing.T) {
	for _, tc := range []struct {
		name string
		fix  func(*abi.Response)
	}{
		{"offset past the region", func(r *abi.Response) { r.Value = fakeShmSize }},
		{"range ends past the region", func(r *abi.Response) { r.Value = fakeShmSize - abi.ShmPage; r.Index = 2 * abi.ShmPage }},
		{"unaligned offset", func(r *abi.Response) { r.Value = 12 }},
		{"length 0", func(r *abi.Response) { r.Index = 0 }},
		{"length past the DMB limit", func(r *abi.Response) { r.Index = abi.MaxDMBSize + 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, r := newFakeAttach(t)
			m, err := d.RegisterDMB(4096, d.GID())
			if err != nil {
				t.Fatal(err)
			}
			inner := r.handle
			r.f.serveLock.Lock()
			r.f.attach = func(q abi.Request, resp *abi.Response) bool {
				ok := inner(q, resp)
				if q.Op == abi.OpAttachDMB {
					tc.fix(resp)
				}
				return ok
			}
			r.f.serveLock.Unlock()
			if a, err := d.Attach(m.Token()); !errors.Is(err, ErrBroken) {
				t.Fatalf("attach gave %v, %v", a, err)
			}
		})
	}
}

// With Options.Modes copy only, or a device without attach mode, DMBs are
// copy-mode and Attach says UNSUPPORTED, which tells the stack to MOVE.
func TestCopyModeOnly(t *testing.T) {
	d, _ := newFake(t, 64, nil)
	m, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	if m.Shared() || d.AttachOffered() {
		t.Fatal("attach mode without a region")
	}
	if _, err := d.Attach(m.Token()); !errors.Is(err, abi.StatusUnsupported) {
		t.Fatalf("attach in copy mode: %v", err)
	}
}

// A full shared-memory region does not cost the connection: the DMB is
// registered in copy mode instead. RegisterDMBIn keeps the mode asked for.
func TestRegisterFallsBackToCopyWhenRegionFull(t *testing.T) {
	d, r := newFakeAttach(t)
	r.f.serveLock.Lock()
	r.full = true
	r.f.serveLock.Unlock()
	m, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	if m.Shared() {
		t.Fatal("DMB in attach mode though the region is full")
	}
	if _, err := d.RegisterDMBIn(abi.ModeAttach, 4096, d.GID()); !errors.Is(err, abi.StatusNoSpace) {
		t.Fatalf("attach-mode register in a full region: %v", err)
	}
	r.f.serveLock.Lock()
	r.full = false
	r.f.serveLock.Unlock()
	c, err := d.RegisterDMBIn(abi.ModeCopy, 4096, d.GID())
	if err != nil || c.Shared() {
		t.Fatalf("copy-mode register with attach mode offered: %v, shared %v", err, c != nil && c.Shared())
	}
}

// Close detaches and unregisters attach-mode mappings before it resets the
// device, so that no unmap of the region is in flight at the reset.
func TestCloseReleasesMappings(t *testing.T) {
	d, r := newFakeAttach(t)
	m, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Attach(m.Token()); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	r.f.serveLock.Lock()
	left := len(r.dmbs)
	r.f.serveLock.Unlock()
	if left != 0 {
		t.Fatalf("%d attach-mode DMBs left registered after Close", left)
	}
	if _, err := m.d.Attach(m.Token()); !errors.Is(err, ErrClosed) {
		t.Fatalf("attach after Close: %v", err)
	}
}
