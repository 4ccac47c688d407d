package smcd

import (
	"crypto/rand"
	"encoding/binary"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/ism-backend/ism-backend/abi"
)

// LoopbackCHID is the CHID of Linux's loopback-ism, which this device mimics.
const LoopbackCHID uint16 = 0xFFFF

// loopbackMaxDMBs is Linux loopback-ism's limit (SMC_LO_MAX_DMBS).
const loopbackMaxDMBs = 5000

// Fabric connects loopback devices: a device can MOVE into DMBs registered by
// any device on the same fabric, so two "hosts" with different GIDs can be
// simulated in one process. Devices on different fabrics cannot reach each
// other (QueryRGID fails), even with the same CHID.
type Fabric struct {
	chid uint16

	mu      sync.RWMutex
	devices map[uint64]*Loopback
	dmbs    map[uint64]*loopDMB // by token
	revoked map[uint64]bool     // tokens Revoke killed
}

// NewFabric returns an empty fabric whose devices report chid.
func NewFabric(chid uint16) *Fabric {
	return &Fabric{chid: chid, devices: map[uint64]*Loopback{}, dmbs: map[uint64]*loopDMB{}, revoked: map[uint64]bool{}}
}

// NewDevice adds a device with a random non-zero GID to the fabric.
func (f *Fabric) NewDevice() *Loopback {
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		gid := random64()
		if gid == 0 || f.devices[gid] != nil {
			continue
		}
		d := &Loopback{fabric: f, gid: gid, MaxDMBs: loopbackMaxDMBs, own: map[uint64]*loopDMB{}}
		f.devices[gid] = d
		return d
	}
}

// NewLoopback returns a device on a fabric of its own with CHID 0xFFFF, like
// Linux's loopback-ism: both ends of a connection use the same device.
func NewLoopback() *Loopback { return NewFabric(LoopbackCHID).NewDevice() }

// Loopback is an in-process ISM device: DMBs are Go memory, Move copies, and
// rgid and bounds are enforced as docs/device-abi.md specifies for the real
// device.
type Loopback struct {
	fabric *Fabric
	gid    uint64

	// MaxDMBs limits the DMBs this device may hold (NOSPACE beyond it). Set
	// it before use.
	MaxDMBs int
	// MaxMove, if positive, limits the data length of one MOVE (RANGE
	// beyond it), like the config space's max_move_len.
	MaxMove int
	// AttachMode makes the device's DMBs attachable and lets it attach
	// peers' (Attacher), like Linux loopback-ism's nocopy. Set it before
	// use.
	AttachMode bool

	// AttachWritten counts the bytes written through attachments.
	AttachWritten atomic.Uint64

	// DropSignals, if positive, loses every DropSignals-th signal this
	// device sends (the MOVE's data lands, the owner is not told), as the
	// backend's drop-signals fault does. Set it before use.
	DropSignals uint64
	signals     atomic.Uint64

	mu     sync.Mutex
	own    map[uint64]*loopDMB
	closed bool

	peers PeerWatchers
	dmbW  PeerWatchers // by token (DMBWatcher)
}

type loopDMB struct {
	owner *Loopback
	token uint64
	rgid  uint64
	mem   []byte
	sig   chan struct{}
	mask  atomic.Uint32 // DMBE bits, as the SBA mask word

	mu       sync.RWMutex // Move and attachment writes hold it shared; unregister exclusively
	dead     bool
	attached map[*Loopback]bool // devices that attached it
}

// Shared implements SharedDMB.
func (m *loopDMB) Shared() bool { return m.owner.AttachMode }

// loopGuard is the pattern around every loopback DMB; tests check that
// nothing wrote outside a DMB (guardsIntact).
const loopGuard = 64

// guardsIntact reports whether the bytes around the DMB are as allocated.
func (m *loopDMB) guardsIntact() bool {
	full := unsafe.Slice((*byte)(unsafe.Add(unsafe.Pointer(unsafe.SliceData(m.mem)), -loopGuard)), len(m.mem)+2*loopGuard)
	for _, g := range [][]byte{full[:loopGuard], full[loopGuard+len(m.mem):]} {
		for _, b := range g {
			if b != 0xA5 {
				return false
			}
		}
	}
	return true
}

// guardedBytes is alignedBytes(n) with loopGuard bytes of 0xA5 on each side.
func guardedBytes(n int) []byte {
	full := alignedBytes(n + 2*loopGuard)
	for i := range full {
		full[i] = 0xA5
	}
	mem := full[loopGuard : loopGuard+n : loopGuard+n]
	clear(mem)
	return mem
}

