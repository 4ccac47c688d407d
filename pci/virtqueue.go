package pci

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
)

// Split virtqueue, driver side (virtio 1.2 §2.7). Layout in one DMA chunk:
//
//	desc  at 0:          16 bytes per descriptor (addr u64, len u32, flags u16, next u16)
//	avail at 16*N:       flags u16, idx u16, ring[N] u16, used_event u16, 2 bytes pad
//	used  at availEnd:   flags u16, idx u16, ring[N] {id u32, len u32}, avail_event u16, 2 bytes pad
//
// The pads let the u16 indices that share a 4-byte word with another field
// be read and written with 32-bit atomics (Go has no 16-bit ones): avail
// flags+idx is one word the driver owns; used flags+idx is one word the
// device owns; used_event and avail_event each sit in a word whose other
// half is padding.

const (
	descFlagNext     = 1
	descFlagWrite    = 2
	descFlagIndirect = 4

	availFlagNoInterrupt = 1
)

// Seg is one buffer of a chain: a physical address and a length.
type Seg struct {
	Addr uint64
	Len  uint32
}

// SegOf describes c[off:off+n]; it panics if that is outside c.
func SegOf(c *DMA, off, n int) Seg {
	if off < 0 || n < 0 || off+n > c.Len() || n > 1<<31 {
		panic(fmt.Sprintf("pci: segment %d+%d outside %d-byte DMA chunk", off, n, c.Len()))
	}
	return Seg{Addr: c.Addr(off), Len: uint32(n)}
}

// Queue is the driver side of a split virtqueue. It is not safe for
// concurrent use: the caller serialises Add, Kick and Poll.
type Queue struct {
	Index    uint16
	size     uint16
	mem      *DMA
	availOff int
	usedOff  int
	eventIdx bool
	notify   func()
	intr     bool // the driver wants used-buffer notifications (interrupts)

	freeHead  uint16
	numFree   uint16
	availIdx  uint16 // next avail idx to publish (shadow)
	kickedIdx uint16 // avail idx at the last notification
	lastUsed  uint16
	next      []uint16 // shadow of the descriptors' next links: the device never gets to redirect our free list
	chainLen  []uint16 // per head: descriptors in the chain, 0 if not in flight
	inLen     []uint32 // per head: device-writable bytes in the chain
}

// ErrQueueFull means no descriptors are free for the chain.
var ErrQueueFull = errors.New("pci: virtqueue full")

// ErrDevice means the device broke the ring protocol; the queue must not be
// used again until the device is reset.
var ErrDevice = errors.New("pci: device broke the virtqueue protocol")

// QueueMemSize is the DMA size a queue of n entries needs.
func QueueMemSize(n int) int {
	return 16*n + (4 + 2*n + 4) + 4 + 8*n + 4 + 4 // used ring starts 4-aligned
}

// NewQueue lays a queue of size entries (a power of two, at most 32768) out
// in mem, which must be at least QueueMemSize(size) bytes, 16-byte aligned
// and zeroed. notify is called to kick the device.
func NewQueue(index, size uint16, mem *DMA, eventIdx bool, notify func()) (*Queue, error) {
	if size == 0 || size&(size-1) != 0 || size > 32768 {
		return nil, fmt.Errorf("pci: queue size %d is not a power of two <= 32768", size)
	}
	if mem.Len() < QueueMemSize(int(size)) || mem.GPA()%16 != 0 {
		return nil, fmt.Errorf("pci: queue memory of %d bytes at %#x too small or misaligned", mem.Len(), mem.GPA())
	}
	n := int(size)
	q := &Queue{
		Index: index, size: size, mem: mem, eventIdx: eventIdx, notify: notify,
		availOff: 16 * n,
		numFree:  size,
		next:     make([]uint16, n),
		chainLen: make([]uint16, n),
		inLen:    make([]uint32, n),
	}
	q.usedOff = (q.availOff + 4 + 2*n + 4 + 3) &^ 3
	for i := 0; i < n; i++ {
		q.next[i] = uint16((i + 1) % n)
	}
	q.SetInterrupts(false)
	return q, nil
}

