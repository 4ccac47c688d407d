package pci

import (
	"fmt"

	"github.com/ism-backend/ism-backend/virtq"
)

// SegOf describes c[off:off+n]; it panics if that is outside c.
func SegOf(c *DMA, off, n int) virtq.Seg {
	if off < 0 || n < 0 || off+n > c.Len() || n > 1<<31 {
		panic(fmt.Sprintf("pci: segment %d+%d outside %d-byte DMA chunk", off, n, c.Len()))
	}
	return virtq.Seg{Addr: c.Addr(off), Len: uint32(n)}
}

// Queue is the driver side of a split virtqueue in one DMA chunk: a
// virtq.Ring that publishes each chain as it is added and notifies the
// device through notify. It is not safe for concurrent use: the caller
// serialises Add, Kick and Poll.
type Queue struct {
	*virtq.Ring
	Index    uint16
	eventIdx bool
	notify   func()
	intr     bool // the driver wants used-buffer notifications (interrupts)
}

// QueueMemSize is the DMA size a queue of n entries needs: the three areas
// in a row, the used ring 4-aligned.
func QueueMemSize(n int) int {
	return virtq.DescSize(n) + virtq.AvailSize(n) + 4 + virtq.UsedSize(n)
}

// NewQueue lays a queue of size entries (a power of two, at most 32768) out
// in mem, which must be at least QueueMemSize(size) bytes and 16-byte
// aligned. notify is called to kick the device.
func NewQueue(index, size uint16, mem *DMA, eventIdx bool, notify func()) (*Queue, error) {
	n := int(size)
	if mem.Len() < QueueMemSize(n) || mem.GPA()%16 != 0 {
		return nil, fmt.Errorf("pci: queue memory of %d bytes at %#x too small or misaligned", mem.Len(), mem.GPA())
	}
	b := mem.Bytes()
	availOff := virtq.DescSize(n)
	usedOff := (availOff + virtq.AvailSize(n) + 3) &^ 3
	r, err := virtq.New(size, virtq.Areas{
		Desc: b[:availOff], Avail: b[availOff:usedOff], Used: b[usedOff:],
		DescAddr: mem.GPA(), AvailAddr: mem.Addr(availOff), UsedAddr: mem.Addr(usedOff),
	})
	if err != nil {
		return nil, fmt.Errorf("pci: queue %d: %w", index, err)
	}
	q := &Queue{Ring: r, Index: index, eventIdx: eventIdx, notify: notify}
	q.SetInterrupts(false)
	return q, nil
}

// SetInterrupts says whether the driver wants the device to notify it of
// used buffers (an interrupt). Off (the default), it sets the avail ring's
// NO_INTERRUPT flag and keeps used_event half the index space ahead of the
// used idx, where the device does not reach it.
func (q *Queue) SetInterrupts(on bool) {
	q.intr = on
	q.SetNoInterrupt(!on)
	q.publishUsedEvent()
}

// publishUsedEvent writes used_event (EVENT_IDX): the used idx after which
// the device notifies.
func (q *Queue) publishUsedEvent() {
	if !q.eventIdx {
		return
	}
	ev := q.LastUsed()
	if !q.intr {
		ev += 0x8000
	}
	q.SetUsedEvent(ev)
}

// Add places a chain of device-readable out segments followed by
// device-writable in segments and makes it available (not yet notified: see
// Kick). It returns the head descriptor index, which Poll reports back.
func (q *Queue) Add(out, in []virtq.Seg) (uint16, error) {
	head, err := q.Ring.Add(out, in)
	if err == nil {
		q.Publish(head)
	}
	return head, err
}

// AddDescs is virtq.Ring.AddDescs, and makes the chain available (not yet
// notified: see Kick).
func (q *Queue) AddDescs(descs []virtq.Desc) (uint16, error) {
	head, err := q.Ring.AddDescs(descs)
	if err == nil {
		q.Publish(head)
	}
	return head, err
}

// Kick notifies the device of chains made available since the last Kick,
// whatever the device's suppression hints say (see virtq.Ring.NeedNotify:
// the handshake they need is not fenced under TCG with one vCPU, and a
// requester waits for its reply, so the device is mostly idle when a
// request comes and suppression saved little).
func (q *Queue) Kick() {
	if q.NeedNotify() {
		q.notify()
	}
}

// Poll returns the next used chain: its head and the number of bytes the
// device says it wrote. ok is false if there is none. An error means the
// device broke the protocol (virtq.ErrDevice).
func (q *Queue) Poll() (head uint16, written uint32, ok bool, err error) {
	u, ok, err := q.Ring.Poll()
	if ok {
		q.publishUsedEvent()
	}
	return u.ID, u.Len, ok, err
}

// CorruptAvailIdx is virtq.Ring.CorruptAvailIdx, and notifies the device.
func (q *Queue) CorruptAvailIdx(delta uint16) {
	q.Ring.CorruptAvailIdx(delta)
	q.notify()
}
