// Package ismvirtio makes the ISM device model a virtio device: it turns
// request-queue chains into ism calls and ism events into event-queue
// buffers. It is the only package that knows both vhostuser and ism.
//
// The data path of a MOVE, from the socket to the memmove:
//
//	kick eventfd -> vhostuser queue goroutine -> Backend.HandleQueue
//	-> Queue.Next (descriptor walk, GPA -> host slices)
//	-> Chain.Reader: the header (abi.DecodeRequest), then the data's slices
//	-> ism.Device.Handle -> copy() into the owner's DMB
//	-> response written through Chain.Writer, Queue.Push, Queue.Notify
package ismvirtio

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
)

// Backend is the ISM device of one VM connection.
type Backend struct {
	fabric *ism.Fabric
	name   string
	gid    uint64
	log    *logrus.Entry
	config [abi.ConfigSize]byte

	// Guest-caused warnings are rate-limited (see warnGuest); start and
	// stop lines, which a guest's reset loop repeats, have their own
	// limiter (lifeLog). now is the limiters' clock, fixed by tests.
	lim     logLimiter
	lifeLim logLimiter
	now     func() time.Time

	opts Options

	// Set by Start, cleared by Stop; both run under the vhostuser device's
	// lock (exclusive), so HandleQueue (shared) never sees them change.
	// Other VMs' goroutines read vdev only under evMu (PostEvent,
	// Interrupt), which Start and Stop take to change it.
	vdev *vhostuser.Guest
	dev  *ism.Device
	sess *session

	// The heartbeat goroutine (heartbeat.go), under hbMu: stopBeat is
	// closed to end it, beatDone is closed when it has; quiesced holds
	// it off during a handover (handover.go).
	hbMu     sync.Mutex
	stopBeat chan struct{}
	beatDone chan struct{}
	quiesced bool

	// What Resume takes over from another process (handover.go).
	imp       *ism.Imported
	impEvents *EventsState

	// The attach-mode request the mapping worker is serving (nil: none).
	// While it is set the request queue's goroutine takes no chain, so
	// responses stay in order and only the worker touches the queue.
	asyncMu sync.Mutex
	async   bool

	// Request-queue state, used only by the request queue's goroutine.
	// The chain's views are kept and Reset per chain (see Chain.Reader).
	chain vhostuser.Chain
	rd    vhostuser.Reader
	wr    vhostuser.Writer
	hdr   [abi.RequestSize]byte
	data  [][]byte

	// The event queue is filled from other VMs' goroutines (ism calls
	// PostEvent and Interrupt from the sender's HandleQueue).
	evMu    sync.Mutex
	evChain vhostuser.Chain
	evWr    vhostuser.Writer
	pending eventQueue
}

// DefaultShmSize is the shared-memory region of attach mode unless
// Options say otherwise: 64 DMBs of the largest size.
const DefaultShmSize = 64 << 20

// Work budget of one HandleQueue call unless Options say otherwise: the
// VM's control messages (a reset, a memory table, a ring change) wait for
// the batch in progress, so a batch must stay short whatever the guest
// posts. 64 chains of 64 KiB MOVEs copy 4 MiB, about a millisecond; a
// chain's descriptor walk is bounded too (254 us for a 32768-entry
// indirect table), so 64 of the worst cost some 16 ms.
const (
	DefaultBatchChains = 64
	DefaultBatchBytes  = 4 << 20
)

// Options are what the device offers one VM.
type Options struct {
	Modes     uint16 // abi.ModeCopy | abi.ModeAttach; 0 means both
	ShmSize   uint64 // attach mode's region in bytes, a multiple of abi.ShmPage (0: DefaultShmSize)
	MaxMapped uint64 // bytes of DMBs mapped in the region at once (0: ShmSize)
	MaxAttach uint64 // bytes of attach-mode DMBs the VM may own (0: MaxMapped)

	// Work budget of one HandleQueue call: after BatchChains chains, or
	// once the chains taken hold BatchBytes bytes, the call ends and the
	// queue yields to go on (0: the defaults).
	BatchChains int
	BatchBytes  uint64

	// Heartbeat is the period of the SBA heartbeat (abi.Config.HeartbeatMS;
	// 0: DefaultHeartbeat; negative: none).
	Heartbeat time.Duration

	// EventsPerSource bounds the software events (peers' SIGNALs) of one
	// sender that wait for the VM's driver (0: DefaultEventsPerSource; at
	// most MaxPendingEvents).
	EventsPerSource int
}

