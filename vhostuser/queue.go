package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// MaxQueueSize is the largest split-ring size (virtio 1.x).
const MaxQueueSize = 32768

// DefaultMaxChainLen bounds the total byte length of one descriptor chain
// unless the Backend sets another bound with Queue.SetMaxChainLen.
const DefaultMaxChainLen = 64 << 20

// Descriptor flags (split ring).
const (
	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4
	descSize      = 16

	availFNoInterrupt = 1
)

// Errors Next returns for chains it refused (and completed with used len 0).
var (
	ErrChainIndex    = errors.New("vhost-user: descriptor index out of range")
	ErrChainLoop     = errors.New("vhost-user: descriptor chain loops")
	ErrChainTooLong  = errors.New("vhost-user: descriptor chain too long")
	ErrChainOrder    = errors.New("vhost-user: readable descriptor after a writable one")
	ErrChainIndirect = errors.New("vhost-user: bad indirect descriptor")
	// ErrQueueBroken: the driver moved avail idx by more than the queue
	// size. Nothing in the ring can be trusted; the queue stays broken
	// (Next gives nothing) until it is set up again.
	ErrQueueBroken = errors.New("vhost-user: queue broken")
)

// Chain is one descriptor chain taken from the available ring. Its
// device-readable and device-writable buffers are read and written through
// the views its Reader and Writer methods make (chainview.go), which are
// bound to the memory table the chain was walked with; a descriptor that
// crosses a memory-region boundary is several segments there. They are
// valid until the Chain is reused, and only while that table is (inside
// HandleQueue or WithMemoryLock: until the device's lock is released).
//
// A Chain is meant to be reused: Next resets it and keeps the capacity of
// its segment lists, so the hot path does not allocate.
type Chain struct {
	Head uint16

	mem      *Memory  // the table readable and writable point into
	readable [][]byte // host views of the device-readable buffers, in order
	writable [][]byte // and of the device-writable ones

	readLen  uint64
	writeLen uint64
}

func (c *Chain) reset() {
	// Truncate only: the old slices point into mmap'd guest memory, which
	// the garbage collector does not manage, and clearing costs ~15% of a
	// 64-byte request.
	c.readable = c.readable[:0]
	c.writable = c.writable[:0]
	c.mem = nil
	c.readLen, c.writeLen = 0, 0
}

// ReadableLen is the total length of the device-readable part.
func (c *Chain) ReadableLen() int { return int(c.readLen) }

// WritableLen is the total length of the device-writable part.
func (c *Chain) WritableLen() int { return int(c.writeLen) }

// Queue is one device-side split virtqueue. Its methods are not safe for
// concurrent use and must run with its device's lock held (shared): call
// them from its device's HandleQueue or inside Guest.WithMemoryLock or
// TryWithMemoryLock, and serialise per queue yourself. Interrupt and Wake
// are the exceptions: safe from any goroutine.
type Queue struct {
	index int
	dev   *Guest
	log   *logrus.Entry

	// Set by the front-end (under the device's lock, exclusively).
	size                          uint16
	descAddr, availAddr, usedAddr uint64 // front-end user addresses
	addrSet                       bool
	enabled                       bool
	kickFD, errFD                 int
	call                          *callFD // kept across resetState
	eventIdx, indirectOK          bool

	// Host views of the rings in the current memory table (nil: not
	// translatable, queue not ready).
	mem               *Memory
	desc, avail, used []byte
	usedIdxWord       *uint32 // &used[0]: flags (always 0) | idx<<16
	availIdxWord      *uint32 // aligned word holding avail idx
	availIdxShift     uint
	mask              uint16
	maxChainLen       uint64

	lastAvail     uint16
	usedIdx       uint16
	signalledUsed uint16
	signalValid   bool
	pushed        bool // something was pushed since the last notification
	broken        bool
	badChains     uint64 // malformed chains and broken-queue events so far
	yielded       atomic.Bool

	// Guest-caused log lines are rate-limited (see logLimiter); both
	// survive resetState, so a guest cannot renew its allowance by
	// resetting the device. now is the limiter's clock, fixed by tests.
	lim *logLimiter
	now func() time.Time

	fence uint32
}

// callFD is a queue's call eventfd. Interrupt writes it from any VM's
// goroutine (a peer's MOVE signals this VM), without the device's lock:
// mu keeps SET_VRING_CALL from closing the fd under that write.
type callFD struct {
	mu  sync.Mutex
	fd  int
	one [8]byte // the eventfd increment, kept here so Interrupt does not allocate
}

