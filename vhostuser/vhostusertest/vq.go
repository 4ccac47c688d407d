package vhostusertest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Descriptor flags.
const (
	DescNext     = 1
	DescWrite    = 2
	DescIndirect = 4
)

// VQ is the driver side of one split virtqueue in guest memory.
type VQ struct {
	f     *Frontend
	Index int
	Size  uint16

	DescGPA, AvailGPA, UsedGPA uint64
	desc, avail, used          []byte

	KickFD, CallFD, ErrFD int

	nextDesc uint16 // next descriptor index handed out (wraps)
	availIdx uint16
	lastUsed uint16

	fence uint32 // target of the atomic add that orders a store before a load
}

func newVQ(f *Frontend, i int) (*VQ, error) {
	q := &VQ{f: f, Index: i, KickFD: -1, CallFD: -1, ErrFD: -1}
	var err error
	if q.KickFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, err
	}
	if q.CallFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		q.closeFDs()
		return nil, err
	}
	if q.ErrFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		q.closeFDs()
		return nil, err
	}
	return q, nil
}

func (q *VQ) closeFDs() {
	for _, p := range []*int{&q.KickFD, &q.CallFD, &q.ErrFD} {
		if *p >= 0 {
			unix.Close(*p)
			*p = -1
		}
	}
}

// UserAddr translates a GPA to the front-end virtual address (as QEMU sends
// vring addresses).
func (q *VQ) UserAddr(gpa uint64) uint64 {
	r, off, ok := q.f.Mem.find(gpa)
	if !ok {
		return 0
	}
	return r.UserAddr() + off
}

// setup allocates the rings in guest memory (unless done already).
func (q *VQ) setup(size uint16) error {
	if q.desc != nil {
		return nil
	}
	if size == 0 || size&(size-1) != 0 {
		return fmt.Errorf("queue size %d", size)
	}
	q.Size = size
	n := uint64(size)
	var err error
	if q.DescGPA, q.desc, err = q.f.Mem.Alloc(16*n, 16); err != nil {
		return err
	}
	if q.AvailGPA, q.avail, err = q.f.Mem.Alloc(6+2*n, 2); err != nil {
		return err
	}
	if q.UsedGPA, q.used, err = q.f.Mem.Alloc(6+8*n, 4); err != nil {
		return err
	}
	return nil
}

// Reset clears the rings and the driver-side indexes, as a guest driver
// does when it sets the queue up again after a reset.
func (q *VQ) Reset() {
	clear(q.desc)
	clear(q.avail)
	clear(q.used)
	q.nextDesc, q.availIdx, q.lastUsed = 0, 0, 0
}

// Buf is one buffer of a chain.
type Buf struct {
	GPA   uint64
	Len   uint32
	Write bool // device-writable
}

// WriteDesc writes descriptor i of the ring's table as given (no checks:
// hostile chains are built with it).
func (q *VQ) WriteDesc(i uint16, addr uint64, length uint32, flags, next uint16) {
	WriteDesc(q.desc, i, addr, length, flags, next)
}

// WriteDesc writes descriptor i of table.
func WriteDesc(table []byte, i uint16, addr uint64, length uint32, flags, next uint16) {
	d := table[16*int(i):]
	binary.LittleEndian.PutUint64(d[0:], addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

func (q *VQ) allocDesc() uint16 {
	i := q.nextDesc & (q.Size - 1)
	q.nextDesc++
	return i
}

// AddChain writes bufs as a direct chain and returns its head (not yet
// published).
func (q *VQ) AddChain(bufs []Buf) uint16 {
	idx := make([]uint16, len(bufs))
	for i := range bufs {
		idx[i] = q.allocDesc()
	}
	for i, b := range bufs {
		var flags, next uint16
		if b.Write {
			flags |= DescWrite
		}
		if i+1 < len(bufs) {
			flags |= DescNext
			next = idx[i+1]
		}
		q.WriteDesc(idx[i], b.GPA, b.Len, flags, next)
	}
	return idx[0]
}

// AddIndirect writes bufs into an indirect table in guest memory and a
// ring descriptor pointing to it; it returns the head.
func (q *VQ) AddIndirect(bufs []Buf) (uint16, error) {
	gpa, table, err := q.f.Mem.Alloc(16*uint64(len(bufs)), 16)
	if err != nil {
		return 0, err
	}
	for i, b := range bufs {
		var flags, next uint16
		if b.Write {
			flags |= DescWrite
		}
		if i+1 < len(bufs) {
			flags |= DescNext
			next = uint16(i + 1)
		}
		WriteDesc(table, uint16(i), b.GPA, b.Len, flags, next)
	}
	head := q.allocDesc()
	q.WriteDesc(head, gpa, uint32(16*len(bufs)), DescIndirect, 0)
	return head, nil
}

// AllocDesc hands out a descriptor index for hand-built chains.
func (q *VQ) AllocDesc() uint16 { return q.allocDesc() }

// Publish puts head on the avail ring and publishes the new avail idx.
func (q *VQ) Publish(heads ...uint16) {
	for _, h := range heads {
		binary.LittleEndian.PutUint16(q.avail[4+2*int(q.availIdx&(q.Size-1)):], h)
		q.availIdx++
	}
	q.storeAvailIdx(q.availIdx)
}

// SetAvailIdx publishes an arbitrary avail idx (hostile jumps).
func (q *VQ) SetAvailIdx(idx uint16) {
	q.availIdx = idx
	q.storeAvailIdx(idx)
}

func (q *VQ) storeAvailIdx(idx uint16) {
	// The avail ring is 2-aligned; store the u16 through the aligned
	// 32-bit word that holds it, keeping the other half.
	p := uintptr(unsafe.Pointer(&q.avail[2]))
	if p%4 == 0 {
		w := (*uint32)(unsafe.Pointer(&q.avail[2]))
		old := atomic.LoadUint32(w)
		atomic.StoreUint32(w, old&^0xffff|uint32(idx))
	} else {
		w := (*uint32)(unsafe.Pointer(&q.avail[0]))
		old := atomic.LoadUint32(w)
		atomic.StoreUint32(w, old&0xffff|uint32(idx)<<16)
	}
}

// SetAvailFlags writes the avail ring flags (VRING_AVAIL_F_NO_INTERRUPT).
func (q *VQ) SetAvailFlags(flags uint16) { binary.LittleEndian.PutUint16(q.avail[0:], flags) }

// SetUsedEvent writes used_event (EVENT_IDX).
func (q *VQ) SetUsedEvent(v uint16) { binary.LittleEndian.PutUint16(q.avail[4+2*int(q.Size):], v) }

// AvailEvent reads avail_event written by the device (EVENT_IDX).
func (q *VQ) AvailEvent() uint16 { return binary.LittleEndian.Uint16(q.used[4+8*int(q.Size):]) }

// UsedIdx reads the device's used idx.
func (q *VQ) UsedIdx() uint16 {
	return uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&q.used[0]))) >> 16)
}

