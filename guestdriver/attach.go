package guestdriver

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/pci"
)

// Attach mode (docs/device-abi.md): the device puts attach-mode DMBs in host
// memory and maps them into its shared-memory region, which the guest sees
// as a BAR. The driver maps that BAR once, through sysfs, and hands out
// windows of it: the owner's view of its own DMB (a DMB whose Shared is
// true) and a sender's view of a peer's DMB (an Attachment).
//
// The device chooses where each mapping goes and reuses a range once its
// unmap is done. A goroutine still writing through an Attachment the peer
// has just unregistered would then write into whatever the device maps there
// next: another connection's DMB. So every write through an Attachment
// holds shm.mu shared and checks that the Attachment is alive, and every
// new mapping, before it is handed out, takes shm.mu exclusively and kills
// the mappings it overlaps: those the device has revoked even if its event
// saying so has not arrived yet.

// ErrDetached is returned by writes through an Attachment that is gone: it
// was detached, its DMB was unregistered, or the device was closed.
var ErrDetached = errors.New("guestdriver: attachment is gone")

// shmRegion is the device's shared-memory region as this driver mapped it.
type shmRegion struct {
	bar *pci.MMIO // the whole BAR, unmapped by Close only when nothing uses it
	mem []byte

	mu       sync.RWMutex // writers through attachments: shared; killing mappings: exclusive
	live     []*mapping
	attached map[uint64]*Attachment // by token
}

// mapping is one range of the region: an attach-mode DMB of this driver or
// an Attachment.
type mapping struct {
	off, size uint64 // size rounded up to abi.ShmPage
	dead      bool   // guarded by shmRegion.mu
}

func pageUp(n uint64) uint64 { return (n + abi.ShmPage - 1) &^ (abi.ShmPage - 1) }

// mapShm maps the device's shared-memory region 0, if the device offers
// attach mode and has one.
func (d *Driver) mapShm() error {
	if d.cfg.Modes&abi.ModeAttach == 0 || d.cfg.ShmSize == 0 {
		return errors.New("the device does not offer attach mode")
	}
	for _, r := range d.vio.SharedMemRegions() {
		if r.ID != 0 {
			continue
		}
		if r.Length < d.cfg.ShmSize {
			return fmt.Errorf("shared-memory region of %#x bytes, config says %#x", r.Length, d.cfg.ShmSize)
		}
		if r.BAR > 5 {
			return fmt.Errorf("shared-memory region in BAR %d", r.BAR)
		}
		// A mapping of its own, not the transport's: Close keeps it while
		// DMBs or attachments still point into it.
		bar, err := d.vio.Dev.MapBAR(int(r.BAR))
		if err != nil {
			return err
		}
		w, err := bar.Window(r.Offset, d.cfg.ShmSize)
		if err != nil {
			bar.Unmap()
			return err
		}
		d.shm = &shmRegion{bar: bar, mem: w.Bytes(), attached: map[uint64]*Attachment{}}
		return nil
	}
	return errors.New("the device has no shared-memory region 0")
}

