package ismvirtio

import (
	"encoding/binary"
	"sync/atomic"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/vhostuser"
	fe "github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// A ring full of requests, kicked once, is served in batches of the work
// budget: every chain is completed exactly once, in order, with no kick
// after the first (the queue goes on by itself after each batch).
func TestBatchBudgetLosesNoChain(t *testing.T) {
	const budget, n = 3, 200
	var bBackend atomic.Pointer[countingBackend] // set on b's Serve goroutine
	s := newWrappedFabricServer(t, map[string]uint64{"a": gidA, "b": gidB}, func(be *Backend) vhostuser.Backend {
		be.opts.BatchChains = budget
		if be.name == "b" {
			cb := &countingBackend{Backend: be}
			bBackend.Store(cb)
			return cb
		}
		return be
	})
	a, b := s.connect("a"), s.connectQueueSize("b", 1024)
	token, dst := a.register(n*8, gidB, 0)

	hdrGPA, hdrs, err := b.mem.Alloc(n*abi.RequestSize, 8)
	if err != nil {
		t.Fatal(err)
	}
	dataGPA, data, err := b.mem.Alloc(n*8, 8)
	if err != nil {
		t.Fatal(err)
	}
	respGPA, resps, err := b.mem.Alloc(n*abi.ResponseSize, 8)
	if err != nil {
		t.Fatal(err)
	}
	heads := make([]uint16, n)
	for i := range n {
		binary.LittleEndian.PutUint64(data[8*i:], uint64(i)+1)
		r := abi.Request{Op: abi.OpMove, Token: token, Offset: uint64(8 * i), Len: 8}
		r.Encode(hdrs[i*abi.RequestSize:])
		heads[i] = b.req.AddChain([]fe.Buf{
			{GPA: hdrGPA + uint64(i*abi.RequestSize), Len: abi.RequestSize},
			{GPA: dataGPA + uint64(8*i), Len: 8},
			{GPA: respGPA + uint64(i*abi.ResponseSize), Len: abi.ResponseSize, Write: true},
		})
	}
	b.req.Publish(heads...)
	if err := b.req.Kick(); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		u, err := b.req.WaitUsed()
		if err != nil {
			t.Fatalf("chain %d of %d: %v", i, n, err)
		}
		if u.ID != heads[i] || u.Len != abi.ResponseSize {
			t.Fatalf("used %d: %+v, want id %d len %d", i, u, heads[i], abi.ResponseSize)
		}
	}
	if u, ok := b.req.PollUsed(); ok {
		t.Fatalf("a chain completed twice: %+v", u)
	}
	for i := range n {
		if r, _ := abi.DecodeResponse(resps[i*abi.ResponseSize:]); r.Status != abi.StatusOK {
			t.Fatalf("MOVE %d: %v", i, r.Status)
		}
		if got := binary.LittleEndian.Uint64(dst[8*i:]); got != uint64(i)+1 {
			t.Fatalf("DMB word %d is %d, want %d", i, got, i+1)
		}
	}
	if c := bBackend.Load().calls.Load(); c < n/budget {
		t.Fatalf("%d chains in %d HandleQueue calls: the budget of %d was not kept", n, c, budget)
	}
	// The device is idle again and asks for a kick at the next request.
	if got := b.req.AvailEvent(); got != b.req.AvailIdx() {
		t.Fatalf("avail event %d, want %d (the ring seen empty)", got, b.req.AvailIdx())
	}
	if st := b.move(token, 0, []byte("after"), false); st != abi.StatusOK {
		t.Fatalf("MOVE after the batches: %v", st)
	}
}

// B's MOVEs into A go on while A's front-end keeps replacing A's memory
// table: each MOVE copies through the table it acquired, whose mappings
// stay until it is released, so none faults, none is refused, and the data
// lands in A's RAM (the same memory files, mapped anew).
func TestMovesBesideReceiversMemTableChurn(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	token, dst := a.register(4096, gidB, 0)
	stop, churned := make(chan struct{}), make(chan error, 1)
	swaps := 0
	go func() {
		for {
			select {
			case <-stop:
				churned <- nil
				return
			default:
			}
			if err := a.fe.SetMemTable(); err != nil {
				churned <- err
				return
			}
			swaps++
		}
	}()
	msg := make([]byte, 64)
	for i := range 500 {
		binary.LittleEndian.PutUint64(msg, uint64(i))
		if st := b.move(token, 0, msg, false); st != abi.StatusOK {
			t.Fatalf("MOVE %d beside A's table churn: %v", i, st)
		}
		if got := binary.LittleEndian.Uint64(dst); got != uint64(i) {
			t.Fatalf("MOVE %d: A's DMB holds %d", i, got)
		}
	}
	close(stop)
	if err := <-churned; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d memory tables swapped beside 500 MOVEs", swaps)
}
