package ismvirtio

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
	fe "github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// countingBackend counts the HandleQueue calls of the request queue.
type countingBackend struct {
	*Backend
	calls atomic.Int64
}

func (c *countingBackend) HandleQueue(d *vhostuser.Guest, q *vhostuser.Queue) {
	if q.Index() == abi.RequestQueue {
		c.calls.Add(1)
	}
	c.Backend.HandleQueue(d, q)
}

// publishingPeer is a fabric device whose driver is the test: each event it
// gets (a SIGNAL from guest a) makes a publish one more request on its ring,
// as a guest that never lets its ring run empty does.
type publishingPeer struct {
	calls   *atomic.Int64
	publish func()
	total   int
	done    chan struct{}

	// mu: the test reads these while a's teardown (its cleanup) may post
	// the peer a GID-gone event.
	mu      sync.Mutex
	got     int
	perCall map[int64]int
}

func (p *publishingPeer) Interrupt() {}

func (p *publishingPeer) PostEvent(ev abi.Event) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got++
	p.perCall[p.calls.Load()]++
	if p.got < p.total {
		p.publish()
	} else if p.got == p.total {
		close(p.done)
	}
	return true
}

// TestRequestBatchBounded: a guest that keeps refilling its request ring
// must not keep one HandleQueue call (and with it the device lock its own
// control messages wait for) for ever: one call serves at most the work
// budget of chains, and the rest is served after the lock was let go.
func TestRequestBatchBounded(t *testing.T) {
	const gidP = 0xD000_0000_0000_000D
	backends := make(chan *countingBackend, 1)
	s := newWrappedFabricServer(t, map[string]uint64{"a": gidA}, func(b *Backend) vhostuser.Backend {
		cb := &countingBackend{Backend: b}
		backends <- cb
		return cb
	})
	a := s.connect("a")
	cb := <-backends
	ring := a.req.Size()
	sig := abi.Request{Op: abi.OpSignal, GID: gidP, Index: 1}
	sig.Encode(a.hdr)
	head := a.req.AddChain([]fe.Buf{
		{GPA: a.hdrGPA, Len: abi.RequestSize},
		{GPA: a.respGPA, Len: abi.ResponseSize, Write: true},
	})
	var mu sync.Mutex // the VQ's own state is not shared memory
	publish := func() {
		mu.Lock()
		a.req.Publish(head)
		mu.Unlock()
	}
	peer := &publishingPeer{
		calls:   &cb.calls,
		publish: publish,
		total:   3 * int(ring),
		perCall: map[int64]int{},
		done:    make(chan struct{}),
	}
	mem, err := ism.NewSliceMemory(ism.Region{GPA: 0, Data: make([]byte, 4096)})
	if err != nil {
		t.Fatal(err)
	}
	pd, err := s.fabric.Connect("peer", gidP, mem, peer)
	if err != nil {
		t.Fatal(err)
	}
	// a may signal the peer (a DMB between them), as fast as it likes.
	if _, err := pd.RegisterDMB(0, 4096, gidA, 0); err != nil {
		t.Fatal(err)
	}
	s.fabric.SetLimits(ism.Limits{SignalBurst: 1 << 20})
	publish()
	if err := a.req.Kick(); err != nil {
		t.Fatal(err)
	}
	for range peer.total {
		if _, err := a.req.WaitUsed(); err != nil {
			t.Fatal(err)
		}
	}
	<-peer.done
	peer.mu.Lock()
	defer peer.mu.Unlock()
	for call, n := range peer.perCall {
		if n > DefaultBatchChains {
			t.Fatalf("HandleQueue call %d served %d requests, budget %d", call, n, DefaultBatchChains)
		}
	}
	if len(peer.perCall) < 3 {
		t.Fatalf("%d requests in %d HandleQueue calls", peer.total, len(peer.perCall))
	}
}

// TestGuestWarningsRateLimited: a guest that sends request chains without
// room for a response (or too small event buffers) cannot flood the host's
// log: one line per chain was logged before.
func TestGuestWarningsRateLimited(t *testing.T) {
	logger, hook := logtest.NewNullLogger()
	s := newWrappedFabricServer(t, map[string]uint64{"a": gidA}, func(b *Backend) vhostuser.Backend {
		b.log = logrus.NewEntry(logger)
		now := time.Unix(1700000000, 0)
		b.now = func() time.Time { return now } // no token comes back
		return b
	})
	a := s.connect("a")
	const chains = 100
	for range chains {
		head := a.req.AddChain([]fe.Buf{{GPA: a.hdrGPA, Len: abi.RequestSize}})
		if _, n := a.submit(head); n != 0 {
			t.Fatalf("chain without response room: used len %d", n)
		}
	}
	warns := 0
	for _, e := range hook.AllEntries() {
		if e.Level <= logrus.WarnLevel {
			warns++
		}
	}
	if warns > logBurst {
		t.Fatalf("%d bad chains gave %d warnings, want at most %d", chains, warns, logBurst)
	}
	if warns == 0 {
		t.Fatal("no warning at all")
	}
	// The device still serves good requests.
	if st := a.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusOK {
		t.Fatalf("QUERY_RGID after the bad chains: %v", st)
	}
}

