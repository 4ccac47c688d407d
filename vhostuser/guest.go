package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// MaxMemSlots is the most regions a memory table may have with ADD_MEM_REG,
// and what GET_MAX_MEM_SLOTS answers unless Server.MaxMemRegions is lower.
// QEMU (VHOST_USER_MAX_RAM_SLOTS, 512 for x86 in 11.1) adds every SHMEM_MAP
// mapping as a region of its own besides guest RAM, so attach mode needs
// many; each costs the back-end one mmap.
const MaxMemSlots = 512

// DefaultMaxMemBytes bounds the guest memory one connection may have mapped
// (the sum of its memory table's region sizes) unless Server.MaxMemBytes
// says otherwise. The address space of the process is shared by every VM:
// without a bound one front-end could map sparse files until no other VM's
// table fits (about 125 TiB were accepted before the bound).
const DefaultMaxMemBytes = 256 << 30

// maxQueues bounds Backend.NumQueues (vring fd messages carry an 8-bit index).
const maxQueues = 256

// Virtio device status bits.
const (
	StatusAcknowledge = 1
	StatusDriver      = 2
	StatusDriverOK    = 4
	StatusFeaturesOK  = 8
	StatusFailed      = 0x80
)

const pageSize = 4096

// ErrNotStarted refuses back-end requests while the device is not started:
// QEMU 11.1.3 segfaults on a SHMEM_MAP before DRIVER_OK.
var ErrNotStarted = errors.New("vhost-user: device not started")

// Stats are the counters of one connection.
type Stats struct {
	Messages    uint64 // front-end messages received
	BadMessages uint64 // refused (malformed, unknown or failed) messages
	BadChains   uint64 // malformed descriptor chains and broken-queue events
}

type stats struct {
	messages, badMessages, badChains atomic.Uint64
}

// Guest is one connection's device as a Backend sees it: guest memory,
// queues and the back-end request channel. It is created per connection by
// the Server.
type Guest struct {
	name    string
	srv     *Server
	log     *logrus.Entry
	backend Backend
	conn    *net.UnixConn
	stats   stats

	// replyTimeout bounds the wait for a back-end request's reply.
	replyTimeout time.Duration

	// Negotiation state, owned by the connection goroutine. ackedProto is
	// also read by ShmemMap from other goroutines.
	offeredFeatures uint64
	ackedFeatures   uint64
	offeredProto    uint64
	ackedProto      atomic.Uint64
	shmemSizes      []uint64
	status          uint8

	// mu is the device's lock (see Server's Locking comment): held shared
	// by each HandleQueue batch and WithMemoryLock, exclusively by every
	// change to the queues (ring addresses, sizes, fds) and to which Memory
	// is current, and around Backend.Start, Stop and Close.
	mu     sync.RWMutex
	mem    atomic.Pointer[Memory] // current table, holding its own reference; replaced under mu
	queues []*Queue

	// Caps on the memory table (from the Server's MaxMemBytes and
	// MaxMemRegions).
	maxMemBytes   uint64
	maxMemRegions int

	// memChanged is closed and replaced whenever mem is (guarded by
	// memChangedMu); mapsUnseen is set once the front-end failed to show
	// a SHMEM_MAP in its memory table, after which ShmemMap stops waiting.
	memChangedMu sync.Mutex
	memChanged   chan struct{}
	mapsUnseen   atomic.Bool

	started atomic.Bool

	runMu    sync.Mutex
	runners  []*runner
	tornDown bool // under runMu: the connection is over, no runner starts

	// Back-end request channel: bcPtrMu guards the pointer, bcMu
	// serialises whole request/reply exchanges.
	bcPtrMu sync.Mutex
	bc      *net.UnixConn
	bcMu    sync.Mutex

	closeOnce sync.Once

	// Handover (handover.go). queuesFrozen: no queue goroutine may start
	// (written under runMu). The rest is guarded by srv.mu: freezing asks
	// the control goroutine to park before its next message, inMsg says
	// it is reading or handling one, parked that it waits, handedOver
	// that it is to return without touching the connection.
	queuesFrozen atomic.Bool
	freezing     bool
	inMsg        bool
	parked       bool
	handedOver   bool

	// lim rate-limits the warnings about refused front-end messages: a
	// guest can make QEMU send some (a queue size that is not a power of
	// two), once per device start.
	lim logLimiter
	// traceLim and lifeLim: see guestLog. lifeLim is the VM's, shared by
	// its connections.
	traceLim logLimiter
	lifeLim  *logLimiter
}

