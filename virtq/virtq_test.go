package virtq_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/ism-backend/ism-backend/virtq"
	"github.com/ism-backend/ism-backend/virtq/virtqtest"
)

// memBase is the bus address of the test memory's byte 0.
const memBase = 0x100000

// fakeDevice is the device on a test ring, with the memory it reaches.
type fakeDevice struct {
	*virtqtest.Device
	mem []byte
}

// bufOff is where the test's buffers start in the memory, past the ring.
const bufOff = 1 << 20

// newTestRing lays a ring of size entries out at the start of 2 MiB of
// memory, the areas apart (as the test front-end allocates them), and
// returns it with a device on it.
func newTestRing(t *testing.T, size uint16) (*virtq.Ring, *fakeDevice) {
	mem := make([]byte, 2<<20)
	n := int(size)
	descOff := 0
	availOff := (descOff + virtq.DescSize(n) + 4095) &^ 4095
	usedOff := (availOff + virtq.AvailSize(n) + 4095) &^ 4095
	r, err := virtq.New(size, virtq.Areas{
		Desc: mem[descOff:availOff], Avail: mem[availOff:usedOff], Used: mem[usedOff:bufOff],
		DescAddr: memBase + uint64(descOff), AvailAddr: memBase + uint64(availOff), UsedAddr: memBase + uint64(usedOff),
	})
	if err != nil {
		t.Fatal(err)
	}
	at := func(addr uint64, n uint32) []byte {
		if addr < memBase || addr-memBase+uint64(n) > uint64(len(mem)) {
			return nil
		}
		return mem[addr-memBase : addr-memBase+uint64(n)]
	}
	return r, &fakeDevice{Device: virtqtest.New(r, at), mem: mem}
}

// seg is the segment at buffer offset off in the device's memory.
func seg(off int, n uint32) virtq.Seg { return virtq.Seg{Addr: memBase + bufOff + uint64(off), Len: n} }

func (d *fakeDevice) buf(off, n int) []byte { return d.mem[bufOff+off : bufOff+off+n] }