// TestEventQueueFaultDoesNotHang: when a front-end shrinks its guest RAM
// under the mapping, the fault in the event-queue flush closes that VM's
// connection (a recovered panic); the event lock must not stay held, or the
// teardown (Stop takes it under the device's lock) hangs, and with it every
// peer posting an event to the VM.
func TestEventQueueFaultDoesNotHang(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	b.register(4096, gidA, 0) // A may signal B
	// An event for B with no buffer posted: it is held.
	if st := a.do(abi.Request{Op: abi.OpSignal, GID: gidB, Index: 7}, nil).Status; st != abi.StatusOK {
		t.Fatalf("SIGNAL: %v", st)
	}
	gpa, _, err := b.mem.Alloc(abi.EventSize, 8)
	if err != nil {
		t.Fatal(err)
	}
	b.ev.Publish(b.ev.AddChain([]fe.Buf{{GPA: gpa, Len: abi.EventSize, Write: true}}))
	for _, r := range b.mem.Regions {
		if err := unix.Ftruncate(r.FD, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.ev.Kick(); err != nil { // the flush faults on B's rings
		t.Fatal(err)
	}
	// B's connection goes away; A goes on being served.
	for range 3 {
		if st := a.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusOK {
			t.Fatalf("QUERY_RGID: %v", st)
		}
	}
	for s.server.Guest("b") != nil {
		if st := a.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusOK {
			t.Fatalf("QUERY_RGID: %v", st)
		}
	}
}

// TestEventFaultClosesOnlyTheReceiver: A signals B after B's front-end
// shrank B's memory with an event buffer posted, so the delivery (on A's
// goroutine) faults in B's rings. That is B's problem: B's connection
// closes, A's goes on and its SIGNAL is answered.
func TestEventFaultClosesOnlyTheReceiver(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	b.register(4096, gidA, 0) // A may signal B
	gpa, _, err := b.mem.Alloc(abi.EventSize, 8)
	if err != nil {
		t.Fatal(err)
	}
	b.ev.Publish(b.ev.AddChain([]fe.Buf{{GPA: gpa, Len: abi.EventSize, Write: true}}))
	for _, r := range b.mem.Regions {
		if err := unix.Ftruncate(r.FD, 0); err != nil {
			t.Fatal(err)
		}
	}
	// The fault happens on A's goroutine; A gets its answer.
	a.do(abi.Request{Op: abi.OpSignal, GID: gidB, Index: 7}, nil)
	if !b.fe.WaitClosed() {
		t.Fatal("B's connection not closed after the fault in its memory")
	}
	if st := a.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusOK {
		t.Fatalf("A after B's fault: %v", st)
	}
}

// vmStats is VM name's counters in the fabric's statistics.
func vmStats(t *testing.T, s *fabricServer, name string) ism.Stats {
	t.Helper()
	for _, d := range s.fabric.DeviceStats() {
		if d.Name == name {
			return d.Stats
		}
	}
	t.Fatalf("no statistics for VM %s", name)
	return ism.Stats{}
}

// TestBadChainsCounted: malformed request chains (no room for a response,
// a header outside guest RAM) and a broken request queue are counted per
// VM, so the stats file can show what a hostile guest tried; a well-formed
// request counts nothing.
func TestBadChainsCounted(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA})
	a := s.connect("a")
	if st := a.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusOK {
		t.Fatalf("QUERY_RGID: %v", st)
	}
	if got := vmStats(t, s, "a"); got.BadChains != 0 || got.QueuesBroken != 0 {
		t.Fatalf("after a good request: %d bad chains, %d broken queues", got.BadChains, got.QueuesBroken)
	}
	for _, bufs := range [][]fe.Buf{
		{{GPA: a.hdrGPA, Len: abi.RequestSize}},
		{{GPA: 1 << 50, Len: abi.RequestSize}, {GPA: a.respGPA, Len: abi.ResponseSize, Write: true}},
	} {
		if _, n := a.submit(a.req.AddChain(bufs)); n != 0 {
			t.Fatalf("malformed chain %+v: used len %d", bufs, n)
		}
	}
	// A chain vhostuser refuses is completed inside Queue.Next, and
	// ismvirtio counts it after Next returns: the completion can be seen
	// first. The count is the state to wait for (bounded by go test's
	// -timeout); then it must be exactly 2.
	for vmStats(t, s, "a").BadChains < 2 {
		time.Sleep(time.Millisecond)
	}
	if got := vmStats(t, s, "a"); got.BadChains != 2 || got.QueuesBroken != 0 {
		t.Fatalf("after 2 malformed chains: %d bad chains, %d broken queues", got.BadChains, got.QueuesBroken)
	}
	a.req.CorruptAvailIdx(a.req.Size() + 1)
	if err := a.req.Kick(); err != nil {
		t.Fatal(err)
	}
	// Nothing completes on a broken queue: the counter is the state to
	// wait for (bounded by go test's -timeout).
	for vmStats(t, s, "a").QueuesBroken == 0 {
		time.Sleep(time.Millisecond)
	}
	if got := vmStats(t, s, "a"); got.BadChains != 2 || got.QueuesBroken != 1 {
		t.Fatalf("after the jump: %d bad chains, %d broken queues", got.BadChains, got.QueuesBroken)
	}
}
