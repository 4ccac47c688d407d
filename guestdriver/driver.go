// Package guestdriver is the guest's userspace driver for the ISM virtio
// device (docs/device-abi.md) over package pci's virtio-pci transport.
//
// Requests go on queue 0 as descriptor chains (48-byte header, MOVE data,
// 16-byte response). Many may be in flight: a caller submits under a lock,
// kicks, then waits for its own completion flag; whichever waiter gets the
// lock harvests the used ring for everyone (no dedicated goroutine).
//
// One poller goroutine watches the SBA and the event queue. With
// interrupts (WaitInterrupts, the default where the guest can) it spins
// briefly after activity and then sleeps on the device's INTx through the
// kernel's uio_pci_generic: an idle driver uses no CPU. With WaitPoll it
// spins and then backs off to 1 ms sleeps, for the lowest latency.
//
// The driver writes no word the device writes (ABI v2): it compares the
// SBA's counters and the used rings' indices with its own copies.
//
// Everything read from the device is checked: used-ring indices, ids and
// lengths (in package pci), response status values, echoed indices and
// tokens, event lengths. A device that breaks the protocol makes the driver
// fail every later call with the reason, never read or write out of bounds.
package guestdriver

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/pci"
	"github.com/ism-backend/ism-backend/virtq"
)

// Options configure Open. Zero values mean the defaults.
type Options struct {
	VirtioID     int           // virtio device id; default abi.DefaultVirtioID
	Addr         string        // PCI address (0000:00:04.0) to use; default: the first device with the ISM magic
	SysfsRoot    string        // default /sys/bus/pci/devices
	QueueSize    uint16        // ring entries per queue (capped by the device); default 256
	EventBufs    int           // event buffers posted; default 64
	MaxHugePages int           // DMA memory limit in 2 MiB pages; default 8
	Timeout      time.Duration // for one request; default 30s (TCG is slow)
	NoEventIdx   bool          // do not negotiate VIRTIO_RING_F_EVENT_IDX (flags-based suppression only)
	Wait         WaitMode      // how the poller waits for signals and events; default WaitAuto
	Modes        uint16        // abi.ModeCopy, abi.ModeAttach: the modes the driver may use; 0: whatever the device offers
	DevRoot      string        // where uio nodes are; default /dev
	// BackendDeadAfter is how long the device's heartbeat (abi.Config
	// HeartbeatMS) may stand still while a request waits before the
	// backend is declared gone; default 10 heartbeat periods, at least 2 s.
	// Unused when the device has no heartbeat.
	BackendDeadAfter time.Duration
	Logf             func(format string, args ...any)
}

// WaitMode says how the driver waits for DMB signals and device events.
type WaitMode int

const (
	// WaitAuto uses interrupts if the device can be bound to
	// uio_pci_generic, and polls otherwise (logged).
	WaitAuto WaitMode = iota
	// WaitPoll spins, then sleeps up to 1 ms between looks: the lowest
	// latency, and a busy CPU while connections are idle.
	WaitPoll
	// WaitInterrupts sleeps on the device's INTx (uio_pci_generic); Open
	// fails if that is not possible.
	WaitInterrupts
)

func (w WaitMode) String() string {
	switch w {
	case WaitAuto:
		return "auto"
	case WaitPoll:
		return "poll"
	case WaitInterrupts:
		return "interrupts"
	}
	return fmt.Sprintf("WaitMode(%d)", int(w))
}

// ParseWaitMode reads "auto", "poll" or "interrupts".
func ParseWaitMode(s string) (WaitMode, error) {
	for _, w := range []WaitMode{WaitAuto, WaitPoll, WaitInterrupts} {
		if s == w.String() {
			return w, nil
		}
	}
	return 0, fmt.Errorf("guestdriver: wait mode %q: want auto, poll or interrupts", s)
}

// ErrClosed is returned by calls on a closed driver.
var ErrClosed = errors.New("guestdriver: closed")

// ErrBroken wraps the reason the device was declared broken.
var ErrBroken = errors.New("guestdriver: device broke the protocol")

// ErrBackendGone (wrapped in ErrBroken) says the device's heartbeat stood
// still while a request waited: the backend process behind the device is
// gone, and nothing more will complete.
var ErrBackendGone = errors.New("guestdriver: the device's backend is gone (heartbeat stopped)")