// SetInterrupts says whether the driver wants the device to notify it of
// used buffers (an interrupt). Off (the default), it sets the avail ring's
// NO_INTERRUPT flag and keeps used_event half the index space ahead of the
// used idx, where the device does not reach it.
func (q *Queue) SetInterrupts(on bool) {
	q.intr = on
	var flags uint32
	if !on {
		flags = availFlagNoInterrupt
	}
	w := (*uint32)(q.mem.ptr(q.availOff))
	atomic.StoreUint32(w, atomic.LoadUint32(w)&^0xffff|flags)
	q.publishUsedEvent()
}

// publishUsedEvent writes used_event (EVENT_IDX): the used idx after which
// the device notifies.
func (q *Queue) publishUsedEvent() {
	if !q.eventIdx {
		return
	}
	ev := q.lastUsed
	if !q.intr {
		ev += 0x8000
	}
	atomic.StoreUint32((*uint32)(q.mem.ptr(q.availOff+4+2*int(q.size))), uint32(ev))
}

// Size is the number of entries.
func (q *Queue) Size() uint16 { return q.size }

// DescAddr, DriverAddr and DeviceAddr are what queue_desc, queue_driver and
// queue_device must be set to.
func (q *Queue) DescAddr() uint64   { return q.mem.GPA() }
func (q *Queue) DriverAddr() uint64 { return q.mem.Addr(q.availOff) }
func (q *Queue) DeviceAddr() uint64 { return q.mem.Addr(q.usedOff) }

// NumFree is the number of free descriptors.
func (q *Queue) NumFree() int { return int(q.numFree) }

// Add places a chain of device-readable out segments followed by
// device-writable in segments and makes it available (not yet notified: see
// Kick). It returns the head descriptor index, which Poll reports back.
func (q *Queue) Add(out, in []Seg) (uint16, error) {
	total := len(out) + len(in)
	if total == 0 {
		return 0, errors.New("pci: empty chain")
	}
	if total > int(q.size) {
		return 0, fmt.Errorf("pci: chain of %d descriptors exceeds queue size %d", total, q.size)
	}
	if total > int(q.numFree) {
		return 0, ErrQueueFull
	}
	b := q.mem.Bytes()
	le := binary.LittleEndian
	head := q.freeHead
	d := head
	var inBytes uint64
	for i := 0; i < total; i++ {
		var s Seg
		var flags uint16
		if i < len(out) {
			s = out[i]
		} else {
			s = in[i-len(out)]
			flags = descFlagWrite
			inBytes += uint64(s.Len)
		}
		if i < total-1 {
			flags |= descFlagNext
		}
		o := 16 * int(d)
		le.PutUint64(b[o:], s.Addr)
		le.PutUint32(b[o+8:], s.Len)
		le.PutUint16(b[o+12:], flags)
		le.PutUint16(b[o+14:], q.next[d])
		if i < total-1 {
			d = q.next[d] // the free-list link doubles as the chain link
		} else {
			q.freeHead = q.next[d]
		}
	}
	q.numFree -= uint16(total)
	q.chainLen[head] = uint16(total)
	if inBytes > 1<<32-1 {
		inBytes = 1<<32 - 1
	}
	q.inLen[head] = uint32(inBytes)
	q.publish(head)
	return head, nil
}

// Kick notifies the device of chains made available since the last Kick.
//
// It ignores the device's suppression hints (avail_event, NO_NOTIFY), which
// the spec allows. Honouring them is a store-load handshake: the driver
// stores avail idx and then loads avail_event, the device stores
// avail_event and then loads avail idx, and each side needs a full fence
// between the two or both can miss the other's store. QEMU's TCG with one
// vCPU emits no host fence for the guest's (it assumes no other thread
// sees guest memory), so a kick was lost now and then and the request
// waited until a 20 ms safety-net kick. A requester waits for its reply, so
// the device is mostly idle when a request comes and suppression saved
// little.
func (q *Queue) Kick() {
	if q.availIdx == q.kickedIdx {
		return
	}
	q.kickedIdx = q.availIdx
	q.notify()
}