// DefaultHeartbeat is the SBA heartbeat's period unless Options say
// otherwise: a driver declares the backend gone after several missed ones.
const DefaultHeartbeat = 500 * time.Millisecond

// Check fills in defaults and checks o.
func (o *Options) Check() error {
	if o.BatchChains <= 0 {
		o.BatchChains = DefaultBatchChains
	}
	if o.BatchBytes == 0 {
		o.BatchBytes = DefaultBatchBytes
	}
	if o.Modes == 0 {
		o.Modes = abi.ModeCopy | abi.ModeAttach
	}
	if o.Modes&^(abi.ModeCopy|abi.ModeAttach) != 0 {
		return fmt.Errorf("ismvirtio: unknown modes %#x", o.Modes)
	}
	switch {
	case o.Heartbeat == 0:
		o.Heartbeat = DefaultHeartbeat
	case o.Heartbeat < 0:
		o.Heartbeat = -1
	case o.Heartbeat < time.Millisecond || o.Heartbeat > 60*time.Second:
		return fmt.Errorf("ismvirtio: heartbeat period %v: want 1ms..60s", o.Heartbeat)
	}
	if o.EventsPerSource == 0 {
		o.EventsPerSource = DefaultEventsPerSource
	}
	if o.EventsPerSource < 0 || o.EventsPerSource > MaxPendingEvents {
		return fmt.Errorf("ismvirtio: events per source %d: want 1 to %d", o.EventsPerSource, MaxPendingEvents)
	}
	if o.Modes&abi.ModeAttach == 0 {
		o.ShmSize, o.MaxMapped, o.MaxAttach = 0, 0, 0
		return nil
	}
	if o.ShmSize == 0 {
		o.ShmSize = DefaultShmSize
	}
	if o.ShmSize%abi.ShmPage != 0 || o.ShmSize > ism.MaxRegionSize {
		return fmt.Errorf("ismvirtio: shared-memory size %d: want a multiple of %d up to %d", o.ShmSize, abi.ShmPage, uint64(ism.MaxRegionSize))
	}
	if o.MaxMapped == 0 || o.MaxMapped > o.ShmSize {
		o.MaxMapped = o.ShmSize
	}
	if o.MaxAttach == 0 || o.MaxAttach > o.MaxMapped {
		o.MaxAttach = o.MaxMapped
	}
	return nil
}

// New returns the Backend for one connection of VM name with the given GID,
// offering both modes with the default region.
func New(f *ism.Fabric, name string, gid uint64, log *logrus.Entry) *Backend {
	b, _ := NewWithOptions(f, name, gid, log, Options{})
	return b
}

// NewWithOptions is New with the modes and attach-mode limits of opts.
func NewWithOptions(f *ism.Fabric, name string, gid uint64, log *logrus.Entry, opts Options) (*Backend, error) {
	if err := opts.Check(); err != nil {
		return nil, err
	}
	b := &Backend{fabric: f, name: name, gid: gid, log: log, now: time.Now, opts: opts,
		pending: newEventQueue(opts.EventsPerSource)}
	cfg := abi.Config{
		Magic:      abi.Magic,
		Version:    abi.Version,
		Modes:      opts.Modes,
		GID:        gid,
		CHID:       f.CHID(),
		MaxDMBs:    abi.MaxDMBs,
		MaxDMBSize: abi.MaxDMBSize,
		MaxMoveLen: abi.MaxDMBSize,
		ShmSize:    opts.ShmSize,
		QueueSize:  vhostuser.MaxQueueSize,
	}
	if opts.Heartbeat > 0 {
		cfg.HeartbeatMS = uint16(opts.Heartbeat / time.Millisecond)
	}
	cfg.Encode(b.config[:])
	return b, nil
}

// Features: the ISM device has no device-specific feature bits yet.
func (b *Backend) Features() uint64 { return 0 }

