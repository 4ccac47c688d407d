package pci

import (
	"bytes"
	"encoding/binary"
	"errors"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/ism-backend/ism-backend/virtq"
)

// fakeDevice plays the device side of a split ring per virtio 1.2 §2.7,
// reading the ring only through guest-physical addresses.
type fakeDevice struct {
	t              *testing.T
	h              *heapPages
	desc, avl, usd uint64
	size           uint16
	lastAvail      uint16
	usedIdx        uint16
}

func (d *fakeDevice) mem(gpa uint64, n uint32) []byte {
	b := d.h.at(gpa, n)
	if b == nil {
		d.t.Fatalf("device: GPA %#x+%d outside guest memory", gpa, n)
	}
	return b
}

func (d *fakeDevice) u32(gpa uint64) *uint32 { return (*uint32)(unsafe.Pointer(&d.mem(gpa, 4)[0])) }

// serve consumes every available chain: it reads the readable bytes, and
// fills the writable ones with f(readable) (truncated), reporting the number
// of bytes written.
func (d *fakeDevice) serve(f func(in []byte) []byte) int {
	le := binary.LittleEndian
	availIdx := uint16(atomic.LoadUint32(d.u32(d.avl)) >> 16)
	n := 0
	for d.lastAvail != availIdx {
		head := le.Uint16(d.mem(d.avl+4+2*uint64(d.lastAvail%d.size), 2))
		d.lastAvail++
		var in []byte
		var outs [][]byte
		i, seen := head, 0
		for {
			if i >= d.size || seen > int(d.size) {
				d.t.Fatalf("device: bad chain at %d", i)
			}
			seen++
			e := d.mem(d.desc+16*uint64(i), 16)
			addr, l, fl := le.Uint64(e), le.Uint32(e[8:]), le.Uint16(e[12:])
			if fl&virtq.DescFWrite != 0 {
				outs = append(outs, d.mem(addr, l))
			} else {
				if len(outs) > 0 {
					d.t.Fatal("device: readable after writable")
				}
				in = append(in, d.mem(addr, l)...)
			}
			if fl&virtq.DescFNext == 0 {
				break
			}
			i = le.Uint16(e[14:])
		}
		resp := f(in)
		w := 0
		for _, o := range outs {
			c := copy(o, resp[w:])
			w += c
		}
		u := d.mem(d.usd+4+8*uint64(d.usedIdx%d.size), 8)
		le.PutUint32(u, uint32(head))
		le.PutUint32(u[4:], uint32(w))
		d.setUsed(d.usedIdx + 1)
		n++
	}
	return n
}

func (d *fakeDevice) setUsed(idx uint16) {
	d.usedIdx = idx
	w := d.u32(d.usd)
	atomic.StoreUint32(w, uint32(idx)<<16|atomic.LoadUint32(w)&0xffff)
}

func newTestQueue(t *testing.T, size uint16, eventIdx bool) (*Queue, *fakeDevice, *Allocator, *int) {
	a, h := newHeapAlloc(4)
	mem, err := a.Alloc(QueueMemSize(int(size)), 4096)
	if err != nil {
		t.Fatal(err)
	}
	kicks := new(int)
	q, err := NewQueue(0, size, mem, eventIdx, func() { *kicks++ })
	if err != nil {
		t.Fatal(err)
	}
	d := &fakeDevice{t: t, h: h, desc: q.DescAddr(), avl: q.DriverAddr(), usd: q.DeviceAddr(), size: size}
	if q.DriverAddr()%2 != 0 || q.DeviceAddr()%4 != 0 || q.DeviceAddr()+6+8*uint64(size) > mem.GPA()+uint64(mem.Len()) {
		t.Fatalf("bad layout: %#x %#x %#x len %d", q.DescAddr(), q.DriverAddr(), q.DeviceAddr(), mem.Len())
	}
	return q, d, a, kicks
}

func TestQueueRoundTrip(t *testing.T) {
	q, d, a, kicks := newTestQueue(t, 16, false)
	buf, _ := a.Alloc(4096, 64)
	copy(buf.Bytes(), "hello, ")
	copy(buf.Bytes()[100:], "world")
	// Many rounds so the 16-bit indices wrap.
	for round := 0; round < 70000/3; round++ {
		var heads []uint16
		for k := 0; k < 3; k++ {
			h, err := q.Add([]virtq.Seg{SegOf(buf, 0, 7), SegOf(buf, 100, 5)}, []virtq.Seg{SegOf(buf, 1000+16*k, 8), SegOf(buf, 1008+16*k, 8)})
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			heads = append(heads, h)
		}
		q.Kick()
		if n := d.serve(func(in []byte) []byte { return append([]byte("ok:"), in...) }); n != 3 {
			t.Fatalf("device saw %d chains", n)
		}
		for k := 0; k < 3; k++ {
			h, n, ok, err := q.Poll()
			if err != nil || !ok || h != heads[k] || n != 15 {
				t.Fatalf("round %d: poll %d %d %v %v, want head %d", round, h, n, ok, err, heads[k])
			}
			if got := buf.Bytes()[1000+16*k : 1015+16*k]; !bytes.Equal(got, []byte("ok:hello, world")) {
				t.Fatalf("response %q", got)
			}
		}
		if _, _, ok, _ := q.Poll(); ok {
			t.Fatal("poll of an empty ring returned a chain")
		}
		if q.NumFree() != 16 {
			t.Fatalf("leaked descriptors: %d free", q.NumFree())
		}
	}
	if *kicks != 70000/3 {
		t.Fatalf("%d kicks", *kicks)
	}
}