func newQueue(d *Guest, i int) *Queue {
	q := &Queue{index: i, dev: d, kickFD: -1, errFD: -1, call: &callFD{fd: -1}, maxChainLen: DefaultMaxChainLen,
		lim: &logLimiter{}, now: time.Now}
	if d != nil {
		q.log = d.log.WithField("queue", i)
	} else {
		q.log = logrus.NewEntry(logrus.StandardLogger()).WithField("queue", i)
	}
	binary.LittleEndian.PutUint64(q.call.one[:], 1)
	return q
}

// Index is the queue's number.
func (q *Queue) Index() int { return q.index }

// Size is the ring size set by the driver (0 before SET_VRING_NUM).
func (q *Queue) Size() int { return int(q.size) }

// Ready reports whether the queue has translated rings and is enabled
// (Next gives chains only then).
func (q *Queue) Ready() bool { return q.desc != nil && q.enabled }

// Broken reports whether the queue was marked broken (see ErrQueueBroken).
func (q *Queue) Broken() bool { return q.broken }

// SetMaxChainLen sets the largest total length of one chain; longer chains
// are refused. Call it from Backend.Start.
func (q *Queue) SetMaxChainLen(n uint64) { q.maxChainLen = n }

// Guest returns the device the queue belongs to.
func (q *Queue) Guest() *Guest { return q.dev }

// translate maps the ring addresses through m. It leaves the queue not
// ready (desc nil) when they do not translate or are misaligned.
func (q *Queue) translate(m *Memory) error {
	q.mem = m
	q.desc, q.avail, q.used = nil, nil, nil
	q.usedIdxWord, q.availIdxWord = nil, nil
	if !q.addrSet || q.size == 0 || m == nil {
		return nil
	}
	n := uint64(q.size)
	desc, err := m.UserBytes(q.descAddr, descSize*n)
	if err != nil {
		return fmt.Errorf("queue %d descriptor table: %w", q.index, err)
	}
	avail, err := m.UserBytes(q.availAddr, 6+2*n)
	if err != nil {
		return fmt.Errorf("queue %d avail ring: %w", q.index, err)
	}
	used, err := m.UserBytes(q.usedAddr, 6+8*n)
	if err != nil {
		return fmt.Errorf("queue %d used ring: %w", q.index, err)
	}
	// Alignment the spec requires, checked on host addresses because the
	// atomics below depend on it.
	if uintptr(unsafe.Pointer(&desc[0]))%descSize != 0 ||
		uintptr(unsafe.Pointer(&avail[0]))%2 != 0 ||
		uintptr(unsafe.Pointer(&used[0]))%4 != 0 {
		return fmt.Errorf("queue %d: misaligned ring", q.index)
	}
	q.desc, q.avail, q.used = desc, avail, used
	q.mask = q.size - 1
	q.usedIdxWord = (*uint32)(unsafe.Pointer(&used[0]))
	// avail idx is the u16 at offset 2. Load it with a 32-bit atomic on
	// the aligned word containing it: either [flags idx] or [idx ring[0]],
	// both inside the avail ring.
	p := uintptr(unsafe.Pointer(&avail[2]))
	if p%4 == 0 {
		q.availIdxWord = (*uint32)(unsafe.Pointer(&avail[2]))
		q.availIdxShift = 0
	} else {
		q.availIdxWord = (*uint32)(unsafe.Pointer(&avail[0]))
		q.availIdxShift = 16
	}
	return nil
}

// resetState forgets everything the front-end set (device reset).
func (q *Queue) resetState() {
	q.closeFDs()
	max := q.maxChainLen
	*q = Queue{index: q.index, dev: q.dev, log: q.log, kickFD: -1, errFD: -1, call: q.call, maxChainLen: max,
		lim: q.lim, now: q.now}
}

func closeFD(fd int) { unix.Close(fd) }

// setKick replaces the kick fd (-1: none).
func (q *Queue) setKick(fd int) {
	if q.kickFD >= 0 {
		unix.Close(q.kickFD)
	}
	q.kickFD = fd
}

// setCall replaces the call fd (-1: none).
func (q *Queue) setCall(fd int) {
	q.call.mu.Lock()
	defer q.call.mu.Unlock()
	if q.call.fd >= 0 {
		unix.Close(q.call.fd)
	}
	q.call.fd = fd
}

func (q *Queue) closeFDs() {
	q.setCall(-1)
	for _, p := range []*int{&q.kickFD, &q.errFD} {
		if *p >= 0 {
			unix.Close(*p)
			*p = -1
		}
	}
}

func (q *Queue) availIdx() uint16 {
	return uint16(atomic.LoadUint32(q.availIdxWord) >> q.availIdxShift)
}

