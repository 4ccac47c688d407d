package guestdriver

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync/atomic"
	"time"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/pci"
	"github.com/ism-backend/ism-backend/virtq"
)

// DMB is a registered DMB: peers with its rgid MOVE into it by token. In
// copy mode it is in this guest's RAM; in attach mode (Shared) it is host
// memory in the device's shared-memory region, which the peer may also
// attach and write directly.
type DMB struct {
	d       *Driver
	mem     *pci.DMA // copy mode; nil in attach mode
	shared  *mapping // attach mode; nil in copy mode
	buf     []byte   // the DMB's memory, size bytes
	size    int
	index   uint32
	rgid    uint64
	token   atomic.Uint64
	sig     chan struct{}
	pending atomic.Uint32 // DMBE bits seen signalled, not yet taken
	dead    atomic.Bool
	revoked atomic.Bool // the device unregistered it (EventDMB to its owner)
	seen    dmbSignals  // the SBA counters as the poller last saw them; the poller's alone once published
}

// Token is the DMB's token (what a peer MOVEs to).
func (m *DMB) Token() uint64 { return m.token.Load() }

// Index is the DMB's index in the SBA.
func (m *DMB) Index() uint32 { return m.index }

// RGID is the only GID allowed to MOVE into the DMB.
func (m *DMB) RGID() uint64 { return m.rgid }

// Bytes is the DMB's memory. The device writes it behind Go's back: read it
// after a signal, and mind that a peer may be writing other parts.
func (m *DMB) Bytes() []byte { return m.buf }

// Shared reports whether the DMB is in attach mode: in host memory that
// the peer may attach and write directly.
func (m *DMB) Shared() bool { return m.shared != nil }

// Signalled receives (coalesced) when the DMB's SBA counter was seen to move.
func (m *DMB) Signalled() <-chan struct{} { return m.sig }

// TakeDMBEs returns the DMBE bits signalled since the last call and clears
// them. A signal seen on Signalled has its bits here.
func (m *DMB) TakeDMBEs() uint32 { return m.pending.Swap(0) }

// RegisterDMB picks a free DMB index and registers a DMB of size bytes with
// rgid as the only GID that may write it. As Linux does for a device that
// supports it, the DMB is in attach mode when this driver uses attach mode
// (AttachOffered), so that the peer can write it without a copy; otherwise,
// or when the shared-memory region is full, it is DMA memory of this guest.
func (d *Driver) RegisterDMB(size int, rgid uint64) (*DMB, error) {
	if d.shm == nil {
		return d.RegisterDMBIn(abi.ModeCopy, size, rgid)
	}
	m, err := d.RegisterDMBIn(abi.ModeAttach, size, rgid)
	if errors.Is(err, abi.StatusNoSpace) {
		return d.RegisterDMBIn(abi.ModeCopy, size, rgid)
	}
	return m, err
}