// Name is the VM name the Server was given for this socket.
func (d *Guest) Name() string { return d.name }

// Memory is the current memory table (nil before SET_MEM_TABLE), for use
// with the device's lock held (inside HandleQueue or WithMemoryLock): it
// stays current, and mapped, until the lock is released.
func (d *Guest) Memory() *Memory { return d.mem.Load() }

// AcquireMemory returns the current memory table with a reference held, or
// nil before SET_MEM_TABLE and after teardown. It never waits: a table
// change goes on meanwhile, and the table returned (and its slices) stays
// mapped until Release. For access from outside this device's lock, such as
// another VM's queue goroutine copying into this VM's RAM; release it after
// that one use.
func (d *Guest) AcquireMemory() *Memory {
	for {
		m := d.mem.Load()
		if m == nil || m.tryAcquire() {
			return m
		}
		// m was retired between the load and the reference: a newer
		// table is current already.
	}
}

// setMemory makes next the current table and drops the old one's current
// reference (it is unmapped once its last user releases it); d.mu is held
// exclusively.
func (d *Guest) setMemory(next *Memory) {
	if next != nil {
		next.install()
	}
	d.memChangedMu.Lock()
	old := d.mem.Swap(next)
	if d.memChanged != nil {
		close(d.memChanged)
	}
	d.memChanged = make(chan struct{})
	d.memChangedMu.Unlock()
	old.Release()
}

// Queue returns queue i, or nil when i is out of range.
func (d *Guest) Queue(i int) *Queue {
	if i < 0 || i >= len(d.queues) {
		return nil
	}
	return d.queues[i]
}

// NumQueues is the number of queues.
func (d *Guest) NumQueues() int { return len(d.queues) }

// Started reports whether the device is started (between Start and Stop).
func (d *Guest) Started() bool { return d.started.Load() }

// AckedFeatures returns the virtio features the driver acknowledged.
func (d *Guest) AckedFeatures() uint64 { return d.ackedFeatures }

// AckedProtocolFeatures returns the protocol features the front-end acked.
func (d *Guest) AckedProtocolFeatures() uint64 { return d.ackedProto.Load() }

// Stats returns the connection's counters.
func (d *Guest) Stats() Stats {
	return Stats{
		Messages:    d.stats.messages.Load(),
		BadMessages: d.stats.badMessages.Load(),
		BadChains:   d.stats.badChains.Load(),
	}
}

// WithMemoryLock runs fn with this device's lock held shared, as HandleQueue
// runs, for work on its queues and current memory outside HandleQueue (for
// example completing a request from another goroutine). It waits for this
// device's control messages only. Never call it from this device's
// HandleQueue, Start or Stop, nor while holding a lock that its HandleQueue
// may wait for: read locks do not nest safely once a writer waits (use
// TryWithMemoryLock there).
func (d *Guest) WithMemoryLock(fn func()) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	fn()
}

// TryWithMemoryLock is WithMemoryLock if the lock can be had without waiting
// (no control message of this device holds or waits for it), and otherwise
// does nothing and returns false. For another VM's goroutine delivering into
// this device's queues: it must never wait for this VM.
func (d *Guest) TryWithMemoryLock(fn func()) bool {
	if !d.mu.TryRLock() {
		return false
	}
	defer d.mu.RUnlock()
	fn()
	return true
}

// Close ends the connection (the Server then tears the device down).
func (d *Guest) Close() {
	d.closeOnce.Do(func() { d.conn.Close() })
}

func (d *Guest) isHandedOver() bool {
	d.srv.mu.Lock()
	defer d.srv.mu.Unlock()
	return d.handedOver
}

func (d *Guest) protoAcked(bit uint) bool { return d.ackedProto.Load()&(1<<bit) != 0 }

// --- back-end request channel -----------------------------------------------