// slotSize is the DMA bytes per in-flight request: header, then response.
const slotSize = abi.RequestSize + abi.ResponseSize

type waiter struct {
	slot int
	done atomic.Bool
	resp abi.Response
	err  error
}

// Driver is an opened ISM device. Its methods are safe for concurrent use.
type Driver struct {
	opts  Options
	vio   *pci.Virtio
	cfg   abi.Config
	alloc *pci.Allocator
	sba   *pci.DMA
	intx  *intx      // nil: the poller polls
	shm   *shmRegion // nil: attach mode not in use

	attachWritten atomic.Uint64 // bytes written through attachments

	signals signalReader // the poller's alone, but for its SBA view (fixed at Open), which Heartbeat reads too

	reqMu     sync.Mutex
	reqQ      *pci.Queue
	slots     *pci.DMA
	freeSlots []int
	pending   []*waiter // by head descriptor

	evMu    sync.Mutex // reaping the event queue: the poller, or Revoked
	evQ     *pci.Queue
	evBufs  *pci.DMA
	evByHd  []int // head -> event buffer
	events  chan abi.Event
	evq     *eventQueue // between the poller and events (events.go)
	evDrops atomic.Uint64
	revoked []uint64 // tokens of the latest DMBs the device revoked (EventDMB code revoked), under evMu

	dmbMu     sync.Mutex
	dmbs      []atomic.Pointer[DMB] // by DMB index; the poller reads it lock-free
	nextIndex uint32
	maxDMBs   uint32
	live      atomic.Int64 // DMBs and Buffers handed out and not freed

	// The backend's liveness (checkBeatLocked), guarded by reqMu: the
	// heartbeat last seen and when it was first seen; deadAfter 0 until
	// SET_SBA has completed on a device with a heartbeat.
	beatSeen  uint32
	beatAt    time.Time
	deadAfter time.Duration

	broken atomic.Pointer[error]
	closed atomic.Bool
	wake   chan struct{}
	stop   chan struct{}
	polled chan struct{}
	pumped chan struct{} // pumpEvents has closed events
	once   sync.Once
}