func (m *loopDMB) Token() uint64              { return m.token }
func (m *loopDMB) Bytes() []byte              { return m.mem }
func (m *loopDMB) Signalled() <-chan struct{} { return m.sig }

// DMBEMask returns and clears the DMBE bits signalled so far, as a driver
// claims them from the SBA.
func (m *loopDMB) DMBEMask() uint32 { return m.mask.Swap(0) }

type loopBuffer struct{ b []byte }

func (b *loopBuffer) Bytes() []byte { return b.b }
func (b *loopBuffer) Free()         {}

func (d *Loopback) GID() uint64  { return d.gid }
func (d *Loopback) CHID() uint16 { return d.fabric.chid }

// alignedBytes returns n zeroed bytes at an 8-byte-aligned address, so the
// CDC cursors in a DMB can be read and written as atomic 8-byte words.
func alignedBytes(n int) []byte {
	w := make([]uint64, (n+7)/8)
	return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(w))), n)[:n:n]
}

func (d *Loopback) RegisterDMB(size int, rgid uint64) (DMB, error) {
	if size <= 0 || size > abi.MaxDMBSize {
		return nil, abi.StatusRange
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, abi.StatusNotReady
	}
	if len(d.own) >= d.MaxDMBs {
		return nil, abi.StatusNoSpace
	}
	m := &loopDMB{owner: d, rgid: rgid, mem: guardedBytes(size), sig: make(chan struct{}, 1), attached: map[*Loopback]bool{}}
	f := d.fabric
	f.mu.Lock()
	for m.token == 0 || f.dmbs[m.token] != nil {
		m.token = random64()
	}
	f.dmbs[m.token] = m
	f.mu.Unlock()
	d.own[m.token] = m
	return m, nil
}

func (d *Loopback) UnregisterDMB(dm DMB) error {
	m, ok := dm.(*loopDMB)
	if !ok || m.owner != d {
		return abi.StatusPermission
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.own[m.token] != m {
		return abi.StatusNoEntry
	}
	d.unregisterLocked(m)
	return nil
}

func (d *Loopback) unregisterLocked(m *loopDMB) {
	delete(d.own, m.token)
	d.fabric.mu.Lock()
	delete(d.fabric.dmbs, m.token)
	d.fabric.mu.Unlock()
	m.mu.Lock()
	m.dead = true
	m.mu.Unlock()
}

// Close removes the device from its fabric and kills its DMBs, as when a VM
// resets its device or dies: peers' MOVEs to them fail with NOENTRY.
func (d *Loopback) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	for _, m := range d.own {
		d.unregisterLocked(m)
	}
	d.fabric.mu.Lock()
	delete(d.fabric.devices, d.gid)
	others := make([]*Loopback, 0, len(d.fabric.devices))
	for _, o := range d.fabric.devices {
		others = append(others, o)
	}
	d.fabric.mu.Unlock()
	// As the backend's GID event: every device left hears that d is gone.
	for _, o := range others {
		o.peers.Gone(d.gid)
	}
	return nil
}

// WatchPeer implements PeerWatcher.
func (d *Loopback) WatchPeer(gid uint64, gone func()) (cancel func()) {
	return d.peers.Watch(gid, gone)
}

// WatchDMB implements DMBWatcher.
func (d *Loopback) WatchDMB(token uint64, gone func()) (cancel func()) {
	return d.dmbW.Watch(token, gone)
}

// Revoked implements RevokeChecker.
func (d *Loopback) Revoked(token uint64) bool {
	d.fabric.mu.RLock()
	defer d.fabric.mu.RUnlock()
	return d.fabric.revoked[token]
}

// Revoke kills the DMB token as the backend's revoke-dmb fault does: its
// owner and its rgid hear that it is gone (DMBWatcher), MOVEs to it fail
// with NOENTRY, and its owner's UnregisterDMB too.
func (f *Fabric) Revoke(token uint64) error {
	f.mu.RLock()
	m := f.dmbs[token]
	f.mu.RUnlock()
	if m == nil {
		return abi.StatusNoEntry
	}
	o := m.owner
	o.mu.Lock()
	o.unregisterLocked(m)
	o.mu.Unlock()
	f.mu.Lock()
	f.revoked[token] = true
	f.mu.Unlock()
	o.dmbW.Gone(token)
	f.mu.RLock()
	r := f.devices[m.rgid]
	f.mu.RUnlock()
	if r != nil && r != o {
		r.dmbW.Gone(token)
	}
	return nil
}

// MaxMoveLen implements MoveLimiter.
func (d *Loopback) MaxMoveLen() int { return d.MaxMove }

func (d *Loopback) AllocBuffer(size int) (Buffer, error) {
	if size <= 0 {
		return nil, abi.StatusRange
	}
	return &loopBuffer{b: alignedBytes(size)}, nil
}