// ShmemMap asks the front-end to map length bytes of fd from fdOffset into
// VIRTIO shared-memory region shmid at shmOffset (VHOST_USER_BACKEND_SHMEM_MAP).
// It waits for the front-end's reply when REPLY_ACK was acked. It fails with
// ErrNotStarted while the device is not started. Never call it with this
// device's lock held (not from HandleQueue, Start or Stop, nor inside
// WithMemoryLock), nor while holding a lock that its HandleQueue may wait
// for: the front-end changes the memory table (ADD_MEM_REG or
// SET_MEM_TABLE) before it answers, which takes the device's lock
// exclusively, which waits for the device's HandleQueue to return.
func (d *Guest) ShmemMap(shmid uint8, fd int, fdOffset, shmOffset, length uint64, writable bool) error {
	if err := d.checkShmem(shmid, shmOffset, length); err != nil {
		return err
	}
	if !d.protoAcked(ProtocolBackendSendFD) {
		return errors.New("vhost-user: BACKEND_SEND_FD not acked: cannot pass the fd")
	}
	if fd < 0 {
		return errors.New("vhost-user: ShmemMap without fd")
	}
	if fdOffset%pageSize != 0 || fdOffset+length < fdOffset {
		return fmt.Errorf("vhost-user: fd range %#x+%#x unaligned or wraps", fdOffset, length)
	}
	var flags uint64
	if writable {
		flags = 1
	}
	file, haveKey := fileKeyOf(fd)
	var before int
	if haveKey {
		before, _ = d.memFileRegions(file)
	}
	if err := d.backendRequest(BackendReqShmemMap, shmemPayload(shmid, fdOffset, shmOffset, length, flags), []int{fd}); err != nil {
		return err
	}
	if haveKey && !d.mapsUnseen.Load() {
		d.awaitMapVisible(file, before)
	}
	return nil
}

// MapVisibleTimeout bounds ShmemMap's wait for the front-end's memory table
// to show a new mapping; QEMU 11.1.3 shows it within about a millisecond.
var MapVisibleTimeout = 10 * time.Second

// awaitMapVisible waits until the memory table holds more regions of file
// than before the map: the front-end has put the mapping into the guest's
// address space. QEMU 11.1.3 answers SHMEM_MAP before it commits the
// mapping (seen on every map: the ADD_MEM_REG of the mapping came 0.1-1.2 ms
// after the reply), and a guest told about the mapping at the reply wrote
// into a range that was not yet its DMB: the first bytes of a connection
// were lost. The commit also has TCG flush the vCPUs' TLBs (its listener
// runs before vhost's). A front-end that never shows its mappings costs
// one MapVisibleTimeout, logged, and no waiting after that.
func (d *Guest) awaitMapVisible(file fileKey, before int) {
	timeout := time.NewTimer(MapVisibleTimeout)
	defer timeout.Stop()
	for {
		n, changed := d.memFileRegions(file)
		if n > before {
			return
		}
		select {
		case <-changed:
		case <-timeout.C:
			d.mapsUnseen.Store(true)
			if e := d.guestLog(logrus.WarnLevel); e != nil {
				e.Warnf("the front-end showed no memory-table region for a SHMEM_MAP within %v: not waiting for them any more (the guest may see new mappings late)", MapVisibleTimeout)
			}
			return
		}
	}
}

// memFileRegions counts the regions of the memory table backed by file,
// and returns the channel closed at the table's next change.
func (d *Guest) memFileRegions(file fileKey) (int, <-chan struct{}) {
	d.memChangedMu.Lock()
	defer d.memChangedMu.Unlock()
	if d.memChanged == nil {
		d.memChanged = make(chan struct{})
	}
	return d.mem.Load().regionsOf(file), d.memChanged
}

// ShmemUnmap asks the front-end to unmap [shmOffset, shmOffset+length) of
// region shmid (VHOST_USER_BACKEND_SHMEM_UNMAP). Same rules as ShmemMap.
func (d *Guest) ShmemUnmap(shmid uint8, shmOffset, length uint64) error {
	if err := d.checkShmem(shmid, shmOffset, length); err != nil {
		return err
	}
	return d.backendRequest(BackendReqShmemUnmap, shmemPayload(shmid, 0, shmOffset, length, 0), nil)
}