// NumQueues is the request and the event queue.
func (b *Backend) NumQueues() int { return abi.NumQueues }

// ReadConfig serves GET_CONFIG from the fixed config space.
func (b *Backend) ReadConfig(offset uint32, buf []byte) error {
	if uint64(offset)+uint64(len(buf)) > uint64(len(b.config)) {
		clear(buf)
		if offset < uint32(len(b.config)) {
			copy(buf, b.config[offset:])
		}
		return nil
	}
	copy(buf, b.config[offset:])
	return nil
}

// WriteConfig: the config space is read-only; writes are ignored, as a
// device ignores writes to read-only registers.
func (b *Backend) WriteConfig(offset uint32, data []byte) error {
	if e := b.lim.Entry(b.now(), b.log, logrus.DebugLevel); e != nil {
		e.WithField("offset", offset).Debug("ignored write to read-only config space")
	}
	return nil
}

// ShmemSizes is attach mode's region (shmid 0), so that QEMU creates the
// BAR; copy mode alone needs none.
func (b *Backend) ShmemSizes() []uint64 {
	if b.opts.Modes&abi.ModeAttach == 0 {
		return nil
	}
	return []uint64{b.opts.ShmSize}
}

// Start connects the VM's device to the fabric and starts its mapping
// worker. Attach mode needs the front-end to have acked SHMEM, BACKEND_REQ
// and BACKEND_SEND_FD; without them the device offers copy mode only
// (attach-mode requests get StatusUnsupported).
func (b *Backend) Start(vdev *vhostuser.Guest) error {
	return b.start(vdev, func(cfg ism.DeviceConfig) (*ism.Device, error) {
		return b.fabric.ConnectDevice(b.name, b.gid, guestMemory{vdev}, b, cfg)
	})
}

// start is Start with connect putting the device on the fabric (a new one,
// or one taken over from another process).
func (b *Backend) start(vdev *vhostuser.Guest, connect func(ism.DeviceConfig) (*ism.Device, error)) error {
	cfg := ism.DeviceConfig{Modes: b.opts.Modes}
	var s *session
	need := uint64(1<<vhostuser.ProtocolShmem | 1<<vhostuser.ProtocolBackendReq | 1<<vhostuser.ProtocolBackendSendFD)
	if cfg.Modes&abi.ModeAttach != 0 {
		if vdev.AckedProtocolFeatures()&need == need {
			s = newSession(b, vdev)
			cfg.Mapper, cfg.RegionSize, cfg.MaxMapped, cfg.MaxAttach = s, b.opts.ShmSize, b.opts.MaxMapped, b.opts.MaxAttach
		} else {
			if e := b.lifeLog(logrus.WarnLevel); e != nil {
				e.Warn("front-end did not ack shared memory: attach mode not available")
			}
			cfg.Modes &^= abi.ModeAttach
		}
	}
	if cfg.Modes == 0 {
		return errors.New("ismvirtio: no mode left to offer")
	}
	// vdev first: peers may post events as soon as the device is on the
	// fabric.
	b.evMu.Lock()
	b.vdev = vdev
	b.evMu.Unlock()
	dev, err := connect(cfg)
	if err != nil {
		b.evMu.Lock()
		b.vdev = nil
		b.evMu.Unlock()
		return err
	}
	b.dev, b.sess = dev, s
	if s != nil {
		s.dev = dev
		go s.run()
	}
	b.startBeat(vdev, dev)
	if e := b.lifeLog(logrus.InfoLevel); e != nil {
		e.Info("device started")
	}
	return nil
}

// Stop disconnects the device: its DMBs die and its peers are told.
func (b *Backend) Stop(vdev *vhostuser.Guest) {
	if b.dev == nil {
		return
	}
	if b.sess != nil {
		// The front-end dropped this VM's mappings with the stop; the
		// worker finishes what it is doing (a map in flight fails or is
		// void) without touching the rings again, and sends nothing more.
		b.sess.stop()
	}
	// Not waited for: it may be waiting for the device lock Stop holds;
	// under that lock it sees b.dev changed and beats no more.
	b.stopHeartbeat()
	st := b.dev.Stats()
	b.dev.Disconnect()
	if e := b.lifeLog(logrus.InfoLevel); e != nil {
		e.WithField("stats", st).Info("device stopped: its DMBs are gone")
	}
	b.dev, b.sess = nil, nil
	b.asyncMu.Lock()
	b.async = false
	b.asyncMu.Unlock()
	b.evMu.Lock()
	b.vdev = nil
	b.pending.clear()
	b.evMu.Unlock()
}