// claim records a new mapping at [off, off+size) of the region, which the
// device has just made, after killing the live mappings it overlaps. It
// returns the mapping's memory, len bytes. A range outside the region
// breaks the protocol.
func (s *shmRegion) claim(m *mapping, length uint64, logf func(string, ...any)) ([]byte, error) {
	if m.off%abi.ShmPage != 0 || length == 0 || m.off > uint64(len(s.mem)) || m.size > uint64(len(s.mem))-m.off {
		return nil, fmt.Errorf("%w: mapping of %#x bytes at %#x outside the %#x-byte shared-memory region", ErrBroken, length, m.off, len(s.mem))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := s.live[:0]
	for _, o := range s.live {
		if o.off < m.off+m.size && m.off < o.off+o.size {
			// The device reused it: it revoked this mapping and its
			// event is still on the way.
			o.dead = true
			logf("guestdriver: the device mapped %#x+%#x over a mapping it had revoked", m.off, m.size)
			continue
		}
		kept = append(kept, o)
	}
	s.live = append(kept, m)
	return s.mem[m.off : m.off+length : m.off+length], nil
}

// dropLocked kills m and forgets it. Call with s.mu held.
func (s *shmRegion) dropLocked(m *mapping) {
	m.dead = true
	for i, o := range s.live {
		if o == m {
			s.live = append(s.live[:i], s.live[i+1:]...)
			return
		}
	}
}

// revoke kills the attachment of token, if any: its DMB is gone.
func (s *shmRegion) revoke(token uint64) {
	s.mu.Lock()
	if a := s.attached[token]; a != nil {
		s.dropLocked(&a.m)
		delete(s.attached, token)
	}
	s.mu.Unlock()
}

// closeAll kills every mapping: the device is being reset.
func (s *shmRegion) closeAll() {
	s.mu.Lock()
	for _, m := range s.live {
		m.dead = true
	}
	s.live = nil
	clear(s.attached)
	s.mu.Unlock()
}

// Attachment is a peer's attach-mode DMB mapped into this device's region:
// the sender writes its data and CDC straight into the receiver's memory.
// The owner only reads it (one writer per word).
type Attachment struct {
	d     *Driver
	token uint64
	m     mapping
	mem   []byte
}

// Token is the attached DMB's token.
func (a *Attachment) Token() uint64 { return a.token }

// Len is the attached DMB's length.
func (a *Attachment) Len() int { return len(a.mem) }

// WriteAt copies p into the DMB at off. It fails with ErrDetached once the
// attachment is gone; a write that has begun completes before the range
// can be given to another mapping.
func (a *Attachment) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(a.mem)) || int64(len(p)) > int64(len(a.mem))-off {
		return 0, fmt.Errorf("guestdriver: write of %d bytes at %d into a %d-byte attached DMB: %w", len(p), off, len(a.mem), abi.StatusRange)
	}
	s := a.d.shm
	s.mu.RLock()
	defer s.mu.RUnlock()
	if a.m.dead {
		return 0, ErrDetached
	}
	n := copy(a.mem[off:], p)
	a.d.attachWritten.Add(uint64(n))
	return n, nil
}

// StoreUint64 stores v at off, a multiple of 8, as one atomic 8-byte write
// (a CDC cursor). Stores are ordered after the WriteAt calls before them.
func (a *Attachment) StoreUint64(off int64, v uint64) error {
	if off < 0 || off%8 != 0 || off > int64(len(a.mem))-8 {
		return fmt.Errorf("guestdriver: 8-byte store at %d into a %d-byte attached DMB: %w", off, len(a.mem), abi.StatusRange)
	}
	s := a.d.shm
	s.mu.RLock()
	defer s.mu.RUnlock()
	if a.m.dead {
		return ErrDetached
	}
	atomic.StoreUint64((*uint64)(unsafe.Pointer(&a.mem[off])), v)
	return nil
}

// Detach removes the mapping. Detaching an attachment that is already gone
// (its DMB was unregistered) is not an error.
func (a *Attachment) Detach() error {
	s := a.d.shm
	s.mu.Lock()
	gone := a.m.dead
	if s.attached[a.token] == a {
		delete(s.attached, a.token)
	}
	s.dropLocked(&a.m)
	s.mu.Unlock()
	if gone {
		return nil
	}
	_, err := a.d.do(&abi.Request{Op: abi.OpDetachDMB, Token: a.token}, nil)
	if errors.Is(err, abi.StatusNoEntry) {
		err = nil // the device dropped it first (DMB unregistered, event on the way)
	}
	return err
}

// AttachOffered reports whether this driver uses attach mode: the device
// offers it, its region is mapped, and Options.Modes allows it.
func (d *Driver) AttachOffered() bool { return d.shm != nil }

