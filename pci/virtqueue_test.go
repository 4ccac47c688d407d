package pci

import (
	"bytes"
	"errors"
	"testing"

	"github.com/ism-backend/ism-backend/virtq"
	"github.com/ism-backend/ism-backend/virtq/virtqtest"
)

func newTestQueue(t *testing.T, size uint16, eventIdx bool) (*Queue, *virtqtest.Device, *Allocator, *int) {
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
	d := virtqtest.New(q.Ring, h.at)
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
		if n := d.Serve(func(in []byte) []byte { return append([]byte("ok:"), in...) }); n != 3 {
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
	d.SetUsedFlags(1) // VRING_USED_F_NO_NOTIFY
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
	add := func() {
		if _, err := q.Add([]virtq.Seg{SegOf(buf, 0, 8)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if d.UsedEvent() != 0x8000 || d.AvailFlags() != 1 {
		t.Fatalf("no interrupts wanted: used_event %#x flags %#x", d.UsedEvent(), d.AvailFlags())
	}
	d.SetAvailEvent(5) // the device would want a kick only once idx 6 is published
	add()
	add()
	q.Kick()
	if *kicks != 1 {
		t.Fatalf("kicks %d, want 1", *kicks)
	}
	q.SetInterrupts(true)
	if d.UsedEvent() != 0 || d.AvailFlags() != 0 {
		t.Fatalf("interrupts wanted: used_event %#x flags %#x", d.UsedEvent(), d.AvailFlags())
	}
	d.Serve(func([]byte) []byte { return nil })
	for i := 0; i < 2; i++ {
		if _, n, ok, err := q.Poll(); !ok || err != nil || n != 0 {
			t.Fatal(ok, err, n)
		}
	}
	if got := d.UsedEvent(); got != 2 {
		t.Fatalf("used_event %d, want 2", got)
	}
	q.SetInterrupts(false)
	if got := d.UsedEvent(); got != 0x8002 {
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
	if got := d.AvailIdx(); got != 1 || *kicks != 0 {
		t.Fatalf("device reads avail idx %d after AddDescs, %d kicks", got, *kicks)
	}
	q.Kick()
	q.CorruptAvailIdx(9)
	if got := d.AvailIdx(); got != 10 {
		t.Fatalf("device reads avail idx %d, want 1+9", got)
	}
	if *kicks != 2 {
		t.Fatalf("%d kicks, want 2", *kicks)
	}
	if _, _, ok, err := q.Poll(); ok || err != nil {
		t.Fatalf("poll: %v %v", ok, err)
	}
}