// Open finds, checks and starts the ISM device.
func Open(opts Options) (*Driver, error) {
	if opts.VirtioID == 0 {
		opts.VirtioID = abi.DefaultVirtioID
	}
	if opts.QueueSize == 0 {
		opts.QueueSize = 256
	}
	if opts.EventBufs <= 0 {
		opts.EventBufs = 64
	}
	if opts.MaxHugePages <= 0 {
		opts.MaxHugePages = 8
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 30 * time.Second
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.DevRoot == "" {
		opts.DevRoot = "/dev"
	}
	if opts.VirtioID < 0 || opts.VirtioID > 0xffff-pci.VirtioDeviceBase {
		return nil, fmt.Errorf("guestdriver: virtio id %d out of range", opts.VirtioID)
	}
	devs, err := pci.Find(opts.SysfsRoot, pci.VirtioVendor, uint16(pci.VirtioDeviceBase+opts.VirtioID))
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, dev := range devs {
		if opts.Addr != "" && dev.Addr != opts.Addr {
			continue
		}
		d, err := open(dev, opts)
		if err == nil {
			return d, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", dev.Addr, err))
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("guestdriver: no device at %s", opts.Addr)
	}
	return nil, errors.Join(errs...)
}

func open(dev *pci.Function, opts Options) (*Driver, error) {
	if err := takeOver(dev, identifyByWindow, opts.Logf); err != nil {
		return nil, err
	}
	vio, err := pci.OpenVirtio(dev)
	if err != nil {
		return nil, err
	}
	d := &Driver{opts: opts, vio: vio}
	ok := false
	started := false
	defer func() {
		if ok {
			return
		}
		if started {
			_ = vio.Reset(time.Second)
		}
		if d.alloc != nil {
			_ = d.alloc.Close()
		}
		if d.intx != nil {
			_ = d.intx.close()
		}
		if d.shm != nil {
			_ = d.shm.bar.Unmap()
		}
		_ = vio.Close()
	}()

	// Identify before touching the status: a foreign device with our id
	// must be left as it was.
	raw, err := vio.ReadDeviceConfig(abi.ConfigSize)
	if err != nil {
		return nil, err
	}
	cfg, err := abi.DecodeConfig(raw)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	step := func(what string) {
		opts.Logf("guestdriver: %s: %s (+%v)", dev.Addr, what, time.Since(t0).Round(time.Microsecond))
	}
	step("config read, ISM ABI v" + fmt.Sprint(cfg.Version))
	allowed := opts.Modes
	if allowed == 0 {
		allowed = abi.ModeCopy | abi.ModeAttach
	}
	if cfg.Modes&allowed == 0 {
		return nil, fmt.Errorf("guestdriver: device offers modes %#x, the driver may use %#x", cfg.Modes, allowed)
	}
	if cfg.MaxDMBs == 0 || cfg.MaxDMBSize == 0 || cfg.MaxMoveLen == 0 {
		return nil, fmt.Errorf("guestdriver: device limits %+v make it unusable", cfg)
	}
	d.cfg = cfg
	d.maxDMBs = min(cfg.MaxDMBs, abi.MaxDMBs)
	if allowed&abi.ModeAttach != 0 && cfg.Modes&abi.ModeAttach != 0 {
		if err := d.mapShm(); err != nil {
			if cfg.Modes&allowed&abi.ModeCopy == 0 {
				return nil, fmt.Errorf("guestdriver: attach mode: %w", err)
			}
			opts.Logf("guestdriver: %s: copy mode only: %v", dev.Addr, err)
		}
	}

	// Bind for interrupts before the device is started: the kernel's
	// driver enables the device, and a failed bind leaves it untouched.
	if opts.Wait != WaitPoll {
		x, err := openINTx(dev.Path, opts.DevRoot)
		switch {
		case err == nil:
			d.intx = x
		case opts.Wait == WaitInterrupts:
			return nil, err
		default:
			opts.Logf("guestdriver: %s: polling: %v", dev.Addr, err)
		}
	}

	started = true
	wanted := uint64(1<<pci.FeatureRingEventIdx | 1<<pci.FeatureAccessPlatform)
	if opts.NoEventIdx {
		wanted &^= 1 << pci.FeatureRingEventIdx
	}
	if _, err := vio.Start(wanted, 0); err != nil {
		return nil, err
	}
	step(fmt.Sprintf("features %#x negotiated", vio.Features()))
	if n := vio.NumQueues(); n < abi.NumQueues {
		return nil, fmt.Errorf("guestdriver: device has %d queues, want %d", n, abi.NumQueues)
	}
	qsize := opts.QueueSize
	if cfg.QueueSize != 0 && cfg.QueueSize < qsize {
		qsize = cfg.QueueSize
	}
	d.alloc = pci.NewHugeAllocator(opts.MaxHugePages)
	if d.reqQ, err = vio.SetupQueue(abi.RequestQueue, qsize, d.alloc); err != nil {
		return nil, fmt.Errorf("request queue: %w", err)
	}
	if d.evQ, err = vio.SetupQueue(abi.EventQueue, qsize, d.alloc); err != nil {
		return nil, fmt.Errorf("event queue: %w", err)
	}
	n := int(d.reqQ.Size())
	if d.slots, err = d.alloc.Alloc(n*slotSize, 64); err != nil {
		return nil, err
	}
	for i := n - 1; i >= 0; i-- {
		d.freeSlots = append(d.freeSlots, i)
	}
	d.pending = make([]*waiter, n)
	if err := d.allocSBA(); err != nil {
		return nil, err
	}
	nev := min(opts.EventBufs, int(d.evQ.Size()))
	if d.evBufs, err = d.alloc.Alloc(nev*abi.EventSize, 64); err != nil {
		return nil, err
	}
	step("queues set up")
	vio.DriverOK()
	step("DRIVER_OK")
	if st := vio.Status(); st&(pci.StatusNeedsReset|pci.StatusFailed) != 0 || st&pci.StatusDriverOK == 0 {
		return nil, fmt.Errorf("guestdriver: device status %#x after DRIVER_OK", st)
	}
	if err := d.start(nev); err != nil {
		return nil, err
	}
	step("SBA set")
	ok = true
	opts.Logf("guestdriver: %s: gid %#x chid %#x, queues %d/%d, features %#x, waits by %s, %s", dev.Addr, cfg.GID, cfg.CHID, d.reqQ.Size(), d.evQ.Size(), vio.Features(), d.waitName(), d.modeName())
	return d, nil
}

// allocSBA allocates the SBA and points the signal reader at it. Fresh DMA
// memory is zero, as the ABI wants the SBA handed over.
func (d *Driver) allocSBA() error {
	var err error
	if d.sba, err = d.alloc.Alloc(abi.SBASize, abi.SBAAlign); err != nil {
		return err
	}
	if d.signals.sba, err = abi.NewSBA(d.sba.Bytes()); err != nil {
		return err
	}
	d.signals.n = d.maxDMBs
	return nil
}

// start posts nev event buffers, starts the poller and sets the SBA. The
// queues and DMA memory must be in place and the device live.
func (d *Driver) start(nev int) error {
	d.evByHd = make([]int, d.evQ.Size())
	for i := 0; i < nev; i++ {
		if err := d.postEvent(i); err != nil {
			return err
		}
	}
	// Event buffers are the only used buffers the driver wants to hear of,
	// and only when it sleeps on interrupts.
	d.evQ.SetInterrupts(d.intx != nil)
	d.evQ.Kick()
	d.dmbs = make([]atomic.Pointer[DMB], d.maxDMBs)
	d.events = make(chan abi.Event, 64)
	d.evq = newEventQueue()
	d.wake = make(chan struct{}, 1)
	d.stop = make(chan struct{})
	d.polled = make(chan struct{})
	d.pumped = make(chan struct{})
	go d.poll()
	go d.pumpEvents()
	var flags uint16
	if d.intx != nil {
		flags = abi.FlagInterrupts
	}
	if _, err := d.do(&abi.Request{Op: abi.OpSetSBA, Addr: d.sba.GPA(), Flags: flags}, nil); err != nil {
		d.stopPoller()
		return fmt.Errorf("SET_SBA: %w", err)
	}
	if d.cfg.HeartbeatMS > 0 {
		dead := d.opts.BackendDeadAfter
		if dead <= 0 {
			dead = max(10*time.Duration(d.cfg.HeartbeatMS)*time.Millisecond, 2*time.Second)
		}
		d.reqMu.Lock()
		d.deadAfter = dead
		d.reqMu.Unlock()
	}
	return nil
}

// Heartbeat is the device's heartbeat count as the SBA holds it now (0 on a
// device without one, see abi.Config.HeartbeatMS).
func (d *Driver) Heartbeat() uint32 { return d.signals.sba.Heartbeat() }

// backendGone says whether the driver declared the backend gone.
func (d *Driver) backendGone() bool {
	e := d.broken.Load()
	return e != nil && errors.Is(*e, ErrBackendGone)
}

// checkBeatLocked declares the backend gone (ErrBackendGone) when the SBA's
// heartbeat has stood still for deadAfter. It is called while a request
// waits, so an idle driver reads nothing; a beat seen to change restarts the
// clock, whenever it is looked at. It reads the SBA only, never config
// space: QEMU 11.1.3 aborts on a config read once the backend is gone. Call
// with reqMu held.
func (d *Driver) checkBeatLocked(now time.Time) {
	if d.deadAfter <= 0 {
		return
	}
	b := d.signals.sba.Heartbeat()
	if b != d.beatSeen || d.beatAt.IsZero() {
		d.beatSeen, d.beatAt = b, now
		return
	}
	if still := now.Sub(d.beatAt); still > d.deadAfter {
		d.failLocked(fmt.Errorf("%w: it stood at %d for %v", ErrBackendGone, b, still.Round(time.Millisecond)))
	}
}

// GID is this device's GID.
func (d *Driver) GID() uint64 { return d.cfg.GID }

// CHID is the fabric's channel id.
func (d *Driver) CHID() uint16 { return d.cfg.CHID }

// Config is the device config space as read at Open.
func (d *Driver) Config() abi.Config { return d.cfg }

// Events delivers the device's events, in the device's order but device
// events (a GID or a DMB gone) first. If nobody reads, device events wait
// (they are never dropped) and software events past 256 waiting are
// dropped and counted (EventDrops), rather than stall signal polling. The
// channel is closed when the driver closes.
func (d *Driver) Events() <-chan abi.Event { return d.events }

// EventDrops is the number of software events dropped because Events was
// not drained.
func (d *Driver) EventDrops() uint64 { return d.evDrops.Load() }

// Interrupts reports whether the driver sleeps on the device's interrupt
// (true) or polls.
func (d *Driver) Interrupts() bool { return d.intx != nil }

func (d *Driver) modeName() string {
	if d.shm != nil {
		return fmt.Sprintf("attach mode (%d MiB region)", len(d.shm.mem)>>20)
	}
	return "copy mode"
}

func (d *Driver) waitName() string {
	if d.intx != nil {
		return "interrupts (IRQ " + d.intx.irq + ")"
	}
	return "polling"
}

// PCIAddr is the PCI address of the device.
func (d *Driver) PCIAddr() string {
	if d.vio == nil {
		return ""
	}
	return d.vio.Dev.Addr
}

func (d *Driver) usable() error {
	if d.closed.Load() {
		return ErrClosed
	}
	if e := d.broken.Load(); e != nil {
		return *e
	}
	return nil
}

// fail declares the device broken and completes every pending request with
// the reason. Call with reqMu held.
func (d *Driver) failLocked(err error) {
	err = fmt.Errorf("%w: %w", ErrBroken, err)
	d.broken.CompareAndSwap(nil, &err)
	for h, w := range d.pending {
		if w != nil {
			w.err = err
			d.pending[h] = nil
			w.done.Store(true)
			// Its slot stays taken: the device may still write there.
		}
	}
	d.opts.Logf("guestdriver: %v", err)
}

// do sends one request and waits for its response. data are MOVE payload
// segments. A non-OK status is returned as the abi.Status error along with
// the response.
func (d *Driver) do(req *abi.Request, data []virtq.Seg) (abi.Response, error) {
	w := &waiter{}
	need := 2 + len(data)
	spin := 0
	start := time.Now()
	d.reqMu.Lock()
	for {
		if err := d.usable(); err != nil {
			d.reqMu.Unlock()
			return abi.Response{}, err
		}
		if d.reqQ.NumFree() >= need && len(d.freeSlots) > 0 {
			break
		}
		d.harvestLocked()
		if d.reqQ.NumFree() >= need && len(d.freeSlots) > 0 {
			break
		}
		d.checkBeatLocked(time.Now())
		d.reqMu.Unlock()
		if time.Since(start) > d.opts.Timeout {
			return abi.Response{}, fmt.Errorf("guestdriver: %v: request queue stayed full for %v", req.Op, d.opts.Timeout)
		}
		backoff(&spin)
		d.reqMu.Lock()
	}
	w.slot = d.freeSlots[len(d.freeSlots)-1]
	d.freeSlots = d.freeSlots[:len(d.freeSlots)-1]
	so := w.slot * slotSize
	b := d.slots.Bytes()[so : so+slotSize]
	req.Encode(b)
	for i := abi.RequestSize; i < slotSize; i++ {
		b[i] = 0xff // a response the device "wrote" without writing reads as an unknown status
	}
	out := append([]virtq.Seg{pci.SegOf(d.slots, so, abi.RequestSize)}, data...)
	head, err := d.reqQ.Add(out, []virtq.Seg{pci.SegOf(d.slots, so+abi.RequestSize, abi.ResponseSize)})
	if err != nil {
		d.freeSlots = append(d.freeSlots, w.slot)
		d.reqMu.Unlock()
		return abi.Response{}, err
	}
	d.pending[head] = w
	d.reqQ.Kick()
	d.reqMu.Unlock()
	d.poke()

	spin = 0
	for !w.done.Load() {
		if d.reqMu.TryLock() {
			d.harvestLocked()
			if !w.done.Load() {
				now := time.Now()
				d.checkBeatLocked(now)
				if !w.done.Load() && now.Sub(start) > d.opts.Timeout {
					d.failLocked(fmt.Errorf("%v not completed in %v", req.Op, d.opts.Timeout))
				}
			}
			d.reqMu.Unlock()
			if w.done.Load() {
				break
			}
		}
		backoff(&spin)
	}
	if w.err != nil {
		return abi.Response{}, w.err
	}
	if w.resp.Status != abi.StatusOK {
		return w.resp, w.resp.Status
	}
	return w.resp, nil
}

// harvestLocked completes every used request chain. Call with reqMu held.
func (d *Driver) harvestLocked() {
	for d.broken.Load() == nil && !d.closed.Load() { // after Close the rings may be unmapped
		head, n, ok, err := d.reqQ.Poll()
		if err != nil {
			d.failLocked(err)
			return
		}
		if !ok {
			return
		}
		w := d.pending[head]
		if w == nil {
			d.failLocked(fmt.Errorf("request chain %d completed with no request", head))
			return
		}
		d.pending[head] = nil
		so := w.slot*slotSize + abi.RequestSize
		switch {
		case n == 0:
			// The device found the chain malformed: it wrote nothing.
			w.err = fmt.Errorf("guestdriver: device rejected the request chain as malformed: %w", abi.StatusInvalid)
		case n != abi.ResponseSize:
			w.err = fmt.Errorf("%w: response of %d bytes", ErrBroken, n)
		default:
			w.resp, _ = abi.DecodeResponse(d.slots.Bytes()[so : so+abi.ResponseSize])
			if w.resp.Status > abi.StatusInternal {
				w.err = fmt.Errorf("%w: unknown response status %d", ErrBroken, uint32(w.resp.Status))
			}
		}
		d.freeSlots = append(d.freeSlots, w.slot)
		w.done.Store(true)
	}
}

// backoff spins (yielding) for a while, then sleeps with growing pauses up
// to a millisecond: under TCG a guest spinning on one vCPU starves the
// device's kicks.
func backoff(n *int) {
	*n++
	if *n < 64 {
		runtime.Gosched()
		return
	}
	time.Sleep(min(time.Microsecond<<min((*n-64)/16, 10), time.Millisecond))
}

// poke tells the poller that something is going on, so it spins again.
func (d *Driver) poke() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// stopPoller ends the poller and waits for it.
func (d *Driver) stopPoller() {
	close(d.stop)
	if d.intx != nil {
		_ = d.intx.close() // ends a wait on the interrupt
	}
	<-d.polled
	<-d.pumped
}

// Close resets the device, which makes the backend drop this guest's DMBs,
// and stops the poller. DMA memory is returned only when no DMB or Buffer
// is still held, so stale slices never point at unmapped memory.
func (d *Driver) Close() error {
	if d.shm != nil && d.usable() == nil {
		d.releaseShared()
	}
	if !d.closed.CompareAndSwap(false, true) {
		return ErrClosed
	}
	d.evMu.Lock() // a Revoked reaping now finishes; later ones see closed
	d.evMu.Unlock()
	d.stopPoller()
	if d.shm != nil {
		// The reset removes every mapping: no write through an
		// attachment may follow it.
		d.shm.closeAll()
	}
	var err error
	if d.vio != nil && !d.backendGone() { // nil only in tests
		// A device whose backend is gone is left alone: QEMU 11.1.3
		// cannot stop a vhost-user device that lost its back-end
		// safely, and there is nothing to reset.
		err = d.vio.Reset(5 * time.Second)
	}
	d.reqMu.Lock()
	for h, w := range d.pending {
		if w != nil {
			w.err = ErrClosed
			d.pending[h] = nil
			w.done.Store(true)
		}
	}
	d.reqMu.Unlock()
	d.dmbMu.Lock()
	for i := range d.dmbs {
		if m := d.dmbs[i].Swap(nil); m != nil {
			m.dead.Store(true)
		}
	}
	d.dmbMu.Unlock()
	if err == nil && d.live.Load() == 0 {
		err = d.alloc.Close()
		if d.shm != nil {
			if uerr := d.shm.bar.Unmap(); err == nil {
				err = uerr
			}
		}
	}
	if d.vio != nil {
		if cerr := d.vio.Close(); err == nil {
			err = cerr
		}
	}
	return err
}