// RegisterDMBIn is RegisterDMB in the given mode: abi.ModeCopy, or
// abi.ModeAttach if AttachOffered.
func (d *Driver) RegisterDMBIn(mode uint16, size int, rgid uint64) (*DMB, error) {
	if err := d.usable(); err != nil {
		return nil, err
	}
	switch {
	case mode == abi.ModeAttach && d.shm == nil:
		return nil, fmt.Errorf("guestdriver: attach mode not in use: %w", abi.StatusUnsupported)
	case mode != abi.ModeAttach && mode != abi.ModeCopy:
		return nil, fmt.Errorf("guestdriver: DMB mode %#x: %w", mode, abi.StatusInvalid)
	}
	if size <= 0 || uint64(size) > uint64(d.cfg.MaxDMBSize) || size > pci.HugePageSize {
		return nil, fmt.Errorf("guestdriver: DMB of %d bytes (max %d): %w", size, d.cfg.MaxDMBSize, abi.StatusRange)
	}
	m := &DMB{d: d, size: size, rgid: rgid, sig: make(chan struct{}, 1)}
	if mode == abi.ModeCopy {
		mem, err := d.alloc.Alloc(size, 4096)
		if err != nil {
			return nil, err
		}
		m.mem, m.buf = mem, mem.Bytes()[:size]
	}

	// Claim an index and publish the DMB before the device knows it, so a
	// signal that arrives right after REGISTER completes finds it.
	d.dmbMu.Lock()
	found := false
	for i := uint32(0); i < d.maxDMBs; i++ {
		idx := (d.nextIndex + i) % d.maxDMBs
		if d.dmbs[idx].Load() == nil {
			m.index = idx
			d.nextIndex = idx + 1
			found = true
			break
		}
	}
	if found {
		// The counters keep counting across owners of an index: start
		// from where they are (no MOVE reaches an unregistered index).
		m.seen = d.signals.baseline(m.index)
		d.dmbs[m.index].Store(m)
	}
	d.dmbMu.Unlock()
	if !found {
		if m.mem != nil {
			d.alloc.Free(m.mem)
		}
		return nil, fmt.Errorf("guestdriver: all %d DMB indices in use: %w", d.maxDMBs, abi.StatusNoSpace)
	}
	var resp abi.Response
	var err error
	if m.mem == nil {
		resp, err = d.registerShared(m)
	} else {
		resp, err = d.do(&abi.Request{Op: abi.OpRegisterDMB, Index: m.index, Len: uint64(size), GID: rgid, Addr: m.mem.GPA()}, nil)
		if err == nil {
			switch {
			case resp.Value == 0:
				err = fmt.Errorf("%w: REGISTER_DMB returned token 0", ErrBroken)
			case resp.Index != m.index:
				err = fmt.Errorf("%w: REGISTER_DMB for index %d answered index %d", ErrBroken, m.index, resp.Index)
			}
		}
	}
	if err != nil {
		d.dmbs[m.index].CompareAndSwap(m, nil)
		var st abi.Status
		if errors.As(err, &st) && m.mem != nil {
			// The device refused: it does not have the memory.
			d.alloc.Free(m.mem)
		}
		// Otherwise it may have registered it: leak rather than reuse.
		return nil, err
	}
	m.token.Store(resp.Value)
	d.live.Add(1)
	return m, nil
}

// UnregisterDMB unregisters m and frees its memory. If the device does not
// confirm, the memory is kept (leaked): it may still write there.
func (d *Driver) UnregisterDMB(m *DMB) error {
	if m == nil || m.d != d {
		return fmt.Errorf("guestdriver: not a DMB of this driver: %w", abi.StatusInvalid)
	}
	if m.dead.Load() {
		return fmt.Errorf("guestdriver: DMB already unregistered: %w", abi.StatusNoEntry)
	}
	if m.shared != nil {
		// Stop writes through this guest's own attachment of it before
		// the device can give the range to another mapping.
		d.unregisterShared(m)
	}
	if _, err := d.do(&abi.Request{Op: abi.OpUnregisterDMB, Token: m.Token()}, nil); err != nil {
		// A DMB the device revoked is unregistered already, and the
		// device wrote it last before it said so: free it as usual.
		if !m.revoked.Load() || !errors.Is(err, abi.StatusNoEntry) {
			return err
		}
	}
	if !m.dead.CompareAndSwap(false, true) {
		return fmt.Errorf("guestdriver: DMB unregistered twice: %w", abi.StatusNoEntry)
	}
	d.dmbs[m.index].CompareAndSwap(m, nil)
	if m.mem != nil {
		d.alloc.Free(m.mem)
	}
	d.live.Add(-1)
	return nil
}

// Buffer is DMA memory a MOVE can send from.
type Buffer struct {
	d     *Driver
	mem   *pci.DMA
	size  int
	freed atomic.Bool
}

// Bytes is the buffer's memory.
func (b *Buffer) Bytes() []byte { return b.mem.Bytes()[:b.size] }

// Free returns the buffer. Do not free a buffer a MOVE is sending from.
func (b *Buffer) Free() {
	if b.freed.CompareAndSwap(false, true) {
		b.d.alloc.Free(b.mem)
		b.d.live.Add(-1)
	}
}