func TestQueueFullAndNoNotify(t *testing.T) {
	q, d, a, kicks := newTestQueue(t, 4, false)
	buf, _ := a.Alloc(64, 64)
	for i := 0; i < 2; i++ {
		if _, err := q.Add([]virtq.Seg{SegOf(buf, 0, 8)}, []virtq.Seg{SegOf(buf, 8, 8)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := q.Add([]virtq.Seg{SegOf(buf, 0, 8)}, nil); !errors.Is(err, virtq.ErrFull) {
		t.Fatalf("fifth descriptor: %v", err)
	}
	// The device says: don't notify me. The driver notifies anyway: the
	// hint is a store-load handshake that TCG with one vCPU breaks.
	atomic.StoreUint32(d.u32(d.usd), 1) // VRING_USED_F_NO_NOTIFY
	q.Kick()
	if *kicks != 1 {
		t.Fatalf("%d kicks, want 1 despite NO_NOTIFY", *kicks)
	}
	q.Kick()
	if *kicks != 1 {
		t.Fatal("kicked with nothing new")
	}
}

// TestQueueEventIdx: every Kick with new chains notifies, whatever
// avail_event says; used_event follows what was consumed when the driver
// wants interrupts, and stays half the index space ahead when it does not.
func TestQueueEventIdx(t *testing.T) {
	q, d, a, kicks := newTestQueue(t, 8, true)
	buf, _ := a.Alloc(64, 64)
	avEvent := func(v uint16) { atomic.StoreUint32(d.u32(d.usd+4+8*8), uint32(v)) }
	usedEvent := func() uint16 { return uint16(atomic.LoadUint32(d.u32(d.avl + 4 + 2*8))) }
	availFlags := func() uint16 { return uint16(atomic.LoadUint32(d.u32(d.avl))) }
	add := func() {
		if _, err := q.Add([]virtq.Seg{SegOf(buf, 0, 8)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if usedEvent() != 0x8000 || availFlags() != 1 {
		t.Fatalf("no interrupts wanted: used_event %#x flags %#x", usedEvent(), availFlags())
	}
	avEvent(5) // the device would want a kick only once idx 6 is published
	add()
	add()
	q.Kick()
	if *kicks != 1 {
		t.Fatalf("kicks %d, want 1", *kicks)
	}
	q.SetInterrupts(true)
	if usedEvent() != 0 || availFlags() != 0 {
		t.Fatalf("interrupts wanted: used_event %#x flags %#x", usedEvent(), availFlags())
	}
	d.serve(func([]byte) []byte { return nil })
	for i := 0; i < 2; i++ {
		if _, n, ok, err := q.Poll(); !ok || err != nil || n != 0 {
			t.Fatal(ok, err, n)
		}
	}
	if got := usedEvent(); got != 2 {
		t.Fatalf("used_event %d, want 2", got)
	}
	q.SetInterrupts(false)
	if got := usedEvent(); got != 0x8002 {
		t.Fatalf("used_event %#x, want 0x8002", got)
	}
}

func TestSegOfBounds(t *testing.T) {
	a, _ := newHeapAlloc(1)
	c, _ := a.Alloc(64, 8)
	defer func() {
		if recover() == nil {
			t.Error("segment past the chunk accepted")
		}
	}()
	SegOf(c, 60, 8)
}

// CorruptAvailIdx moves the idx the device reads, not the driver's own, and
// notifies.
func TestQueueCorruptAvailIdx(t *testing.T) {
	q, d, _, kicks := newTestQueue(t, 8, false)
	// AddDescs, as Add, makes the chain available at once.
	if _, err := q.AddDescs([]virtq.Desc{{Addr: 1 << 50, Len: 8, Next: 0}}); err != nil {
		t.Fatal(err)
	}
	if got := uint16(atomic.LoadUint32(d.u32(d.avl)) >> 16); got != 1 || *kicks != 0 {
		t.Fatalf("device reads avail idx %d after AddDescs, %d kicks", got, *kicks)
	}
	q.Kick()
	q.CorruptAvailIdx(9)
	if got := uint16(atomic.LoadUint32(d.u32(d.avl)) >> 16); got != 10 {
		t.Fatalf("device reads avail idx %d, want 1+9", got)
	}
	if *kicks != 2 {
		t.Fatalf("%d kicks, want 2", *kicks)
	}
	if _, _, ok, err := q.Poll(); ok || err != nil {
		t.Fatalf("poll: %v %v", ok, err)
	}
}