// Next takes the next available chain into c, reusing c's storage. It
// returns false when the ring is empty. A malformed chain is completed here
// with used length 0, logged and counted; Next then returns false and the
// error, and the caller may count it and call Next again. So the loop
//
//	for { ok, err := q.Next(c); if err != nil { continue }; if !ok { break }; ... }
//
// always ends: an error is reported once per event. ErrQueueBroken is
// returned once, when the driver moves avail idx by more than the queue
// size; afterwards, and on a queue that is not Ready, Next returns false
// with no error (see Broken and Ready).
func (q *Queue) Next(c *Chain) (bool, error) {
	c.reset()
	if q.desc == nil || !q.enabled || q.broken {
		// Not ready: not set up, or stopped (after GET_VRING_BASE the
		// ring state is the front-end's again).
		return false, nil
	}
	avail := q.availIdx()
	if avail == q.lastAvail {
		if !q.eventIdx {
			return false, nil
		}
		// Ask for a kick when the driver goes past what we have seen,
		// then look again: the driver may have added a buffer before it
		// saw avail_event (the store-load fence closes that race).
		binary.LittleEndian.PutUint16(q.used[4+8*int(q.size):], q.lastAvail)
		atomic.AddUint32(&q.fence, 1)
		avail = q.availIdx()
		if avail == q.lastAvail {
			return false, nil
		}
	}
	if avail-q.lastAvail > q.size {
		q.broken = true
		q.countBadChain()
		if ok, suppressed := q.lim.Allow(q.now()); ok {
			q.log.WithField("suppressed", suppressed).Errorf("avail idx %d jumped more than the queue size from %d: queue broken until reset", avail, q.lastAvail)
		}
		return false, ErrQueueBroken
	}
	slot := 4 + 2*int(q.lastAvail&q.mask)
	head := binary.LittleEndian.Uint16(q.avail[slot:])
	q.lastAvail++
	c.Head = head
	if err := q.walk(c, head); err != nil {
		c.reset()
		c.Head = head
		// Count before the used entry is visible: whoever sees the
		// completion also sees the count.
		q.countBadChain()
		q.pushUsed(head, 0)
		if ok, suppressed := q.lim.Allow(q.now()); ok {
			q.log.WithFields(logrus.Fields{"head": head, "suppressed": suppressed}).
				Warnf("malformed chain completed with length 0 (%d so far): %v", q.badChains, err)
		}
		return false, err
	}
	return true, nil
}

// Pending reports whether the driver has made a chain available that Next
// has not taken yet (a Backend that throttles the queue asks before it
// takes one).
func (q *Queue) Pending() bool {
	return q.desc != nil && q.enabled && !q.broken && q.availIdx() != q.lastAvail
}

func (q *Queue) countBadChain() {
	q.badChains++
	if q.dev != nil {
		q.dev.stats.badChains.Add(1)
	}
}

// walk collects the chain starting at head into c.
func (q *Queue) walk(c *Chain, head uint16) error {
	c.mem = q.mem
	table := q.desc
	n := uint32(q.size)
	idx := uint32(head)
	indirect := false
	count := uint32(0)
	var total uint64
	writable := false
	for {
		if idx >= n {
			return fmt.Errorf("%w: %d of %d", ErrChainIndex, idx, n)
		}
		count++
		if count > n {
			return ErrChainLoop
		}
		d := table[descSize*idx : descSize*idx+descSize]
		addr := binary.LittleEndian.Uint64(d[0:8])
		length := uint64(binary.LittleEndian.Uint32(d[8:12]))
		flags := binary.LittleEndian.Uint16(d[12:14])
		next := binary.LittleEndian.Uint16(d[14:16])
		if flags&descFIndirect != 0 {
			switch {
			case indirect:
				return fmt.Errorf("%w: indirect inside indirect", ErrChainIndirect)
			case !q.indirectOK:
				return fmt.Errorf("%w: INDIRECT_DESC not negotiated", ErrChainIndirect)
			case flags&descFNext != 0:
				return fmt.Errorf("%w: indirect with NEXT", ErrChainIndirect)
			case length == 0 || length%descSize != 0 || length/descSize > MaxQueueSize:
				return fmt.Errorf("%w: table length %d", ErrChainIndirect, length)
			}
			t, err := q.mem.Bytes(addr, length)
			if err != nil {
				return fmt.Errorf("%w: table: %v", ErrChainIndirect, err)
			}
			table, n, idx, count, indirect = t, uint32(length/descSize), 0, 0, true
			continue
		}
		total += length // length < 2^32: no overflow within 2^32 steps
		if total > q.maxChainLen {
			return fmt.Errorf("%w: more than %d bytes", ErrChainTooLong, q.maxChainLen)
		}
		if length > 0 {
			var err error
			if flags&descFWrite != 0 {
				writable = true
				c.writable, err = q.mem.AppendSegments(c.writable, addr, length)
				c.writeLen += length
			} else {
				if writable {
					return ErrChainOrder
				}
				c.readable, err = q.mem.AppendSegments(c.readable, addr, length)
				c.readLen += length
			}
			if err != nil {
				return err
			}
		} else if flags&descFWrite != 0 {
			writable = true
		} else if writable {
			return ErrChainOrder
		}
		if flags&descFNext == 0 {
			return nil
		}
		idx = uint32(next)
	}
}