// AllocBuffer returns size bytes of DMA memory (at most 2 MiB: one huge page).
func (d *Driver) AllocBuffer(size int) (*Buffer, error) {
	if err := d.usable(); err != nil {
		return nil, err
	}
	if size <= 0 || size > pci.HugePageSize {
		return nil, fmt.Errorf("guestdriver: buffer of %d bytes (max %d): %w", size, pci.HugePageSize, abi.StatusRange)
	}
	mem, err := d.alloc.Alloc(size, 64)
	if err != nil {
		return nil, err
	}
	d.live.Add(1)
	return &Buffer{d: d, mem: mem, size: size}, nil
}

// Move copies src[srcOff:srcOff+n] into the peer DMB token at offset and, if
// signal, sets DMBE bit dmbe there. n may be 0 (a pure signal) and at most
// the device's max_move_len. Errors are abi.Status values (possibly wrapped).
func (d *Driver) Move(token uint64, dmbe uint32, signal bool, offset uint32, src *Buffer, srcOff, n int) error {
	if dmbe >= abi.MaxDMBEs {
		return fmt.Errorf("guestdriver: DMBE index %d: %w", dmbe, abi.StatusRange)
	}
	if n < 0 || uint64(n) > uint64(d.cfg.MaxMoveLen) {
		return fmt.Errorf("guestdriver: MOVE of %d bytes (max %d): %w", n, d.cfg.MaxMoveLen, abi.StatusRange)
	}
	var data []virtq.Seg
	if n > 0 {
		if src == nil || src.d != d || src.freed.Load() {
			return fmt.Errorf("guestdriver: MOVE from a buffer that is not this driver's: %w", abi.StatusInvalid)
		}
		if srcOff < 0 || srcOff > src.size || n > src.size-srcOff {
			return fmt.Errorf("guestdriver: MOVE of %d bytes at %d from a %d-byte buffer: %w", n, srcOff, src.size, abi.StatusRange)
		}
		data = []virtq.Seg{pci.SegOf(src.mem, srcOff, n)}
	}
	req := &abi.Request{Op: abi.OpMove, Index: dmbe, Token: token, Offset: uint64(offset), Len: uint64(n)}
	if signal {
		req.Flags |= abi.FlagSignal
	}
	_, err := d.do(req, data)
	return err
}

// Signal sends a software event (code, info) to the device with GID rgid.
func (d *Driver) Signal(rgid uint64, code uint16, info uint64) error {
	_, err := d.do(&abi.Request{Op: abi.OpSignal, GID: rgid, Index: uint32(code), Offset: info}, nil)
	return err
}

// QueryRGID checks that rgid is reachable through this device.
func (d *Driver) QueryRGID(rgid uint64) error {
	_, err := d.do(&abi.Request{Op: abi.OpQueryRGID, GID: rgid}, nil)
	return err
}

// scanSignals wakes the DMBs whose SBA counters moved and reports whether
// any signal came in since the last scan.
func (d *Driver) scanSignals() bool {
	return d.signals.scan(func(i uint32) signalTarget {
		if m := d.dmbs[i].Load(); m != nil {
			return m
		}
		return nil
	})
}

func (m *DMB) copies() *dmbSignals { return &m.seen }

func (m *DMB) signalled(dmbes uint32) {
	m.pending.Or(dmbes)
	select {
	case m.sig <- struct{}{}:
	default:
	}
}

// maxRevoked bounds the revoked tokens Revoked remembers (revokes are an
// operator's rare doing; the oldest are forgotten).
const maxRevoked = 256

// Revoked reports whether the device has revoked the DMB token (ours or a
// peer's: EventDMB with code revoked), having reaped the event queue first,
// so that an event already in the ring counts even if the poller has not
// looked yet. The SMC-D stack asks when a peer's TCP connection ends
// without its CDC close: the peer may have closed because of the revoke.
func (d *Driver) Revoked(token uint64) bool {
	d.evMu.Lock()
	defer d.evMu.Unlock()
	if !d.closed.Load() && d.broken.Load() == nil {
		d.reapEvents() // an error is the poller's to report
	}
	return slices.Contains(d.revoked, token)
}

// revokedOwn marks this driver's DMB token as revoked by the device (an
// EventDMB naming our own GID: docs/device-abi.md, "Events"). Rare: a scan
// of the index table is fine.
func (d *Driver) revokedOwn(token uint64) {
	for i := range d.dmbs {
		if m := d.dmbs[i].Load(); m != nil && m.Token() == token {
			m.revoked.Store(true)
			return
		}
	}
}