// Pending reports whether the device has used chains not yet polled.
// It does not validate; Poll does.
func (q *Queue) Pending() bool {
	return uint16(atomic.LoadUint32((*uint32)(q.mem.ptr(q.usedOff)))>>16) != q.lastUsed
}

// Poll returns the next used chain: its head and the number of bytes the
// device says it wrote. ok is false if there is none. An error means the
// device broke the protocol (used idx ran ahead of what is in flight, an id
// that is not an in-flight head, a length over the chain's writable bytes).
func (q *Queue) Poll() (head uint16, written uint32, ok bool, err error) {
	idx := uint16(atomic.LoadUint32((*uint32)(q.mem.ptr(q.usedOff))) >> 16)
	if idx == q.lastUsed {
		return 0, 0, false, nil
	}
	inFlight := q.size - q.numFree // descriptors, an upper bound on chains
	if ahead := idx - q.lastUsed; ahead > inFlight || ahead > q.availIdx-q.lastUsed {
		return 0, 0, false, fmt.Errorf("%w: used idx %d jumps %d past %d with %d chains available", ErrDevice, idx, ahead, q.lastUsed, q.availIdx-q.lastUsed)
	}
	b := q.mem.Bytes()
	le := binary.LittleEndian
	e := q.usedOff + 4 + 8*int(q.lastUsed%q.size)
	id := le.Uint32(b[e:])
	n := le.Uint32(b[e+4:])
	if id >= uint32(q.size) || q.chainLen[id] == 0 {
		return 0, 0, false, fmt.Errorf("%w: used id %d is not an in-flight chain", ErrDevice, id)
	}
	if n > q.inLen[id] {
		return 0, 0, false, fmt.Errorf("%w: used length %d exceeds the %d writable bytes of chain %d", ErrDevice, n, q.inLen[id], id)
	}
	q.lastUsed++
	q.release(uint16(id))
	q.publishUsedEvent()
	return uint16(id), n, true, nil
}

// release puts a chain's descriptors back on the free list, following the
// shadow links (never the ring memory the device could have scribbled on).
func (q *Queue) release(head uint16) {
	n := q.chainLen[head]
	last := head
	for i := uint16(1); i < n; i++ {
		last = q.next[last]
	}
	q.next[last] = q.freeHead
	q.freeHead = head
	q.numFree += n
	q.chainLen[head] = 0
	q.inLen[head] = 0
}

// Desc is one descriptor as AddDescs and EncodeDescs write it. They exist
// for drivers that test how a device copes with what a well-behaved driver
// (Add) never makes: loops, indirect tables, addresses and lengths of any
// value. Nothing in Desc is checked.
type Desc struct {
	Addr     uint64
	Len      uint32
	Write    bool // device-writable (VIRTQ_DESC_F_WRITE)
	Indirect bool // VIRTQ_DESC_F_INDIRECT: Addr and Len are a descriptor table
	// Next is the position, in the same slice, of the descriptor this one
	// links to (VIRTQ_DESC_F_NEXT), or -1 for none. It may point backwards:
	// a loop.
	Next int
}

func (d Desc) flags() uint16 {
	var f uint16
	if d.Write {
		f |= descFlagWrite
	}
	if d.Indirect {
		f |= descFlagIndirect
	}
	if d.Next >= 0 {
		f |= descFlagNext
	}
	return f
}

