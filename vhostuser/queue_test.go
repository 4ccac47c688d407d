package vhostuser

import (
	"encoding/binary"
	"errors"
	"testing"
	"time"
	"unsafe"

	"github.com/ism-backend/ism-backend/virtq"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"
)

// testMemory maps anonymous regions, GPA-contiguous from base. Their user
// address is their host address, as QEMU's would be in its own process.
func testMemory(tb testing.TB, base uint64, sizes ...uint64) *Memory {
	tb.Helper()
	var regions []*MemoryRegion
	gpa := base
	for _, size := range sizes {
		m, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
		if err != nil {
			tb.Fatal(err)
		}
		regions = append(regions, &MemoryRegion{
			GuestPhysAddr: gpa, Size: size, UserAddr: uint64(uintptr(unsafe.Pointer(&m[0]))),
			host: m, mapped: m, fd: -1,
		})
		gpa += size
	}
	mem, err := newMemory(regions)
	if err != nil {
		tb.Fatal(err)
	}
	mem.install()
	tb.Cleanup(mem.Release)
	return mem
}

func (m *Memory) testWrite(tb testing.TB, gpa uint64, b []byte) {
	tb.Helper()
	err := m.Segments(gpa, uint64(len(b)), func(s []byte) error {
		b = b[copy(s, b):]
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
}

func userAddr(tb testing.TB, m *Memory, gpa uint64) uint64 {
	b, err := m.Bytes(gpa, 1)
	if err != nil {
		tb.Fatal(err)
	}
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}

// testRing is the driver side of a ring laid out at fixed GPAs, with the
// device's Queue on it.
type testRing struct {
	*virtq.Ring
	q *Queue
}

const (
	ringDescGPA  = 0x10000
	ringAvailGPA = 0x18000
	ringUsedGPA  = 0x19000
)

func newTestRing(tb testing.TB, mem *Memory, size uint16) *testRing {
	tb.Helper()
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	q := newQueue(nil, 0)
	q.log = logrus.NewEntry(log)
	q.size = size
	q.descAddr = userAddr(tb, mem, ringDescGPA)
	q.availAddr = userAddr(tb, mem, ringAvailGPA)
	q.usedAddr = userAddr(tb, mem, ringUsedGPA)
	q.addrSet, q.enabled, q.indirectOK = true, true, true
	if err := q.translate(mem); err != nil {
		tb.Fatal(err)
	}
	area := func(gpa uint64, n int) []byte {
		b, err := mem.Bytes(gpa, uint64(n))
		if err != nil {
			tb.Fatal(err)
		}
		return b
	}
	n := int(size)
	r, err := virtq.New(size, virtq.Areas{
		Desc: area(ringDescGPA, virtq.DescSize(n)), Avail: area(ringAvailGPA, virtq.AvailSize(n)), Used: area(ringUsedGPA, virtq.UsedSize(n)),
		DescAddr: ringDescGPA, AvailAddr: ringAvailGPA, UsedAddr: ringUsedGPA,
	})
	if err != nil {
		tb.Fatal(err)
	}
	return &testRing{Ring: r, q: q}
}

// putDesc writes descriptor i of the table at GPA table (which may cross
// a region boundary).
func putDesc(tb testing.TB, mem *Memory, table uint64, i uint16, addr uint64, length uint32, flags, next uint16) {
	var d [16]byte
	virtq.PutDesc(d[:], 0, addr, length, flags, next)
	mem.testWrite(tb, table+16*uint64(i), d[:])
}

func TestMemoryTranslation(t *testing.T) {
	const base, sz = 0x100000, 0x10000
	m := testMemory(t, base, sz, sz)
	if b, err := m.Bytes(base+10, 100); err != nil || len(b) != 100 {
		t.Fatalf("Bytes inside: %d %v", len(b), err)
	}
	if b, err := m.Bytes(base+sz-1, 1); err != nil || len(b) != 1 {
		t.Fatalf("last byte of region 0: %v", err)
	}
	if _, err := m.Bytes(base+sz-8, 16); !errors.Is(err, ErrBadAddress) {
		t.Errorf("Bytes across a region boundary: %v", err)
	}
	if b, err := m.Bytes(base, 0); err != nil || len(b) != 0 {
		t.Errorf("empty Bytes: %v", err)
	}
	segs, err := m.AppendSegments(nil, base+sz-8, 16)
	if err != nil || len(segs) != 2 || len(segs[0]) != 8 || len(segs[1]) != 8 {
		t.Fatalf("segments across the boundary: %d %v", len(segs), err)
	}
	if &segs[1][0] != &m.regions[1].host[0] {
		t.Error("second segment does not start region 1")
	}
	bad := []struct {
		name   string
		gpa, n uint64
	}{
		{"below guest RAM", base - 1, 1},
		{"after guest RAM", base + 2*sz, 1},
		{"crosses the end", base + 2*sz - 4, 8},
		{"length wraps", base, ^uint64(0)},
		{"address wraps", ^uint64(0) - 3, 8},
		{"huge length", base, 1 << 63},
		{"top of address space", ^uint64(0), 1},
	}
	for _, c := range bad {
		if _, err := m.Bytes(c.gpa, c.n); !errors.Is(err, ErrBadAddress) {
			t.Errorf("Bytes %s: %v", c.name, err)
		}
		if s, err := m.AppendSegments(segs[:0], c.gpa, c.n); !errors.Is(err, ErrBadAddress) || len(s) != 0 {
			t.Errorf("AppendSegments %s: %d %v", c.name, len(s), err)
		}
		called := false
		if err := m.Segments(c.gpa, c.n, func([]byte) error { called = true; return nil }); err == nil || called {
			t.Errorf("Segments %s: %v (fn called %v)", c.name, err, called)
		}
	}
	u := m.regions[0].UserAddr
	if b, err := m.UserBytes(u+16, 32); err != nil || &b[0] != &m.regions[0].host[16] {
		t.Errorf("UserBytes: %v", err)
	}
	if _, err := m.UserBytes(u+sz-4, 8); err == nil {
		t.Error("UserBytes across the region end accepted")
	}
	if _, err := m.UserBytes(^uint64(0), 2); err == nil {
		t.Error("UserBytes at the top accepted")
	}
	var nilMem *Memory
	if _, err := nilMem.Bytes(0, 1); err == nil {
		t.Error("nil memory translated")
	}
}

func TestMemoryRegionChecks(t *testing.T) {
	m := testMemory(t, 0, 0x10000)
	overl := &MemoryRegion{GuestPhysAddr: 0x8000, Size: 0x10000, fd: -1}
	if _, err := newMemory(append(m.regions, overl)); err == nil {
		t.Error("overlapping regions accepted")
	}
	fd, _ := unix.MemfdCreate("r", 0)
	if _, err := mapRegion(&MemoryRegion{GuestPhysAddr: 0, Size: 0}, fd); err == nil {
		t.Error("empty region accepted")
	}
	fd, _ = unix.MemfdCreate("r", 0)
	if _, err := mapRegion(&MemoryRegion{GuestPhysAddr: ^uint64(0) - 10, Size: 4096}, fd); err == nil {
		t.Error("wrapping region accepted")
	}
	fd, _ = unix.MemfdCreate("r", 0)
	unix.Ftruncate(fd, 4096)
	if _, err := mapRegion(&MemoryRegion{GuestPhysAddr: 0, Size: 8192}, fd); err == nil {
		t.Error("region larger than its file accepted")
	}
	fd, _ = unix.MemfdCreate("r", 0)
	unix.Ftruncate(fd, 3*4096)
	r, err := mapRegion(&MemoryRegion{GuestPhysAddr: 0x1000, Size: 4096, MmapOffset: 4096 + 16}, fd)
	if err != nil {
		t.Fatal(err)
	}
	defer r.unmap()
	if len(r.host) != 4096 || &r.host[0] != &r.mapped[16] {
		t.Error("unaligned mmap offset not honoured")
	}
}

func TestChainDirectIndirectAndCrossing(t *testing.T) {
	const sz = 0x20000
	mem := testMemory(t, 0, sz, sz)
	r := newTestRing(t, mem, 8)
	var c Chain
	// direct: 64 readable that cross into region 1, then 16 writable
	r.PutDesc(0, sz-24, 64, descFNext, 3)
	r.PutDesc(3, 0x1000, 16, descFWrite, 0)
	r.Publish(0)
	ok, err := r.q.Next(&c)
	if !ok || err != nil {
		t.Fatal(ok, err)
	}
	if c.Head != 0 || len(c.readable) != 2 || c.ReadableLen() != 64 || c.WritableLen() != 16 || len(c.writable) != 1 {
		t.Fatalf("chain %+v", c)
	}
	src := make([]byte, 64)
	for i := range src {
		src[i] = byte(i)
	}
	mem.testWrite(t, sz-24, src)
	got := make([]byte, 80)
	rd := c.Reader()
	if n, _ := rd.Read(got); n != 64 || got[23] != 23 || got[24] != 24 || got[63] != 63 {
		t.Fatalf("Read %d % x", n, got[20:28])
	}
	rd = c.Reader()
	rd.Skip(20)
	if n, _ := rd.Read(got[:10]); n != 10 || got[0] != 20 || got[9] != 29 {
		t.Fatalf("Read after Skip: %d", n)
	}
	wr := c.Writer()
	if n, _ := wr.Write(src); n != 16 {
		t.Fatalf("Write wrote %d into 16 bytes", n)
	}
	r.q.Push(&c, 1000)
	if u, ok := r.Take(); !ok || u.ID != 0 || u.Len != 16 {
		t.Fatalf("used %+v %v (length must be clamped)", u, ok)
	}
	// indirect
	const table = 0x2000
	putDesc(t, mem, table, 0, 0x3000, 48, descFNext, 1)
	putDesc(t, mem, table, 1, 0x3100, 8, descFNext, 2)
	putDesc(t, mem, table, 2, 0x3200, 16, descFWrite, 0)
	r.PutDesc(5, table, 48, descFIndirect, 0)
	r.Publish(5)
	if ok, err := r.q.Next(&c); !ok || err != nil || c.ReadableLen() != 56 || c.WritableLen() != 16 || c.Head != 5 {
		t.Fatalf("indirect: %v %v %+v", ok, err, c)
	}
	if ok, err := r.q.Next(&c); ok || err != nil {
		t.Fatal("empty ring gave a chain", err)
	}
	// without INDIRECT_DESC negotiated the same chain is refused
	r.q.indirectOK = false
	r.Publish(5)
	if ok, err := r.q.Next(&c); ok || !errors.Is(err, ErrChainIndirect) {
		t.Fatalf("indirect without the feature: %v %v", ok, err)
	}
}

func TestChainErrors(t *testing.T) {
	mem := testMemory(t, 0, 0x20000)
	const table = 0x2000
	cases := []struct {
		name  string
		setup func(r *testRing)
		want  error
	}{
		{"index", func(r *testRing) { r.PutDesc(0, 0x1000, 8, descFNext, 9) }, ErrChainIndex},
		{"loop", func(r *testRing) {
			r.PutDesc(0, 0x1000, 8, descFNext, 1)
			r.PutDesc(1, 0x1000, 8, descFNext, 0)
		}, ErrChainLoop},
		{"self loop", func(r *testRing) { r.PutDesc(0, 0x1000, 8, descFNext, 0) }, ErrChainLoop},
		{"too long", func(r *testRing) {
			r.q.SetMaxChainLen(4096)
			r.PutDesc(0, 0x1000, 4000, descFNext, 1)
			r.PutDesc(1, 0x1000, 100, 0, 0)
		}, ErrChainTooLong},
		{"order", func(r *testRing) {
			r.PutDesc(0, 0x1000, 8, descFWrite|descFNext, 1)
			r.PutDesc(1, 0x1000, 8, 0, 0)
		}, ErrChainOrder},
		{"outside", func(r *testRing) { r.PutDesc(0, 0x20000, 8, 0, 0) }, ErrBadAddress},
		{"nested indirect", func(r *testRing) {
			putDesc(t, mem, table, 0, table, 16, descFIndirect, 0)
			r.PutDesc(0, table, 16, descFIndirect, 0)
		}, ErrChainIndirect},
		{"indirect with next", func(r *testRing) { r.PutDesc(0, table, 16, descFIndirect|descFNext, 1) }, ErrChainIndirect},
		{"indirect index", func(r *testRing) {
			putDesc(t, mem, table, 0, 0x1000, 8, descFNext, 1)
			r.PutDesc(0, table, 16, descFIndirect, 0)
		}, ErrChainIndex},
		{"indirect empty", func(r *testRing) { r.PutDesc(0, table, 0, descFIndirect, 0) }, ErrChainIndirect},
		{"indirect table crosses the end", func(r *testRing) { r.PutDesc(0, 0x20000-16, 32, descFIndirect, 0) }, ErrChainIndirect},
	}
	for _, c := range cases {
		r := newTestRing(t, mem, 8)
		c.setup(r)
		r.Publish(0)
		var ch Chain
		ok, err := r.q.Next(&ch)
		if ok || !errors.Is(err, c.want) {
			t.Errorf("%s: %v %v, want %v", c.name, ok, err, c.want)
			continue
		}
		if u, ok := r.Take(); !ok || u.ID != 0 || u.Len != 0 {
			t.Errorf("%s: not completed with length 0: %+v %v", c.name, u, ok)
		}
		if len(ch.readable)+len(ch.writable) != 0 {
			t.Errorf("%s: chain not emptied", c.name)
		}
		// the queue goes on
		r.PutDesc(1, 0x1000, 8, 0, 0)
		r.Publish(1)
		if ok, err := r.q.Next(&ch); !ok || err != nil {
			t.Errorf("%s: queue did not go on: %v", c.name, err)
		}
		clear(mem.regions[0].host[:0x4000])
	}
}

func TestQueueBrokenOnAvailJump(t *testing.T) {
	mem := testMemory(t, 0, 0x20000)
	r := newTestRing(t, mem, 8)
	r.Publish(0)
	r.CorruptAvailIdx(9) // more than the queue size ahead
	var c Chain
	if _, err := r.q.Next(&c); !errors.Is(err, ErrQueueBroken) {
		t.Fatal(err)
	}
	// Reported once: a caller that loops on errors must not spin.
	if ok, err := r.q.Next(&c); ok || err != nil || !r.q.Broken() {
		t.Fatalf("broken queue: %v %v broken %v", ok, err, r.q.Broken())
	}
}

func eventfd(t *testing.T) int {
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func readCount(fd int) uint64 {
	var b [8]byte
	if _, err := unix.Read(fd, b[:]); err != nil {
		return 0
	}
	return binary.LittleEndian.Uint64(b[:])
}

func TestNotifySuppression(t *testing.T) {
	mem := testMemory(t, 0, 0x20000)
	r := newTestRing(t, mem, 8)
	call := eventfd(t)
	// The queue owns its call fd and closes it; give it a dup.
	dup, _ := unix.Dup(call)
	r.q.setCall(dup)
	defer r.q.setCall(-1)
	var c Chain
	r.PutDesc(0, 0x1000, 8, 0, 0)
	roundTrip := func() {
		r.Publish(0)
		if ok, err := r.q.Next(&c); !ok || err != nil {
			t.Fatal(ok, err)
		}
		r.q.Push(&c, 0)
		r.Take()
	}

	// Without EVENT_IDX: notify unless NO_INTERRUPT.
	roundTrip()
	r.q.Notify()
	if readCount(call) != 1 {
		t.Error("no interrupt")
	}
	r.q.Notify()
	if readCount(call) != 0 {
		t.Error("interrupt with nothing pushed")
	}
	r.SetNoInterrupt(true)
	roundTrip()
	r.q.Notify()
	if readCount(call) != 0 {
		t.Error("interrupt despite NO_INTERRUPT")
	}
	r.q.Interrupt()
	if readCount(call) != 1 {
		t.Error("Interrupt did not raise the call fd")
	}
	r.SetNoInterrupt(false)

	// With EVENT_IDX: used_event decides; NO_INTERRUPT is ignored.
	r.q.eventIdx = true
	roundTrip() // used idx 3
	r.SetUsedEvent(2)
	r.q.Notify()
	if readCount(call) != 1 {
		t.Error("first notification with EVENT_IDX suppressed")
	}
	roundTrip() // used idx 4; driver asked for an interrupt after 10
	r.SetUsedEvent(10)
	r.q.Notify()
	if readCount(call) != 0 {
		t.Error("interrupt before used_event")
	}
	r.SetUsedEvent(4)
	roundTrip() // used idx 5 crosses used_event 4
	r.q.Notify()
	if readCount(call) != 1 {
		t.Error("no interrupt after crossing used_event")
	}
	// avail_event: written when the ring runs empty.
	if ok, _ := r.q.Next(&c); ok {
		t.Fatal("chain from an empty ring")
	}
	if got := r.AvailEvent(); got != r.AvailIdx() {
		t.Errorf("avail_event %d, want %d", got, r.AvailIdx())
	}
}

func TestDecodeFrontend(t *testing.T) {
	msg := func(req, flags, size uint32, payload []byte) []byte {
		b := make([]byte, 12+len(payload))
		binary.LittleEndian.PutUint32(b, req)
		binary.LittleEndian.PutUint32(b[4:], flags)
		binary.LittleEndian.PutUint32(b[8:], size)
		copy(b[12:], payload)
		return b
	}
	ok := []struct {
		raw []byte
		fds int
	}{
		{msg(ReqGetFeatures, 1, 0, nil), 0},
		{msg(ReqSetFeatures, 9, 8, make([]byte, 8)), 0},
		{msg(ReqSetVringKick, 1, 8, []byte{1, 0, 0, 0, 0, 0, 0, 0}), 1},
		{msg(ReqSetVringCall, 1, 8, []byte{1, 1, 0, 0, 0, 0, 0, 0}), 0},
		{msg(ReqSetMemTable, 9, 8+64, append([]byte{2, 0, 0, 0, 0, 0, 0, 0}, make([]byte, 64)...)), 2},
		{msg(ReqRemMemReg, 1, 40, make([]byte, 40)), 1},
		{msg(ReqRemMemReg, 1, 40, make([]byte, 40)), 0},
		{msg(ReqGetConfig, 1, 12+4, []byte{0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}), 0},
	}
	for i, c := range ok {
		if _, known, err := DecodeFrontend(c.raw, make([]int, c.fds)); err != nil || !known {
			t.Errorf("valid message %d refused: %v", i, err)
		}
	}
	bad := []struct {
		raw []byte
		fds int
	}{
		{msg(ReqGetFeatures, 1, 0, nil)[:11], 0},
		{msg(ReqSetFeatures, 1, 8, make([]byte, 4)), 0},
		{msg(ReqSetFeatures, 1, 4, make([]byte, 4)), 0},
		{msg(ReqSetVringKick, 1, 8, []byte{1, 0, 0, 0, 0, 0, 0, 0}), 0},
		{msg(ReqSetVringKick, 1, 8, []byte{1, 2, 0, 0, 0, 0, 0, 0}), 1},
		{msg(ReqSetMemTable, 1, 8+64, append([]byte{2, 0, 0, 0, 0, 0, 0, 0}, make([]byte, 64)...)), 1},
		{msg(ReqSetMemTable, 1, 8+64, append([]byte{9, 0, 0, 0, 0, 0, 0, 0}, make([]byte, 64)...)), 9},
		{msg(ReqSetMemTable, 1, 8, []byte{0, 0, 0, 0, 0, 0, 0, 0}), 0},
		{msg(ReqRemMemReg, 1, 40, make([]byte, 40)), 2},
		{msg(ReqGetConfig, 1, 12, []byte{0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0}), 0},
		{msg(ReqGetConfig, 1, 12+300, append([]byte{0, 0, 0, 0, 44, 1, 0, 0, 0, 0, 0, 0}, make([]byte, 300)...)), 0},
		{msg(ReqGetFeatures, 0, 0, nil), 0},
		{msg(ReqGetFeatures, 1|flagReply, 0, nil), 0},
		{msg(ReqGetFeatures, 1, 5000, nil), 0},
		{msg(ReqSetBackendReqFD, 1, 0, nil), 0},
	}
	for i, c := range bad {
		if _, _, err := DecodeFrontend(c.raw, make([]int, c.fds)); !errors.Is(err, ErrMalformed) {
			t.Errorf("bad message %d accepted: %v", i, err)
		}
	}
	if _, known, err := DecodeFrontend(msg(77, 1, 3, []byte{1, 2, 3}), nil); known || err != nil {
		t.Errorf("unknown request: known %v err %v", known, err)
	}
}

// TestBadChainLogRateLimited: a guest completing malformed chains in a loop
// cannot flood the host's log: the lines are rate-limited in time, not one
// per thousand chains, and a device reset does not renew the allowance.
func TestBadChainLogRateLimited(t *testing.T) {
	mem := testMemory(t, 0, 0x20000)
	r := newTestRing(t, mem, 16)
	logger, hook := logtest.NewNullLogger()
	r.q.log = logrus.NewEntry(logger)
	now := time.Unix(1700000000, 0)
	r.q.now = func() time.Time { return now } // no token comes back
	var c Chain
	const chains = 5000
	for i := range chains {
		if i == chains/2 {
			r.q.resetState()
			r.q.size = 16
			r.q.addrSet, r.q.enabled = true, true
			r.q.descAddr, r.q.availAddr, r.q.usedAddr = userAddr(t, mem, ringDescGPA), userAddr(t, mem, ringAvailGPA), userAddr(t, mem, ringUsedGPA)
			if err := r.q.translate(mem); err != nil {
				t.Fatal(err)
			}
			r.q.lastAvail, r.q.usedIdx = r.AvailIdx(), r.AvailIdx()
		}
		r.Publish(1000) // head out of range
		if ok, err := r.q.Next(&c); ok || !errors.Is(err, ErrChainIndex) {
			t.Fatalf("chain %d: ok %v err %v", i, ok, err)
		}
	}
	if n := len(hook.AllEntries()); n > logBurst {
		t.Fatalf("%d malformed chains gave %d log lines, want at most %d", chains, n, logBurst)
	}
}