// Close ends the connection.
func (b *Backend) Close() {}

// HandleQueue serves a kick.
func (b *Backend) HandleQueue(vdev *vhostuser.Guest, q *vhostuser.Queue) {
	if b.dev == nil {
		return
	}
	switch q.Index() {
	case abi.RequestQueue:
		b.serveRequests(q)
	case abi.EventQueue:
		// Deferred: the flush touches guest RAM, and a fault there is a
		// panic vhostuser recovers from; a held evMu would then hang
		// Stop, and every peer posting an event to this VM.
		b.evMu.Lock()
		defer b.evMu.Unlock()
		if b.flushEvents(q) {
			q.Yield()
		}
	}
}

// serveRequests completes the available request chains, within the work
// budget (Options.BatchChains, BatchBytes): HandleQueue holds the device's
// lock, which this VM's control messages wait for, so a guest that keeps
// its ring full must not keep it for long. When the budget is spent the
// queue yields and goes on in the next call, after the lock was released; the chains not taken stay on the ring (Next took none of them)
// and the avail event is left as it was, so nothing is lost, taken twice or
// left without a kick. It allocates nothing per request: the chain, header
// and data slices are reused.
//
// An attach-mode REGISTER_DMB or an ATTACH_DMB waits for the front-end's
// SHMEM_MAP reply, which cannot happen here (see async): the chain goes to
// the mapping worker and the batch ends there.
func (b *Backend) serveRequests(q *vhostuser.Queue) {
	if b.asyncBusy() {
		return // the worker completes its chain, then wakes the queue
	}
	c := &b.chain
	var bytes uint64
	for n := 0; ; n++ {
		if n == b.opts.BatchChains || bytes >= b.opts.BatchBytes {
			q.Notify()
			q.Yield()
			return
		}
		if b.fabric.FaultsOn() && q.Pending() && b.throttled(q) {
			return
		}
		ok, err := q.Next(c)
		if err != nil {
			// Malformed: vhostuser completed and logged it.
			b.dev.CountBadChain(errors.Is(err, vhostuser.ErrQueueBroken))
			continue
		}
		if !ok {
			break
		}
		bytes += uint64(c.ReadableLen()) + uint64(c.WritableLen())
		if req, ok := b.waitsForFrontEnd(c); ok {
			q.Notify() // before the worker may touch the queue
			b.startAsync(q, c.Head, req)
			return
		}
		q.Push(c, b.serve(c))
	}
	q.Notify()
}

// throttled asks the throttle fault (ism.FaultThrottle) whether the queue
// may take a chain now. If not, the chains stay on the ring and a timer
// wakes the queue when the next one may be taken: the guest sees a slow
// device, and this VM's control messages are not held up meanwhile.
func (b *Backend) throttled(q *vhostuser.Queue) bool {
	wait := b.dev.ThrottleChain(b.now())
	if wait <= 0 {
		return false
	}
	q.Notify()
	time.AfterFunc(wait, q.Wake)
	return true
}

// serve handles one request chain and returns the bytes written into it.
// The MOVE data after the header goes to ism as the chain's own segments
// (Reader.AppendSegments), so that it is copied once, straight into the
// owner's DMB.
func (b *Backend) serve(c *vhostuser.Chain) uint32 {
	w, r := &b.wr, &b.rd
	w.Reset(c)
	if w.Len() < abi.ResponseSize {
		b.dev.CountBadChain(false)
		b.warnGuest(logrus.Fields{"writable": w.Len()}, "request without room for a response")
		return 0
	}
	var resp abi.Response
	r.Reset(c)
	if n, _ := r.Read(b.hdr[:]); n < abi.RequestSize {
		resp.Status = abi.StatusInvalid
	} else {
		req, _ := abi.DecodeRequest(b.hdr[:])
		b.data = r.AppendSegments(b.data[:0])
		resp = b.dev.Handle(req, b.data)
	}
	var out [abi.ResponseSize]byte
	resp.Encode(out[:])
	n, _ := w.Write(out[:])
	return uint32(n)
}