func TestNewChecks(t *testing.T) {
	mem := make([]byte, 1<<16)
	ok := virtq.Areas{Desc: mem[:256], Avail: mem[4096:], Used: mem[8192:], DescAddr: 0x1000, AvailAddr: 0x2000, UsedAddr: 0x3000}
	if _, err := virtq.New(16, ok); err != nil {
		t.Fatal(err)
	}
	bad := map[string]func(a *virtq.Areas) uint16{
		"size 0":              func(*virtq.Areas) uint16 { return 0 },
		"size 3":              func(*virtq.Areas) uint16 { return 3 },
		"size 65535":          func(*virtq.Areas) uint16 { return 65535 },
		"desc too small":      func(a *virtq.Areas) uint16 { a.Desc = a.Desc[:255]; return 16 },
		"avail too small":     func(a *virtq.Areas) uint16 { a.Avail = a.Avail[:virtq.AvailSize(16)-1]; return 16 },
		"used too small":      func(a *virtq.Areas) uint16 { a.Used = a.Used[:virtq.UsedSize(16)-1]; return 16 },
		"avail host 2":        func(a *virtq.Areas) uint16 { a.Avail = a.Avail[2:]; return 16 },
		"used host 2":         func(a *virtq.Areas) uint16 { a.Used = a.Used[2:]; return 16 },
		"desc addr 8":         func(a *virtq.Areas) uint16 { a.DescAddr += 8; return 16 },
		"avail addr odd":      func(a *virtq.Areas) uint16 { a.AvailAddr++; return 16 },
		"used addr 2":         func(a *virtq.Areas) uint16 { a.UsedAddr += 2; return 16 },
		"table for 32 in 256": func(*virtq.Areas) uint16 { return 32 },
	}
	for name, f := range bad {
		a := ok
		size := f(&a)
		if _, err := virtq.New(size, a); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// Chains go round and round, so the 16-bit indices wrap, and every
// descriptor comes back.
func TestRoundTripWraps(t *testing.T) {
	r, d := newTestRing(t, 16)
	copy(d.buf(0, 7), "hello, ")
	copy(d.buf(100, 5), "world")
	for round := 0; round < 70000/3; round++ {
		var heads [3]uint16
		for k := range heads {
			h, err := r.Add([]virtq.Seg{seg(0, 7), seg(100, 5)}, []virtq.Seg{seg(1000+16*k, 8), seg(1008+16*k, 8)})
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			heads[k] = h
		}
		if d.AvailIdx() != d.LastAvail {
			t.Fatal("chains visible before Publish")
		}
		r.Publish(heads[:]...)
		if !r.NeedNotify() || r.NeedNotify() {
			t.Fatal("not one notification per batch")
		}
		if n := d.Serve(func(in []byte) []byte { return append([]byte("ok:"), in...) }); n != 3 {
			t.Fatalf("device saw %d chains", n)
		}
		for k := range heads {
			u, ok, err := r.Poll()
			if err != nil || !ok || u.ID != heads[k] || u.Len != 15 {
				t.Fatalf("round %d: poll %+v %v %v, want head %d", round, u, ok, err, heads[k])
			}
			if got := d.buf(1000+16*k, 15); !bytes.Equal(got, []byte("ok:hello, world")) {
				t.Fatalf("response %q", got)
			}
		}
		if _, ok, _ := r.Poll(); ok || r.Pending() {
			t.Fatal("poll of an empty ring returned a chain")
		}
		if r.NumFree() != 16 {
			t.Fatalf("leaked descriptors: %d free", r.NumFree())
		}
	}
}

// The free list: a full ring refuses, chains come back in any order and
// their descriptors are reused.
func TestFreeListAndFull(t *testing.T) {
	r, d := newTestRing(t, 4)
	if _, err := r.Add(nil, nil); err == nil {
		t.Fatal("empty chain accepted")
	}
	if _, err := r.Add(make([]virtq.Seg, 5), nil); err == nil || errors.Is(err, virtq.ErrFull) {
		t.Fatalf("chain longer than the ring: %v", err)
	}
	h1, err1 := r.Add([]virtq.Seg{seg(0, 8)}, []virtq.Seg{seg(8, 8)})
	h2, err2 := r.Add([]virtq.Seg{seg(0, 8)}, []virtq.Seg{seg(16, 8)})
	if err1 != nil || err2 != nil || r.NumFree() != 0 {
		t.Fatal(err1, err2, r.NumFree())
	}
	if _, err := r.Add([]virtq.Seg{seg(0, 8)}, nil); !errors.Is(err, virtq.ErrFull) {
		t.Fatalf("fifth descriptor: %v", err)
	}
	r.Publish(h1, h2)
	// The device completes the second first.
	d.LastAvail = 2
	d.Push(uint32(h2), 8)
	if u, ok, err := r.Poll(); !ok || err != nil || u.ID != h2 || r.NumFree() != 2 {
		t.Fatalf("poll %+v %v %v, %d free", u, ok, err, r.NumFree())
	}
	// The two descriptors that came back are the next chain's.
	h3, err := r.Add([]virtq.Seg{seg(0, 8)}, []virtq.Seg{seg(24, 8)})
	if err != nil || h3 != h2 || r.NumFree() != 0 {
		t.Fatalf("reuse: head %d (want %d) %v, %d free", h3, h2, err, r.NumFree())
	}
	r.Publish(h3)
	d.Push(uint32(h1), 8)
	d.Push(uint32(h3), 0)
	for _, want := range []uint16{h1, h3} {
		if u, ok, err := r.Poll(); !ok || err != nil || u.ID != want {
			t.Fatalf("poll %+v %v %v, want %d", u, ok, err, want)
		}
	}
	if r.NumFree() != 4 {
		t.Fatalf("%d free at the end", r.NumFree())
	}
}

func TestIndirect(t *testing.T) {
	r, d := newTestRing(t, 8)
	copy(d.buf(0, 4), "ping")
	table := d.buf(4096, 48)
	tableAddr := seg(4096, 0).Addr
	if _, err := r.AddIndirect(table[:32], tableAddr, []virtq.Seg{seg(0, 4)}, []virtq.Seg{seg(64, 8), seg(72, 8)}); err == nil {
		t.Fatal("3 segments put in a 32-byte table")
	}
	head, err := r.AddIndirect(table, tableAddr, []virtq.Seg{seg(0, 4)}, []virtq.Seg{seg(64, 8), seg(72, 8)})
	if err != nil || r.NumFree() != 7 {
		t.Fatalf("%v, %d free", err, r.NumFree())
	}
	e := d.Mem(d.Desc+16*uint64(head), 16)
	if binary.LittleEndian.Uint64(e) != tableAddr || binary.LittleEndian.Uint32(e[8:]) != 48 || binary.LittleEndian.Uint16(e[12:]) != virtq.DescFIndirect {
		t.Fatalf("ring descriptor % x", e)
	}
	r.Publish(head)
	if n := d.Serve(func(in []byte) []byte { return append(in, " pong!"...) }); n != 1 {
		t.Fatalf("%d chains served", n)
	}
	if u, ok, err := r.Poll(); !ok || err != nil || u.ID != head || u.Len != 10 || string(d.buf(64, 10)) != "ping pong!" {
		t.Fatalf("poll %+v %v %v: %q", u, ok, err, d.buf(64, 10))
	}
	// The chain's writable bytes are those of the table: 16.
	head, _ = r.AddIndirect(table, tableAddr, []virtq.Seg{seg(0, 4)}, []virtq.Seg{seg(64, 8), seg(72, 8)})
	r.Publish(head)
	d.Push(uint32(head), 17)
	if _, _, err := r.Poll(); !errors.Is(err, virtq.ErrDevice) {
		t.Fatalf("17 bytes written into 16: %v", err)
	}
}

// NeedNotify ignores the device's hints; NeedNotifyEvent follows
// avail_event as vring_need_event does.
func TestNotifyDecisions(t *testing.T) {
	r, d := newTestRing(t, 8)
	add := func(n int) {
		for range n {
			h, err := r.Add([]virtq.Seg{seg(0, 8)}, nil)
			if err != nil {
				t.Fatal(err)
			}
			r.Publish(h)
			d.Serve(func([]byte) []byte { return nil })
			if _, _, err := r.Poll(); err != nil {
				t.Fatal(err)
			}
		}
	}
	d.SetAvailEvent(5) // the device wants a kick once idx 6 is published
	d.SetUsedFlags(1)  // VRING_USED_F_NO_NOTIFY
	add(2)
	if !r.NeedNotify() {
		t.Fatal("NeedNotify follows the device's hints")
	}
	if r.NeedNotify() {
		t.Fatal("NeedNotify with nothing new")
	}
	for _, c := range []struct {
		add   int
		event uint16
		want  bool
	}{
		{0, 5, false},     // nothing new
		{2, 5, false},     // idx 2 -> 4: before the event
		{2, 5, true},      // idx 4 -> 6: passes 5
		{1, 5, false},     // idx 6 -> 7: 5 is behind
		{1, 7, true},      // idx 7 -> 8: passes 7
		{3, 9, true},      // idx 8 -> 11: passes 9
		{65525, 3, false}, // idx 11 -> 0: 3 is behind, after wrapping
		{4, 3, true},      // idx 0 -> 4 passes 3
	} {
		add(c.add)
		d.SetAvailEvent(c.event)
		if got := r.NeedNotifyEvent(); got != c.want {
			t.Errorf("avail idx %d, event %d: NeedNotifyEvent %v, want %v", r.AvailIdx(), c.event, got, c.want)
		}
		if r.AvailEvent() != c.event {
			t.Errorf("AvailEvent %d, want %d", r.AvailEvent(), c.event)
		}
	}
}

// Interrupt suppression: NO_INTERRUPT beside the driver's avail idx,
// used_event, and ArmUsedEvent's answer.
func TestUsedEventAndArm(t *testing.T) {
	r, d := newTestRing(t, 8)
	var heads []uint16
	for range 3 {
		h, _ := r.Add(nil, []virtq.Seg{seg(0, 8)})
		heads = append(heads, h)
	}
	r.Publish(heads...)
	r.SetNoInterrupt(true)
	if d.AvailIdx() != 3 || d.AvailFlags() != virtq.AvailFNoInterrupt {
		t.Fatalf("avail idx %d flags %#x", d.AvailIdx(), d.AvailFlags())
	}
	r.SetNoInterrupt(false)
	if d.AvailIdx() != 3 || d.AvailFlags() != 0 {
		t.Fatalf("avail idx %d flags %#x", d.AvailIdx(), d.AvailFlags())
	}
	r.SetUsedEvent(0x8000)
	if d.UsedEvent() != 0x8000 {
		t.Fatalf("used_event %#x", d.UsedEvent())
	}
	if r.ArmUsedEvent(r.LastUsed() + 2) {
		t.Fatal("ArmUsedEvent: reached with nothing used")
	}
	if d.UsedEvent() != 1 {
		t.Fatalf("used_event %d, want 1 (notify when used idx passes 1)", d.UsedEvent())
	}
	d.Serve(func([]byte) []byte { return nil })
	if !r.ArmUsedEvent(r.LastUsed() + 3) {
		t.Fatal("ArmUsedEvent: 3 used, 3 asked, not reached")
	}
	if r.ArmUsedEvent(r.LastUsed()+4) || d.UsedEvent() != 3 {
		t.Fatalf("ArmUsedEvent: 3 used, 4 asked, reached (used_event %d)", d.UsedEvent())
	}
	if r.UsedIdx() != 3 || !r.Pending() {
		t.Fatalf("used idx %d", r.UsedIdx())
	}
	for range 3 {
		if _, ok := r.Take(); !ok {
			t.Fatal("Take found nothing")
		}
	}
	if r.Pending() || r.LastUsed() != 3 || r.NumFree() != 8 {
		t.Fatalf("after taking all: pending %v last used %d, %d free", r.Pending(), r.LastUsed(), r.NumFree())
	}
}

// Poll holds the device to the protocol and takes nothing when it broke
// it; Take reports what the device wrote.
func TestPollHostileDevice(t *testing.T) {
	for name, c := range map[string]struct {
		evil     func(d *fakeDevice, head uint16)
		released bool // Take gives the chain back: the element names it
	}{
		"idx jump": {func(d *fakeDevice, head uint16) { d.SetUsed(d.UsedIdx + 5) }, true}, // element 0 is zero: head 0
		"bad id":   {func(d *fakeDevice, head uint16) { d.Push(uint32(head)+1, 0) }, false},
		"huge id":  {func(d *fakeDevice, head uint16) { d.Push(1<<20, 0) }, false},
		"long len": {func(d *fakeDevice, head uint16) { d.Push(uint32(head), 17) }, true},
	} {
		r, d := newTestRing(t, 8)
		head, err := r.Add([]virtq.Seg{seg(0, 8)}, []virtq.Seg{seg(8, 16)})
		if err != nil {
			t.Fatal(err)
		}
		r.Publish(head)
		c.evil(d, head)
		if _, ok, err := r.Poll(); ok || !errors.Is(err, virtq.ErrDevice) {
			t.Errorf("%s: poll ok=%v err=%v", name, ok, err)
		}
		if r.LastUsed() != 0 || r.NumFree() != 6 {
			t.Errorf("%s: taken after the error: last used %d, %d free", name, r.LastUsed(), r.NumFree())
		}
		if _, ok := r.Take(); !ok || r.LastUsed() != 1 || (r.NumFree() == 8) != c.released {
			t.Errorf("%s: Take %v: %d free", name, ok, r.NumFree())
		}
	}
}

// rawChain is what the device finds at one avail slot: each descriptor of
// the table as written, following the links for at most limit steps.
func (d *fakeDevice) rawChain(slot uint16, limit int) (head uint16, descs []virtq.Desc, nexts []uint16) {
	le := binary.LittleEndian
	head = le.Uint16(d.Mem(d.Avail+4+2*uint64(slot%d.Size), 2))
	i := head
	for range limit {
		e := d.Mem(d.Desc+16*uint64(i), 16)
		fl := le.Uint16(e[12:])
		ds := virtq.Desc{Addr: le.Uint64(e), Len: le.Uint32(e[8:]), Write: fl&virtq.DescFWrite != 0, Indirect: fl&virtq.DescFIndirect != 0, Next: -1}
		if fl&virtq.DescFNext != 0 {
			ds.Next = 0 // marks "has a link"; the link itself is in nexts
		}
		descs = append(descs, ds)
		nexts = append(nexts, le.Uint16(e[14:]))
		if fl&virtq.DescFNext == 0 {
			break
		}
		i = le.Uint16(e[14:])
	}
	return head, descs, nexts
}

// AddDescs writes what it is given, loops and indirect flags included; the
// chain comes back through Poll and its descriptors return to the free list.
func TestAddDescsRaw(t *testing.T) {
	r, d := newTestRing(t, 8)
	// A loop: 0 -> 1 -> 0, the second writable.
	head, err := r.AddDescs([]virtq.Desc{{Addr: 1 << 50, Len: 48, Next: 1}, {Addr: 0xffff_ffff_ffff_f000, Len: 0x2000, Write: true, Next: 0}})
	if err != nil {
		t.Fatal(err)
	}
	r.Publish(head)
	h, descs, nexts := d.rawChain(0, 4)
	if h != head || len(descs) != 4 || nexts[1] != head || descs[0].Addr != 1<<50 || !descs[1].Write || descs[1].Len != 0x2000 {
		t.Fatalf("device sees head %d %+v links %v", h, descs, nexts)
	}
	// An indirect descriptor, no link.
	head2, err := r.AddDescs([]virtq.Desc{{Addr: 0x1000, Len: 16 * 40000, Indirect: true, Next: -1}})
	if err != nil {
		t.Fatal(err)
	}
	r.Publish(head2)
	if _, descs, _ := d.rawChain(1, 4); len(descs) != 1 || !descs[0].Indirect || descs[0].Next != -1 {
		t.Fatalf("indirect descriptor seen as %+v", descs)
	}
	if r.NumFree() != 5 {
		t.Fatalf("%d free after 3 descriptors", r.NumFree())
	}
	if _, err := r.AddDescs([]virtq.Desc{{Next: 5}}); err == nil || r.NumFree() != 5 {
		t.Fatalf("a link outside the chain was taken: %v, %d free", err, r.NumFree())
	}
	if _, err := r.AddDescs(make([]virtq.Desc, 6)); !errors.Is(err, virtq.ErrFull) {
		t.Fatalf("6 descriptors with 5 free: %v", err)
	}
	// The device refuses both, writing nothing: Poll accepts that.
	for _, hd := range []uint16{head, head2} {
		d.Push(uint32(hd), 0)
		if u, ok, err := r.Poll(); err != nil || !ok || u.ID != hd || u.Len != 0 {
			t.Fatalf("poll: %+v %v %v, want %d", u, ok, err, hd)
		}
	}
	if r.NumFree() != 8 {
		t.Fatalf("%d free after both came back", r.NumFree())
	}
	// A device that writes more than a raw chain's writable bytes is
	// still caught.
	head, _ = r.AddDescs([]virtq.Desc{{Addr: 0, Len: 48, Next: 1}, {Addr: 64, Len: 16, Write: true, Next: -1}})
	r.Publish(head)
	d.Push(uint32(head), 17)
	if _, _, err := r.Poll(); !errors.Is(err, virtq.ErrDevice) {
		t.Fatalf("17 bytes written into 16: %v", err)
	}
}

// PutDesc writes outside the free list: a chain the ring does not track,
// which Take reports and Poll calls the device's error.
func TestPutDescUntracked(t *testing.T) {
	r, d := newTestRing(t, 8)
	r.PutDesc(5, 0x1234, 8, virtq.DescFNext, 60000)
	r.Publish(5, r.Size()+3)
	if _, descs, nexts := d.rawChain(0, 1); descs[0].Addr != 0x1234 || nexts[0] != 60000 || r.NumFree() != 8 {
		t.Fatalf("device sees %+v %v", descs, nexts)
	}
	d.Push(5, 0)
	d.Push(uint32(r.Size())+3, 0)
	if _, _, err := r.Poll(); !errors.Is(err, virtq.ErrDevice) {
		t.Fatalf("poll of an untracked head: %v", err)
	}
	for _, want := range []uint16{5, r.Size() + 3} {
		if u, ok := r.Take(); !ok || u.ID != want || r.NumFree() != 8 {
			t.Fatalf("take %+v %v, want %d; %d free", u, ok, want, r.NumFree())
		}
	}
}

// CorruptAvailIdx moves the idx the device reads, not the driver's own.
func TestCorruptAvailIdx(t *testing.T) {
	r, d := newTestRing(t, 8)
	h, _ := r.Add([]virtq.Seg{seg(0, 8)}, nil)
	r.Publish(h)
	r.NeedNotify()
	r.CorruptAvailIdx(9)
	if d.AvailIdx() != 10 || r.AvailIdx() != 1 {
		t.Fatalf("device reads avail idx %d, want 1+9; driver's %d", d.AvailIdx(), r.AvailIdx())
	}
	if _, ok, err := r.Poll(); ok || err != nil {
		t.Fatalf("poll: %v %v", ok, err)
	}
}

// Reset clears the rings and gives every descriptor back.
func TestReset(t *testing.T) {
	r, d := newTestRing(t, 8)
	for range 3 {
		h, _ := r.Add([]virtq.Seg{seg(0, 8)}, []virtq.Seg{seg(8, 8)})
		r.Publish(h)
	}
	d.Serve(func([]byte) []byte { return nil })
	r.SetUsedEvent(7)
	r.Reset()
	for i, b := range d.mem[:bufOff] {
		if b != 0 {
			t.Fatalf("byte %#x is %#x after Reset", i, b)
		}
	}
	if r.NumFree() != 8 || r.AvailIdx() != 0 || r.LastUsed() != 0 || r.Pending() || r.NeedNotify() {
		t.Fatal("ring state survived Reset")
	}
	h, err := r.Add([]virtq.Seg{seg(0, 8)}, nil)
	if err != nil || h != 0 {
		t.Fatalf("first chain after Reset: head %d %v", h, err)
	}
}

func TestEncodeDescs(t *testing.T) {
	b := make([]byte, 32)
	if err := virtq.EncodeDescs(b, []virtq.Desc{{Addr: 0x2000, Len: 32, Indirect: true, Next: 1}, {Addr: 7, Len: 9, Write: true, Next: -1}}); err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	if le.Uint64(b) != 0x2000 || le.Uint32(b[8:]) != 32 || le.Uint16(b[12:]) != virtq.DescFIndirect|virtq.DescFNext || le.Uint16(b[14:]) != 1 ||
		le.Uint64(b[16:]) != 7 || le.Uint16(b[28:]) != virtq.DescFWrite || le.Uint16(b[30:]) != 0 {
		t.Fatalf("table % x", b)
	}
	if err := virtq.EncodeDescs(b, []virtq.Desc{{Next: 2}, {Next: -1}}); err == nil {
		t.Fatal("a link outside the table was written")
	}
	if err := virtq.EncodeDescs(b[:16], []virtq.Desc{{Next: -1}, {Next: -1}}); err == nil {
		t.Fatal("two descriptors written into 16 bytes")
	}
}