// postEvent makes event buffer i available to the device.
func (d *Driver) postEvent(i int) error {
	head, err := d.evQ.Add(nil, []virtq.Seg{pci.SegOf(d.evBufs, i*abi.EventSize, abi.EventSize)})
	if err != nil {
		return err
	}
	d.evByHd[head] = i
	return nil
}

// reapEvents delivers used event buffers and posts them again.
func (d *Driver) reapEvents() (bool, error) {
	found := false
	for {
		head, n, ok, err := d.evQ.Poll()
		if err != nil {
			return found, err
		}
		if !ok {
			break
		}
		found = true
		i := d.evByHd[head]
		if n < abi.EventSize {
			d.opts.Logf("guestdriver: event of %d bytes dropped", n)
		} else {
			ev, _ := abi.DecodeEvent(d.evBufs.Bytes()[i*abi.EventSize : (i+1)*abi.EventSize])
			if ev.Type == abi.EventDMB && d.shm != nil {
				d.shm.revoke(ev.Token) // before anyone hears of it
			}
			if ev.Type == abi.EventDMB && ev.Code == abi.DMBRevoked {
				if ev.GID == d.GID() {
					d.revokedOwn(ev.Token)
				}
				d.revoked = append(d.revoked, ev.Token)
				if len(d.revoked) > maxRevoked {
					d.revoked = d.revoked[len(d.revoked)-maxRevoked/2:]
				}
			}
			if !d.evq.push(ev) {
				d.evDrops.Add(1)
			}
		}
		if err := d.postEvent(i); err != nil {
			return found, err
		}
	}
	if found {
		d.evQ.Kick()
	}
	return found, nil
}

// poll is the one goroutine that watches the SBA and the event queue. After
// activity it spins a while (a reply often follows soon), then either
// sleeps on the interrupt or backs off to 1 ms sleeps.
func (d *Driver) poll() {
	defer close(d.polled)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	idle := 0
	intr := d.intx != nil
	for {
		select {
		case <-d.stop:
			return
		default:
		}
		if d.look() {
			idle = 0
			continue
		}
		idle++
		if idle < 200 {
			runtime.Gosched()
			continue
		}
		if intr {
			if err := d.sleepOnInterrupt(); err != nil {
				select {
				case <-d.stop:
					return
				default:
				}
				// Not Close: the interrupt path failed. Poll from now
				// on rather than stop noticing signals.
				d.opts.Logf("guestdriver: waiting for an interrupt: %v; polling from now on", err)
				intr = false
			}
			idle = 0
			continue
		}
		pause := min(time.Microsecond<<min((idle-200)/8, 10), time.Millisecond)
		timer.Reset(pause)
		select {
		case <-d.stop:
			timer.Stop()
			return
		case <-d.wake:
			timer.Stop()
			idle = 0
		case <-timer.C:
		}
	}
}

// look scans the SBA and reaps the event queue once; it reports whether
// anything came in.
func (d *Driver) look() bool {
	active := d.scanSignals()
	if d.broken.Load() == nil {
		d.evMu.Lock()
		got, err := d.reapEvents()
		d.evMu.Unlock()
		if err != nil {
			d.reqMu.Lock()
			d.failLocked(fmt.Errorf("event queue: %v", err))
			d.reqMu.Unlock()
		}
		active = active || got
	}
	return active
}

// sleepOnInterrupt waits for the device's next interrupt unless something
// came in meanwhile. The order makes a lost wake-up impossible: the ISR read
// acknowledges what was signalled before it, so the look after it sees that;
// what comes after it raises INTx again, which the unmask lets through (or
// the look after the unmask sees it). The unmask is also the full fence
// between the used_event stores of the looks and the loads of the last one.
func (d *Driver) sleepOnInterrupt() error {
	d.vio.ReadISR()
	if d.look() {
		return nil
	}
	if err := d.intx.unmask(); err != nil {
		return err
	}
	if d.look() {
		return nil
	}
	return d.intx.wait()
}