// Interrupt raises the event queue's interrupt (a DMB was signalled).
func (b *Backend) Interrupt() {
	b.evMu.Lock()
	if b.vdev != nil {
		b.vdev.Queue(abi.EventQueue).Interrupt()
	}
	b.evMu.Unlock()
}

// PostEvent delivers ev into the next event buffer, or holds it until the
// driver posts one, or refuses it (false) when the queue holds what the
// bounds allow (events.go): the model then refuses the SIGNAL and counts the
// drop.
//
// It runs on other VMs' goroutines (a SIGNAL, a peer's disconnect), which
// must never wait for this VM: it delivers at once only if this VM's device
// lock is free, and otherwise leaves the event to this VM's event-queue
// goroutine (Wake), which flushes once the control message is done. A
// fault in this VM's rings or buffers (its front-end shrank a memory file)
// is this VM's problem: it closes this VM's connection instead of
// panicking on in the other VM's goroutine, which would end that VM's
// connection.
func (b *Backend) PostEvent(ev abi.Event) (queued bool) {
	b.evMu.Lock()
	defer b.evMu.Unlock()
	defer b.closeOnFault(b.vdev, "delivering an event")
	if !b.pending.push(ev) {
		return false
	}
	queued = true // before the flush: a fault there leaves it queued
	if b.vdev == nil {
		return queued
	}
	q := b.vdev.Queue(abi.EventQueue)
	more := true // unless flushed here, the event queue's goroutine delivers
	b.vdev.TryWithMemoryLock(func() { more = b.flushEvents(q) })
	if more {
		q.Wake()
	}
	return queued
}

// closeOnFault, deferred, turns a memory fault (debug.SetPanicOnFault) in
// this VM's memory, met while doing what, into closing this VM's connection
// vdev (if not nil); other panics go on.
func (b *Backend) closeOnFault(vdev *vhostuser.Guest, what string) {
	r := recover()
	if r == nil {
		return
	}
	if _, ok := r.(interface{ Addr() uintptr }); !ok {
		panic(r)
	}
	b.warnGuest(logrus.Fields{"fault": fmt.Sprint(r)}, "fault in this VM's memory "+what+": closing its connection")
	if vdev != nil {
		vdev.Close()
	}
}

// flushEvents moves pending events into posted buffers, device events
// first; evMu is held. It reports whether it stopped at the budget with
// events left.
func (b *Backend) flushEvents(q *vhostuser.Queue) (more bool) {
	if b.pending.len() == 0 || !q.Ready() {
		return false
	}
	c := &b.evChain
	sent := 0
	// Within the chain budget, as in serveRequests: a guest posting
	// malformed buffers as fast as they are taken must not keep this loop
	// (and its device lock, and a peer's goroutine) for ever.
	n := 0
	for ; b.pending.len() > 0 && n < b.opts.BatchChains; n++ {
		ok, err := q.Next(c)
		if err != nil {
			continue
		}
		if !ok {
			break
		}
		w := &b.evWr
		w.Reset(c)
		if w.Len() < abi.EventSize {
			b.warnGuest(logrus.Fields{"writable": w.Len()}, "event buffer too small")
			q.Push(c, 0)
			continue
		}
		var out [abi.EventSize]byte
		ev := b.pending.front()
		ev.Encode(out[:])
		w.Write(out[:])
		q.Push(c, uint32(w.Written()))
		b.pending.pop()
		sent++
	}
	if sent > 0 {
		q.Notify()
	}
	return n == b.opts.BatchChains && b.pending.len() > 0
}

// guestMemory is the VM's RAM for the ism model: each use (a MOVE into this
// VM, from any VM's goroutine) acquires the memory table current then and
// releases it after, so this VM's table changes neither wait for the MOVE
// nor unmap anything under it.
type guestMemory struct{ vdev *vhostuser.Guest }

// Acquire returns the current table (a nil *Memory, which refuses every
// range, when there is none).
func (m guestMemory) Acquire() ism.MemoryView { return m.vdev.AcquireMemory() }
