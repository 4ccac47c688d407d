package vhostusertest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/ism-backend/ism-backend/virtq"
	"golang.org/x/sys/unix"
)

// VQ is the driver side of one split virtqueue in guest memory: a
// virtq.Ring (from Start on) and the queue's eventfds.
type VQ struct {
	*virtq.Ring
	f     *Frontend
	Index int

	KickFD, CallFD, ErrFD int

	descs []virtq.Desc // AddChain's, reused
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
	if q.Ring != nil {
		return nil
	}
	n := int(size)
	descGPA, desc, err := q.f.Mem.Alloc(uint64(virtq.DescSize(n)), 16)
	if err != nil {
		return err
	}
	availGPA, avail, err := q.f.Mem.Alloc(uint64(virtq.AvailSize(n)), 4)
	if err != nil {
		return err
	}
	usedGPA, used, err := q.f.Mem.Alloc(uint64(virtq.UsedSize(n)), 4)
	if err != nil {
		return err
	}
	q.Ring, err = virtq.New(size, virtq.Areas{Desc: desc, Avail: avail, Used: used, DescAddr: descGPA, AvailAddr: availGPA, UsedAddr: usedGPA})
	return err
}

// Buf is one buffer of a chain.
type Buf struct {
	GPA   uint64
	Len   uint32
	Write bool // device-writable
}

// AddChain writes bufs as a direct chain, in the order given (a writable
// buffer before a readable one too), and returns its head, not yet
// published. It panics if the ring has no room: the test has not taken
// back the chains the device used.
func (q *VQ) AddChain(bufs []Buf) uint16 {
	q.descs = q.descs[:0]
	for i, b := range bufs {
		q.descs = append(q.descs, virtq.Desc{Addr: b.GPA, Len: b.Len, Write: b.Write, Next: i + 1})
	}
	if len(q.descs) > 0 {
		q.descs[len(q.descs)-1].Next = -1
	}
	return q.AddRaw(q.descs...)
}

// AddRaw is virtq.Ring.AddDescs for hand-built chains (loops, indirect
// tables, anything), and panics as AddChain does.
func (q *VQ) AddRaw(descs ...virtq.Desc) uint16 {
	head, err := q.AddDescs(descs)
	if err != nil {
		panic(fmt.Sprintf("vhostusertest: queue %d: %v", q.Index, err))
	}
	return head
}

// AddIndirect writes bufs (readable ones first) into an indirect table in
// guest memory and a ring descriptor pointing to it; it returns the head,
// not yet published.
func (q *VQ) AddIndirect(bufs []Buf) (uint16, error) {
	var out, in []virtq.Seg
	for _, b := range bufs {
		if b.Write {
			in = append(in, virtq.Seg{Addr: b.GPA, Len: b.Len})
		} else if len(in) == 0 {
			out = append(out, virtq.Seg{Addr: b.GPA, Len: b.Len})
		} else {
			return 0, errors.New("vhostusertest: readable after writable: write the table with virtq.EncodeDescs")
		}
	}
	gpa, table, err := q.f.Mem.Alloc(uint64(virtq.DescSize(len(bufs))), 16)
	if err != nil {
		return 0, err
	}
	return q.Ring.AddIndirect(table, gpa, out, in)
}

// KickIfNeeded kicks unless the device's avail_event (EVENT_IDX) says it
// needs no kick for the chains published since the last decision, and
// reports whether it kicked.
func (q *VQ) KickIfNeeded() (bool, error) {
	if !q.NeedNotifyEvent() {
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

// ErrTimeout: nothing happened within Timeout.
var ErrTimeout = errors.New("vhostusertest: timed out")

// PollUsed returns the next used element if there is one, and asks for a
// notification at the next one (used_event = the new last used index).
// Unlike it, Take leaves used_event alone, for a driver that chooses when
// it wants to be notified (see ArmUsedEvent): a used_event that follows
// every element asks the device for a notification per completion.
func (q *VQ) PollUsed() (virtq.Used, bool) {
	u, ok := q.Take()
	if ok {
		q.SetUsedEvent(q.LastUsed())
	}
	return u, ok
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
func (q *VQ) WaitUsed() (virtq.Used, error) {
	deadline := time.Now().Add(Timeout)
	for {
		if u, ok := q.PollUsed(); ok {
			return u, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return virtq.Used{}, ErrTimeout
		}
		if _, err := q.WaitCall(left); err != nil && !errors.Is(err, ErrTimeout) {
			return virtq.Used{}, err
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
