package pci

import (
	"bytes"
	"encoding/binary"
	"errors"
	"sync/atomic"
	"testing"
	"unsafe"
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
			if fl&descFlagWrite != 0 {
				outs = append(outs, d.mem(addr, l))
			} else {
				if len(outs) > 0 {
					d.t.Fatal("device: readable after writable")
				}
				in = append(in, d.mem(addr, l)...)
			}
			if fl&descFlagNext == 0 {
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
			h, err := q.Add([]Seg{SegOf(buf, 0, 7), SegOf(buf, 100, 5)}, []Seg{SegOf(buf, 1000+16*k, 8), SegOf(buf, 1008+16*k, 8)})
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
		if _, err := q.Add([]Seg{SegOf(buf, 0, 8)}, []Seg{SegOf(buf, 8, 8)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := q.Add([]Seg{SegOf(buf, 0, 8)}, nil); !errors.Is(err, ErrQueueFull) {
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
		if _, err := q.Add([]Seg{SegOf(buf, 0, 8)}, nil); err != nil {
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

func TestQueueHostileDevice(t *testing.T) {
	for name, evil := range map[string]func(d *fakeDevice, head uint16){
		"idx jump": func(d *fakeDevice, head uint16) { d.setUsed(d.usedIdx + 5) },
		"bad id": func(d *fakeDevice, head uint16) {
			binary.LittleEndian.PutUint32(d.mem(d.usd+4, 8), 7)
			d.setUsed(1)
		},
		"huge id": func(d *fakeDevice, head uint16) {
			binary.LittleEndian.PutUint32(d.mem(d.usd+4, 8), 1<<20)
			d.setUsed(1)
		},
		"long len": func(d *fakeDevice, head uint16) {
			u := d.mem(d.usd+4, 8)
			binary.LittleEndian.PutUint32(u, uint32(head))
			binary.LittleEndian.PutUint32(u[4:], 17)
			d.setUsed(1)
		},
	} {
		q, d, a, _ := newTestQueue(t, 8, false)
		buf, _ := a.Alloc(64, 64)
		head, err := q.Add([]Seg{SegOf(buf, 0, 8)}, []Seg{SegOf(buf, 8, 16)})
		if err != nil {
			t.Fatal(err)
		}
		evil(d, head)
		if _, _, ok, err := q.Poll(); ok || !errors.Is(err, ErrDevice) {
			t.Errorf("%s: poll ok=%v err=%v", name, ok, err)
		}
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

// rawChain is what the device finds at one avail slot: each descriptor of
// the table as written, following the links for at most limit steps.
func (d *fakeDevice) rawChain(slot uint16, limit int) (head uint16, descs []Desc, nexts []uint16) {
	le := binary.LittleEndian
	head = le.Uint16(d.mem(d.avl+4+2*uint64(slot%d.size), 2))
	i := head
	for range limit {
		e := d.mem(d.desc+16*uint64(i), 16)
		fl := le.Uint16(e[12:])
		ds := Desc{Addr: le.Uint64(e), Len: le.Uint32(e[8:]), Write: fl&descFlagWrite != 0, Indirect: fl&descFlagIndirect != 0, Next: -1}
		if fl&descFlagNext != 0 {
			ds.Next = 0 // marks "has a link"; the link itself is in nexts
		}
		descs = append(descs, ds)
		nexts = append(nexts, le.Uint16(e[14:]))
		if fl&descFlagNext == 0 {
			break
		}
		i = le.Uint16(e[14:])
	}
	return head, descs, nexts
}

// AddDescs writes what it is given, loops and indirect flags included; the
// chain comes back through Poll and its descriptors return to the free list.
func TestQueueAddDescsRaw(t *testing.T) {
	q, d, _, kicks := newTestQueue(t, 8, false)
	// A loop: 0 -> 1 -> 0, the second writable.
	head, err := q.AddDescs([]Desc{{Addr: 1 << 50, Len: 48, Next: 1}, {Addr: 0xffff_ffff_ffff_f000, Len: 0x2000, Write: true, Next: 0}})
	if err != nil {
		t.Fatal(err)
	}
	q.Kick()
	if *kicks != 1 {
		t.Fatalf("%d kicks", *kicks)
	}
	h, descs, nexts := d.rawChain(0, 4)
	if h != head || len(descs) != 4 || nexts[1] != head || descs[0].Addr != 1<<50 || !descs[1].Write || descs[1].Len != 0x2000 {
		t.Fatalf("device sees head %d %+v links %v", h, descs, nexts)
	}
	// An indirect descriptor, no link.
	head2, err := q.AddDescs([]Desc{{Addr: 0x1000, Len: 16 * 40000, Indirect: true, Next: -1}})
	if err != nil {
		t.Fatal(err)
	}
	if _, descs, _ := d.rawChain(1, 4); len(descs) != 1 || !descs[0].Indirect || descs[0].Next != -1 {
		t.Fatalf("indirect descriptor seen as %+v", descs)
	}
	if q.NumFree() != 5 {
		t.Fatalf("%d free after 3 descriptors", q.NumFree())
	}
	if _, err := q.AddDescs([]Desc{{Next: 5}}); err == nil {
		t.Fatal("a link outside the chain was taken")
	}
	if _, err := q.AddDescs(make([]Desc, 6)); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("6 descriptors with 5 free: %v", err)
	}
	// The device refuses both, writing nothing: Poll accepts that.
	for _, hd := range []uint16{head, head2} {
		u := d.mem(d.usd+4+8*uint64(d.usedIdx%d.size), 8)
		binary.LittleEndian.PutUint32(u, uint32(hd))
		binary.LittleEndian.PutUint32(u[4:], 0)
		d.setUsed(d.usedIdx + 1)
		if got, n, ok, err := q.Poll(); err != nil || !ok || got != hd || n != 0 {
			t.Fatalf("poll: %d %d %v %v, want %d", got, n, ok, err, hd)
		}
	}
	if q.NumFree() != 8 {
		t.Fatalf("%d free after both came back", q.NumFree())
	}
	// A device that writes more than a raw chain's writable bytes is
	// still caught.
	head, _ = q.AddDescs([]Desc{{Addr: 0, Len: 48, Next: 1}, {Addr: 64, Len: 16, Write: true, Next: -1}})
	u := d.mem(d.usd+4+8*uint64(d.usedIdx%d.size), 8)
	binary.LittleEndian.PutUint32(u, uint32(head))
	binary.LittleEndian.PutUint32(u[4:], 17)
	d.setUsed(d.usedIdx + 1)
	if _, _, _, err := q.Poll(); !errors.Is(err, ErrDevice) {
		t.Fatalf("17 bytes written into 16: %v", err)
	}
}

// CorruptAvailIdx moves the idx the device reads, not the driver's own, and
// notifies.
func TestQueueCorruptAvailIdx(t *testing.T) {
	q, d, a, kicks := newTestQueue(t, 8, false)
	buf, _ := a.Alloc(4096, 64)
	if _, err := q.Add([]Seg{SegOf(buf, 0, 8)}, nil); err != nil {
		t.Fatal(err)
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

func TestEncodeDescs(t *testing.T) {
	b := make([]byte, 32)
	if err := EncodeDescs(b, []Desc{{Addr: 0x2000, Len: 32, Indirect: true, Next: 1}, {Addr: 7, Len: 9, Write: true, Next: -1}}); err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	if le.Uint64(b) != 0x2000 || le.Uint32(b[8:]) != 32 || le.Uint16(b[12:]) != descFlagIndirect|descFlagNext || le.Uint16(b[14:]) != 1 ||
		le.Uint64(b[16:]) != 7 || le.Uint16(b[28:]) != descFlagWrite || le.Uint16(b[30:]) != 0 {
		t.Fatalf("table % x", b)
	}
	if err := EncodeDescs(b, []Desc{{Next: 2}, {Next: -1}}); err == nil {
		t.Fatal("a link outside the table was written")
	}
	if err := EncodeDescs(b[:16], []Desc{{Next: -1}, {Next: -1}}); err == nil {
		t.Fatal("two descriptors written into 16 bytes")
	}
}