func (d *Loopback) QueryRGID(rgid uint64) error {
	d.fabric.mu.RLock()
	defer d.fabric.mu.RUnlock()
	if d.fabric.devices[rgid] == nil {
		return abi.StatusNoEntry
	}
	return nil
}

// atomicMoveMax bounds the MOVEs copied as 8-byte atomic stores: small,
// aligned control writes such as the 32-byte CDC header, whose cursors the
// receiver reads as atomic 8-byte values (as the ISM hardware stores them).
// Larger MOVEs are data and copied plainly.
const atomicMoveMax = 64

func (d *Loopback) Move(token uint64, dmbe uint32, signal bool, offset uint32, src Buffer, srcOff, n int) error {
	if dmbe >= abi.MaxDMBEs {
		return abi.StatusRange
	}
	if d.MaxMove > 0 && n > d.MaxMove {
		return abi.StatusRange
	}
	if n != 0 && (src == nil || srcOff < 0 || n < 0 || srcOff > len(src.Bytes()) || n > len(src.Bytes())-srcOff) {
		return abi.StatusInvalid
	}
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return abi.StatusNotReady
	}
	d.fabric.mu.RLock()
	m := d.fabric.dmbs[token]
	d.fabric.mu.RUnlock()
	if m == nil {
		return abi.StatusNoEntry
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.dead {
		return abi.StatusNoEntry
	}
	if m.rgid != d.gid {
		return abi.StatusPermission
	}
	if uint64(offset)+uint64(n) > uint64(len(m.mem)) {
		return abi.StatusRange
	}
	var from []byte
	if n > 0 {
		from = src.Bytes()[srcOff : srcOff+n]
	}
	to := m.mem[offset : int(offset)+n]
	if n <= atomicMoveMax && offset%8 == 0 && n%8 == 0 {
		for i := 0; i < n; i += 8 {
			p := (*uint64)(unsafe.Pointer(&to[i]))
			atomic.StoreUint64(p, binary.NativeEndian.Uint64(from[i:]))
		}
	} else {
		copy(to, from)
	}
	if signal && d.DropSignals > 0 && d.signals.Add(1)%d.DropSignals == 0 {
		signal = false // lost
	}
	if signal {
		m.mask.Or(1 << dmbe)
		select {
		case m.sig <- struct{}{}:
		default: // already pending: signals coalesce
		}
	}
	return nil
}

// AttachDMB implements Attacher: only the DMB's rgid may attach it, once,
// and only if both devices have AttachMode.
func (d *Loopback) AttachDMB(token uint64) (PeerDMB, error) {
	if !d.AttachMode {
		return nil, abi.StatusUnsupported
	}
	d.fabric.mu.RLock()
	m := d.fabric.dmbs[token]
	d.fabric.mu.RUnlock()
	switch {
	case m == nil:
		return nil, abi.StatusNoEntry
	case !m.owner.AttachMode:
		return nil, abi.StatusUnsupported
	case m.rgid != d.gid:
		return nil, abi.StatusPermission
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.dead:
		return nil, abi.StatusNoEntry
	case m.attached[d]:
		return nil, abi.StatusBusy
	}
	m.attached[d] = true
	return &loopView{d: d, m: m}, nil
}

// loopView is a loopback DMB attached by a device.
type loopView struct {
	d        *Loopback
	m        *loopDMB
	detached bool // guarded by m.mu
}

func (v *loopView) Len() int { return len(v.m.mem) }

func (v *loopView) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(v.m.mem)) || int64(len(p)) > int64(len(v.m.mem))-off {
		return 0, abi.StatusRange
	}
	v.m.mu.RLock()
	defer v.m.mu.RUnlock()
	if v.m.dead || v.detached {
		return 0, abi.StatusNoEntry
	}
	n := copy(v.m.mem[off:], p)
	v.d.AttachWritten.Add(uint64(n))
	return n, nil
}

func (v *loopView) StoreUint64(off int64, x uint64) error {
	if off < 0 || off%8 != 0 || off > int64(len(v.m.mem))-8 {
		return abi.StatusRange
	}
	v.m.mu.RLock()
	defer v.m.mu.RUnlock()
	if v.m.dead || v.detached {
		return abi.StatusNoEntry
	}
	atomic.StoreUint64((*uint64)(unsafe.Pointer(&v.m.mem[off])), x)
	return nil
}

func (v *loopView) Detach() error {
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	if !v.detached {
		v.detached = true
		delete(v.m.attached, v.d)
	}
	return nil
}

func random64() uint64 {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return binary.LittleEndian.Uint64(b[:])
}