// AvailIdx is the driver's avail idx (what Publish published last).
func (q *VQ) AvailIdx() uint16 { return q.availIdx }

// KickIfNeeded kicks unless the device's avail_event (EVENT_IDX) says it
// needs no kick for the chains published since avail idx old (virtio's
// vring_need_event), and reports whether it kicked.
func (q *VQ) KickIfNeeded(old uint16) (bool, error) {
	atomic.AddUint32(&q.fence, 1) // a full barrier: store avail idx, then load avail_event
	if q.availIdx-q.AvailEvent()-1 >= q.availIdx-old {
		return false, nil
	}
	return true, q.Kick()
}

// Kick signals the kick eventfd.
func (q *VQ) Kick() error {
	var one [8]byte
	one[0] = 1
	_, err := unix.Write(q.KickFD, one[:])
	return err
}

// Used is one used-ring element.
type Used struct {
	ID  uint16
	Len uint32
}

// ErrTimeout: nothing happened within Timeout.
var ErrTimeout = errors.New("vhostusertest: timed out")

// PollUsed returns the next used element if there is one, and asks for a
// notification at the next one (used_event = the new last used index).
func (q *VQ) PollUsed() (Used, bool) {
	u, ok := q.TakeUsed()
	if ok {
		q.SetUsedEvent(q.lastUsed)
	}
	return u, ok
}

// TakeUsed returns the next used element if there is one. Unlike PollUsed
// it leaves used_event alone, for a driver that chooses when it wants to be
// notified (see ArmUsedEvent): a used_event that follows every element
// asks the device for a notification per completion.
func (q *VQ) TakeUsed() (Used, bool) {
	if q.UsedIdx() == q.lastUsed {
		return Used{}, false
	}
	e := q.used[4+8*int(q.lastUsed&(q.Size-1)):]
	u := Used{ID: uint16(binary.LittleEndian.Uint32(e)), Len: binary.LittleEndian.Uint32(e[4:])}
	q.lastUsed++
	return u, true
}

// LastUsed is the driver's count of used elements taken (wraps).
func (q *VQ) LastUsed() uint16 { return q.lastUsed }

// ArmUsedEvent asks for a notification when the device's used idx reaches
// idx (EVENT_IDX: used_event = idx-1; idx is ahead of LastUsed) and reports
// whether it has reached it already. Only when it returns false may the
// caller wait for the call eventfd: the used_event store is ordered before
// the used idx load, so either the device sees the new used_event when it
// publishes idx or this load sees idx.
func (q *VQ) ArmUsedEvent(idx uint16) bool {
	q.SetUsedEvent(idx - 1)
	atomic.AddUint32(&q.fence, 1) // a full barrier: store used_event, then load used idx
	return q.UsedIdx()-q.lastUsed >= idx-q.lastUsed
}

// CallFile returns a duplicate of the call eventfd as a pollable *os.File:
// a Read parks the goroutine in the Go netpoller until the device
// notifies, the way a guest vCPU waiting for an interrupt is descheduled,
// instead of holding a thread (WaitCall) or a CPU (polling). The caller
// closes it.
func (q *VQ) CallFile() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(q.CallFD), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	// The eventfd is nonblocking (and the flag is shared with the dup),
	// so NewFile registers it with the netpoller.
	return os.NewFile(uintptr(fd), fmt.Sprintf("call%d", q.Index)), nil
}

// WaitUsed waits (on the call eventfd) for the next used element.
func (q *VQ) WaitUsed() (Used, error) {
	deadline := time.Now().Add(Timeout)
	for {
		if u, ok := q.PollUsed(); ok {
			return u, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return Used{}, ErrTimeout
		}
		if _, err := q.WaitCall(left); err != nil && !errors.Is(err, ErrTimeout) {
			return Used{}, err
		}
	}
}

// WaitCall waits for the call eventfd up to d and returns its count.
func (q *VQ) WaitCall(d time.Duration) (uint64, error) {
	pfd := []unix.PollFd{{Fd: int32(q.CallFD), Events: unix.POLLIN}}
	ms := int(d / time.Millisecond)
	if ms < 1 {
		ms = 1
	}
	for {
		n, err := unix.Poll(pfd, ms)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		if n == 0 {
			return 0, ErrTimeout
		}
		break
	}
	return q.ReadCall()
}

// ReadCall reads (and resets) the call eventfd without waiting; 0 if none.
func (q *VQ) ReadCall() (uint64, error) {
	var b [8]byte
	_, err := unix.Read(q.CallFD, b[:])
	if err == unix.EAGAIN {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}