// EncodeDescs writes descs as a descriptor table into b (an indirect
// table: Next is the index in the table itself). b must hold 16 bytes per
// descriptor; a Next outside descs is an error.
func EncodeDescs(b []byte, descs []Desc) error {
	if len(b) < 16*len(descs) {
		return fmt.Errorf("pci: %d bytes for %d descriptors", len(b), len(descs))
	}
	le := binary.LittleEndian
	for i, d := range descs {
		if d.Next >= len(descs) {
			return fmt.Errorf("pci: descriptor %d links to %d of %d", i, d.Next, len(descs))
		}
		o := 16 * i
		le.PutUint64(b[o:], d.Addr)
		le.PutUint32(b[o+8:], d.Len)
		le.PutUint16(b[o+12:], d.flags())
		le.PutUint16(b[o+14:], uint16(max(d.Next, 0)))
	}
	return nil
}

// AddDescs places descs in free descriptors, each linking where its Next
// says, and makes descs[0] available as the head (not yet notified: see
// Kick). Poll reports the chain back like one from Add; the device should
// write nothing into a chain it refuses, and Poll still holds it to no more
// than the writable bytes the chain claims.
func (q *Queue) AddDescs(descs []Desc) (uint16, error) {
	if len(descs) == 0 {
		return 0, errors.New("pci: empty chain")
	}
	if len(descs) > int(q.size) {
		return 0, fmt.Errorf("pci: chain of %d descriptors exceeds queue size %d", len(descs), q.size)
	}
	if len(descs) > int(q.numFree) {
		return 0, ErrQueueFull
	}
	// The descriptors taken are those of the free list, in its order,
	// as in Add, so release gives back the same ones.
	idx := make([]uint16, len(descs))
	d := q.freeHead
	for i := range descs {
		idx[i] = d
		d = q.next[d]
	}
	b := q.mem.Bytes()
	le := binary.LittleEndian
	var inBytes uint64
	for i, ds := range descs {
		if ds.Next >= len(descs) {
			return 0, fmt.Errorf("pci: descriptor %d links to %d of %d", i, ds.Next, len(descs))
		}
		next := uint16(0)
		if ds.Next >= 0 {
			next = idx[ds.Next]
		}
		if ds.Write {
			inBytes += uint64(ds.Len)
		}
		o := 16 * int(idx[i])
		le.PutUint64(b[o:], ds.Addr)
		le.PutUint32(b[o+8:], ds.Len)
		le.PutUint16(b[o+12:], ds.flags())
		le.PutUint16(b[o+14:], next)
	}
	head := idx[0]
	q.freeHead = d
	q.numFree -= uint16(len(descs))
	q.chainLen[head] = uint16(len(descs))
	q.inLen[head] = uint32(min(inBytes, 1<<32-1))
	q.publish(head)
	return head, nil
}

// publish puts head in the avail ring and moves avail idx past it.
func (q *Queue) publish(head uint16) {
	b := q.mem.Bytes()
	slot := q.availOff + 4 + 2*int(q.availIdx%q.size)
	binary.LittleEndian.PutUint16(b[slot:], head)
	q.availIdx++
	// The ring entry and descriptors are plain stores; the atomic store of
	// the idx word orders them before it (and the flags half is ours).
	w := (*uint32)(q.mem.ptr(q.availOff))
	atomic.StoreUint32(w, uint32(q.availIdx)<<16|atomic.LoadUint32(w)&0xffff)
}

// CorruptAvailIdx publishes an avail idx delta entries past what the
// driver made available and notifies the device, as a broken or hostile
// driver might. A device that checks (virtio 1.2 §2.7.13.4.1: the driver
// must not move the idx by more than the queue size) stops using the
// queue; so must the caller, until it has reset the device.
func (q *Queue) CorruptAvailIdx(delta uint16) {
	w := (*uint32)(q.mem.ptr(q.availOff))
	atomic.StoreUint32(w, uint32(q.availIdx+delta)<<16|atomic.LoadUint32(w)&0xffff)
	q.kickedIdx = q.availIdx + delta
	q.notify()
}