// Retake fills c again with the chain at head, translated through the
// current memory table, for a Backend that completes a chain after
// HandleQueue returned (the table may have changed since, and views of the
// old walk belong to the old table): inside Guest.WithMemoryLock it retakes
// the chain, writes its response through c.Writer and Pushes it. head must be the Head of a chain Next returned in
// this start of the device and not yet pushed. The descriptors are read and
// checked again (the driver may have changed them meanwhile); on an error
// c has no buffers and the caller pushes it with length 0.
func (q *Queue) Retake(c *Chain, head uint16) error {
	c.reset()
	c.Head = head
	if q.desc == nil {
		return errors.New("vhost-user: queue not set up")
	}
	if err := q.walk(c, head); err != nil {
		c.reset()
		c.Head = head
		return err
	}
	return nil
}

// Push puts c on the used ring with written bytes written (clamped to the
// chain's writable length) and publishes the new used idx. Push a chain in
// the same start of the device it came from (a chain kept across Stop and
// Start would land in the new rings).
func (q *Queue) Push(c *Chain, written uint32) {
	if uint64(written) > c.writeLen {
		written = uint32(c.writeLen)
	}
	q.pushUsed(c.Head, written)
}

func (q *Queue) pushUsed(id uint16, written uint32) {
	if q.used == nil {
		return
	}
	slot := 4 + 8*int(q.usedIdx&q.mask)
	binary.LittleEndian.PutUint32(q.used[slot:], uint32(id))
	binary.LittleEndian.PutUint32(q.used[slot+4:], written)
	q.usedIdx++
	// The element is written before the index is published: a release
	// store (and a full barrier on amd64, which Notify relies on).
	atomic.StoreUint32(q.usedIdxWord, uint32(q.usedIdx)<<16)
	q.pushed = true
}

// needEvent is vring_need_event from the virtio spec.
func needEvent(event, newIdx, old uint16) bool {
	return newIdx-event-1 < newIdx-old
}

// Notify raises the call eventfd if the driver wants an interrupt for what
// was pushed since the last notification (EVENT_IDX used_event, or the
// avail ring's NO_INTERRUPT flag). Call it once per batch.
func (q *Queue) Notify() {
	if q.avail == nil || !q.pushed {
		return
	}
	q.pushed = false
	// Order the used idx store before reading the driver's suppression
	// state.
	atomic.AddUint32(&q.fence, 1)
	if q.eventIdx {
		usedEvent := binary.LittleEndian.Uint16(q.avail[4+2*int(q.size):])
		old := q.signalledUsed
		valid := q.signalValid
		q.signalledUsed, q.signalValid = q.usedIdx, true
		if valid && !needEvent(usedEvent, q.usedIdx, old) {
			return
		}
	} else if binary.LittleEndian.Uint16(q.avail[0:2])&availFNoInterrupt != 0 {
		return
	}
	q.Interrupt()
}

// Interrupt raises the call eventfd unconditionally. Safe from any
// goroutine, with or without the device's lock.
func (q *Queue) Interrupt() {
	c := q.call
	c.mu.Lock()
	if c.fd >= 0 {
		unix.Write(c.fd, c.one[:])
	}
	c.mu.Unlock()
}

// Yield is for HandleQueue that stops with work left (its work budget
// spent): the queue's goroutine calls HandleQueue again as soon as this call
// has returned and released the device's lock, without waiting for a kick.
// In between, this VM's control messages and other goroutines get their
// turn. Call it only from this queue's own HandleQueue (elsewhere: Wake).
func (q *Queue) Yield() { q.yielded.Store(true) }

// Wake makes the queue's goroutine call HandleQueue again, as if the driver
// had kicked. Safe from any goroutine; a no-op when the queue is not running.
func (q *Queue) Wake() {
	if q.dev != nil {
		q.dev.wake(q.index)
	}
}