// Attach maps the peer DMB token, whose rgid is this device, into this
// device's region. StatusUnsupported means the DMB is a copy-mode DMB (or
// this driver does not use attach mode): MOVE into it instead.
func (d *Driver) Attach(token uint64) (*Attachment, error) {
	if err := d.usable(); err != nil {
		return nil, err
	}
	if d.shm == nil {
		return nil, fmt.Errorf("guestdriver: attach mode not in use: %w", abi.StatusUnsupported)
	}
	resp, err := d.do(&abi.Request{Op: abi.OpAttachDMB, Token: token}, nil)
	if err != nil {
		return nil, err
	}
	a := &Attachment{d: d, token: token, m: mapping{off: resp.Value, size: pageUp(uint64(resp.Index))}}
	if resp.Index == 0 || resp.Index > abi.MaxDMBSize {
		return nil, fmt.Errorf("%w: ATTACH_DMB answered length %d", ErrBroken, resp.Index)
	}
	if a.mem, err = d.shm.claim(&a.m, uint64(resp.Index), d.opts.Logf); err != nil {
		return nil, err
	}
	d.shm.mu.Lock()
	if old := d.shm.attached[token]; old != nil {
		d.shm.dropLocked(&old.m) // the device dropped it, or it would have said BUSY
	}
	d.shm.attached[token] = a
	d.shm.mu.Unlock()
	return a, nil
}

// AttachStats are the driver's attach-mode counters.
type AttachStats struct {
	Attachments  int    // peer DMBs attached now
	SharedDMBs   int    // own attach-mode DMBs now
	WrittenBytes uint64 // bytes written through attachments (WriteAt)
}

// AttachStats returns the driver's attach-mode counters.
func (d *Driver) AttachStats() AttachStats {
	st := AttachStats{WrittenBytes: d.attachWritten.Load()}
	if d.shm != nil {
		d.shm.mu.RLock()
		st.Attachments = len(d.shm.attached)
		st.SharedDMBs = len(d.shm.live) - st.Attachments
		d.shm.mu.RUnlock()
	}
	return st
}

// registerShared is RegisterDMB in attach mode: the device creates the
// DMB in host memory and maps it into the region; m's index is claimed.
func (d *Driver) registerShared(m *DMB) (abi.Response, error) {
	resp, err := d.do(&abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Index: m.index, Len: uint64(m.size), GID: m.rgid}, nil)
	if err != nil {
		return resp, err
	}
	if resp.Value == 0 {
		return resp, fmt.Errorf("%w: REGISTER_DMB returned token 0", ErrBroken)
	}
	m.shared = &mapping{off: uint64(resp.Index) * abi.ShmPage, size: pageUp(uint64(m.size))}
	if m.buf, err = d.shm.claim(m.shared, uint64(m.size), d.opts.Logf); err != nil {
		return resp, err
	}
	return resp, nil
}

// unregisterShared forgets the mappings of an attach-mode DMB m that the
// device is about to remove: the owner's, and this driver's own attachment
// of it (both ends of a connection in this guest).
func (d *Driver) unregisterShared(m *DMB) {
	s := d.shm
	s.mu.Lock()
	s.dropLocked(m.shared)
	if a := s.attached[m.Token()]; a != nil {
		s.dropLocked(&a.m)
		delete(s.attached, m.Token())
	}
	s.mu.Unlock()
}

// releaseShared detaches every attachment and unregisters every
// attach-mode DMB still held, so that the device has unmapped them all
// (DETACH and UNREGISTER answer after their unmaps) before Close resets
// it: QEMU 11.1.3 crashed on a SHMEM_UNMAP that met the reset.
func (d *Driver) releaseShared() {
	d.shm.mu.RLock()
	atts := make([]*Attachment, 0, len(d.shm.attached))
	for _, a := range d.shm.attached {
		atts = append(atts, a)
	}
	d.shm.mu.RUnlock()
	for _, a := range atts {
		if err := a.Detach(); err != nil {
			d.opts.Logf("guestdriver: closing: detach %#x: %v", a.token, err)
		}
	}
	for i := range d.dmbs {
		if m := d.dmbs[i].Load(); m != nil && m.shared != nil && !m.dead.Load() {
			if err := d.UnregisterDMB(m); err != nil {
				d.opts.Logf("guestdriver: closing: unregister %#x: %v", m.Token(), err)
			}
		}
	}
}