func (d *Guest) checkShmem(shmid uint8, off, length uint64) error {
	if !d.started.Load() {
		return ErrNotStarted
	}
	if !d.protoAcked(ProtocolShmem) || !d.protoAcked(ProtocolBackendReq) {
		return errors.New("vhost-user: SHMEM or BACKEND_REQ not acked")
	}
	if int(shmid) >= len(d.shmemSizes) {
		return fmt.Errorf("vhost-user: no shared-memory region %d", shmid)
	}
	// The front-end mmaps at shm offset: page granularity.
	if off%pageSize != 0 || length%pageSize != 0 {
		return fmt.Errorf("vhost-user: shared-memory range %#x+%#x not page-aligned", off, length)
	}
	size := d.shmemSizes[shmid]
	if length == 0 || off > size || length > size-off {
		return fmt.Errorf("vhost-user: shared-memory range %#x+%#x outside region of %#x bytes", off, length, size)
	}
	return nil
}

func shmemPayload(shmid uint8, fdOffset, shmOffset, length, flags uint64) []byte {
	p := make([]byte, shmemMsgSize)
	p[0] = shmid
	binary.LittleEndian.PutUint64(p[8:], fdOffset)
	binary.LittleEndian.PutUint64(p[16:], shmOffset)
	binary.LittleEndian.PutUint64(p[24:], length)
	binary.LittleEndian.PutUint64(p[32:], flags)
	return p
}

func (d *Guest) backendRequest(req uint32, payload []byte, fds []int) error {
	d.bcMu.Lock()
	defer d.bcMu.Unlock()
	d.bcPtrMu.Lock()
	c := d.bc
	d.bcPtrMu.Unlock()
	if c == nil {
		return errors.New("vhost-user: no back-end request channel")
	}
	// The front-end channel goroutine keeps serving while we wait here:
	// QEMU sends SET_MEM_TABLE (NEED_REPLY) before answering SHMEM_MAP.
	needReply := d.protoAcked(ProtocolReplyAck)
	flags := uint32(flagVersion)
	if needReply {
		flags |= flagNeedReply
	}
	// After a failed or late exchange the channel is out of step (a late
	// reply would answer the next request): drop it.
	broken := func(err error) error {
		if e := d.guestLog(logrus.WarnLevel); e != nil {
			e.WithError(err).Warn("back-end request channel dropped")
		}
		d.bcPtrMu.Lock()
		if d.bc == c {
			d.bc = nil
		}
		d.bcPtrMu.Unlock()
		c.Close()
		return err
	}
	if err := WriteMessage(c, req, flags, payload, fds); err != nil {
		return broken(fmt.Errorf("vhost-user: back-end request %d: %w", req, err))
	}
	if !needReply {
		return nil
	}
	c.SetReadDeadline(time.Now().Add(d.replyTimeout))
	m, err := ReadMessage(c)
	c.SetReadDeadline(time.Time{})
	if err != nil {
		return broken(fmt.Errorf("vhost-user: back-end request %d reply: %w", req, err))
	}
	m.CloseFDs()
	if m.Request != req || m.Flags&flagReply == 0 || len(m.Payload) != 8 {
		return broken(fmt.Errorf("vhost-user: back-end request %d: bad reply (request %d flags %#x size %d)",
			req, m.Request, m.Flags, len(m.Payload)))
	}
	if st := binary.LittleEndian.Uint64(m.Payload); st != 0 {
		return fmt.Errorf("vhost-user: back-end request %d failed: status %d", req, st)
	}
	return nil
}

func (d *Guest) setBackendChannel(fd int) error {
	f := os.NewFile(uintptr(fd), "vhost-user-backend-req")
	fc, err := net.FileConn(f)
	f.Close() // FileConn dups
	if err != nil {
		return fmt.Errorf("vhost-user: back-end request fd: %w", err)
	}
	uc, ok := fc.(*net.UnixConn)
	if !ok {
		fc.Close()
		return errors.New("vhost-user: back-end request fd is not a unix socket")
	}
	d.bcPtrMu.Lock()
	old := d.bc
	d.bc = uc
	d.bcPtrMu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

func (d *Guest) closeBackendChannel() {
	d.bcPtrMu.Lock()
	old := d.bc
	d.bc = nil
	d.bcPtrMu.Unlock()
	if old != nil {
		old.Close()
	}
}
