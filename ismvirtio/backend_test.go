package ismvirtio

import (
	"bytes"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
	fe "github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
	"github.com/ism-backend/ism-backend/virtq"
)

const (
	gidA = 0xA000_0000_0000_000A
	gidB = 0xB000_0000_0000_000B
	gidC = 0xC000_0000_0000_000C
)

func TestConfigSpace(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA})
	a := s.connect("a")
	if a.cfg.GID != gidA || a.cfg.CHID != abi.DefaultCHID || a.cfg.Modes&abi.ModeCopy == 0 {
		t.Fatalf("config %+v", a.cfg)
	}
	if a.cfg.MaxDMBs != abi.MaxDMBs || a.cfg.MaxDMBSize != abi.MaxDMBSize {
		t.Fatalf("limits %+v", a.cfg)
	}
}

// TestMoveIntoPeerDMB is the copy-mode data path end to end: B writes a
// seeded pattern into A's 1 MiB DMB in pieces of 1 B to 64 KiB at varied
// offsets, each signalled; A's guest RAM must hold exactly those bytes.
func TestMoveIntoPeerDMB(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	sba := a.setSBA()
	const idx = 77
	token, dmb := a.register(1<<20, gidB, idx)

	model := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	sizes := []int{1, 2, 3, 7, 8, 63, 64, 65, 511, 4096, 4097, 12345, 32 << 10, 64<<10 - 1, 64 << 10}
	piece := make([]byte, 64<<10)
	for round := 0; round < 4; round++ {
		for _, n := range sizes {
			off := rng.IntN(len(model) - n + 1)
			if round == 0 {
				off = len(model) - n // the very end of the DMB
			}
			for i := range piece[:n] {
				piece[i] = byte(rng.Uint32())
			}
			if st := b.move(token, uint64(off), piece[:n], true); st != abi.StatusOK {
				t.Fatalf("MOVE %d bytes at %d: %v", n, off, st)
			}
			copy(model[off:], piece[:n])
		}
	}
	if !bytes.Equal(dmb, model) {
		i := 0
		for dmb[i] == model[i] {
			i++
		}
		t.Fatalf("A's DMB differs from what B sent, first at byte %d", i)
	}
	signals := uint32(4 * len(sizes))
	if sbaSeq(sba, idx) != signals || sbaDMBE(sba, idx, 0) != uint16(signals) {
		t.Fatalf("SBA seq %d DMBE 0 count %d, want %d", sbaSeq(sba, idx), sbaDMBE(sba, idx, 0), signals)
	}
	if sbaSeq(sba, idx+1) != 0 || sbaSeq(sba, idx-1) != 0 {
		t.Fatal("neighbouring SBA counters moved")
	}
}

// TestMoveDataAcrossRegions: the sender's data crosses a boundary between two
// memory regions of its guest RAM, so it arrives as two segments.
func TestMoveDataAcrossRegions(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	a.setSBA()
	token, dmb := a.register(64<<10, gidB, 1)

	want := bytes.Repeat([]byte("cross-region "), 1000)
	gpa, err := b.mem.AllocAcross(0, 5000, uint64(len(want)))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.mem.Write(gpa, want); err != nil {
		t.Fatal(err)
	}
	r := abi.Request{Op: abi.OpMove, Token: token, Offset: 100, Len: uint64(len(want))}
	r.Encode(b.hdr)
	head := b.req.AddChain([]fe.Buf{
		{GPA: b.hdrGPA, Len: abi.RequestSize},
		{GPA: gpa, Len: uint32(len(want))},
		{GPA: b.respGPA, Len: abi.ResponseSize, Write: true},
	})
	if resp, n := b.submit(head); n != abi.ResponseSize || resp.Status != abi.StatusOK {
		t.Fatalf("MOVE across regions: len %d status %v", n, resp.Status)
	}
	if !bytes.Equal(dmb[100:100+len(want)], want) {
		t.Fatal("data that crossed a region boundary arrived wrong")
	}
}

// TestRefusedRequests: each hostile request gets its error status, changes
// nothing, and the backend goes on serving both this VM and another.
func TestRefusedRequests(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB, "c": gidC})
	a, b, c := s.connect("a"), s.connect("b"), s.connect("c")
	a.setSBA()
	token, dmb := a.register(1<<20, gidB, 3)
	fill := bytes.Repeat([]byte{0xEE}, 16)

	stillWorks := func(when string) {
		t.Helper()
		if st := b.move(token, 0, []byte("ok"), true); st != abi.StatusOK {
			t.Fatalf("after %s: B's valid MOVE got %v", when, st)
		}
		if string(dmb[:2]) != "ok" {
			t.Fatalf("after %s: valid MOVE did not land", when)
		}
		dmb[0], dmb[1] = 0, 0
	}

	cases := []struct {
		name string
		from *guest
		req  abi.Request
		data []byte
		want abi.Status
	}{
		{"unknown token", b, abi.Request{Op: abi.OpMove, Token: token ^ 1, Len: 16}, fill, abi.StatusNoEntry},
		{"wrong rgid", c, abi.Request{Op: abi.OpMove, Token: token, Len: 16}, fill, abi.StatusPermission},
		{"past the end", b, abi.Request{Op: abi.OpMove, Token: token, Offset: 1<<20 - 15, Len: 16}, fill, abi.StatusRange},
		{"offset overflow", b, abi.Request{Op: abi.OpMove, Token: token, Offset: math.MaxUint64 - 7, Len: 16}, fill, abi.StatusRange},
		{"len differs from data", b, abi.Request{Op: abi.OpMove, Token: token, Len: 17}, fill, abi.StatusInvalid},
		{"unknown op", b, abi.Request{Op: 999}, nil, abi.StatusUnsupported},
		{"unregister someone else's DMB", b, abi.Request{Op: abi.OpUnregisterDMB, Token: token}, nil, abi.StatusPermission},
		{"DMB outside guest RAM", b, abi.Request{Op: abi.OpRegisterDMB, Addr: 1 << 40, Len: 4096, GID: gidA, Index: 1}, nil, abi.StatusFault},
		{"DMB index over the limit", b, abi.Request{Op: abi.OpRegisterDMB, Addr: 0, Len: 4096, GID: gidA, Index: abi.MaxDMBs}, nil, abi.StatusRange},
		{"SIGNAL to nobody", b, abi.Request{Op: abi.OpSignal, GID: 0x1234}, nil, abi.StatusNoEntry},
		{"QUERY_RGID of nobody", b, abi.Request{Op: abi.OpQueryRGID, GID: 0x1234}, nil, abi.StatusNoEntry},
	}
	for _, tc := range cases {
		if got := tc.from.do(tc.req, tc.data).Status; got != tc.want {
			t.Errorf("%s: status %v, want %v", tc.name, got, tc.want)
		}
		if bytes.Contains(dmb, fill[:4]) {
			t.Fatalf("%s: refused request wrote into the DMB", tc.name)
		}
		stillWorks(tc.name)
	}
	if st := b.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusOK {
		t.Fatalf("QUERY_RGID of a live peer: %v", st)
	}
}

// TestMalformedChains: chains that cannot be trusted are completed with used
// len 0 and the queue goes on.
func TestMalformedChains(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	a.setSBA()
	token, dmb := a.register(4096, gidB, 0)
	good := abi.Request{Op: abi.OpMove, Token: token, Len: 4}

	chains := []struct {
		name  string
		build func() uint16
	}{
		{"address outside guest RAM", func() uint16 {
			return b.req.AddChain([]fe.Buf{{GPA: b.mem.End() + 4096, Len: abi.RequestSize}, {GPA: b.respGPA, Len: abi.ResponseSize, Write: true}})
		}},
		{"address wrapping around", func() uint16 {
			return b.req.AddChain([]fe.Buf{{GPA: math.MaxUint64 - 8, Len: abi.RequestSize}, {GPA: b.respGPA, Len: abi.ResponseSize, Write: true}})
		}},
		{"descriptor loop", func() uint16 {
			return b.req.AddRaw(virtq.Desc{Addr: b.hdrGPA, Len: abi.RequestSize, Next: 1}, virtq.Desc{Addr: b.hdrGPA, Len: abi.RequestSize, Next: 0})
		}},
		{"next index out of range", func() uint16 {
			// Outside the free list: every chain before came back, so
			// descriptor 0 is free.
			b.req.PutDesc(0, b.hdrGPA, abi.RequestSize, virtq.DescFNext, b.req.Size()+5)
			return 0
		}},
		{"oversized chain", func() uint16 {
			// 4 GiB readable: more than RAM, more than any chain may be
			return b.req.AddRaw(virtq.Desc{Addr: 0, Len: math.MaxUint32, Next: -1})
		}},
	}
	for _, tc := range chains {
		good.Encode(b.hdr)
		if _, n := b.submit(tc.build()); n != 0 {
			t.Errorf("%s: used len %d, want 0", tc.name, n)
		}
		if st := b.move(token, 0, []byte("fine"), false); st != abi.StatusOK {
			t.Fatalf("after %s: valid MOVE got %v", tc.name, st)
		}
		if string(dmb[:4]) != "fine" {
			t.Fatalf("after %s: valid MOVE did not land", tc.name)
		}
		clear(dmb[:4])
	}
	// A chain without room for a response gets no response.
	r := abi.Request{Op: abi.OpQueryRGID, GID: gidA}
	r.Encode(b.hdr)
	if _, n := b.submit(b.req.AddChain([]fe.Buf{{GPA: b.hdrGPA, Len: abi.RequestSize}})); n != 0 {
		t.Errorf("chain without response buffer: used len %d", n)
	}
	// A short header gets INVALID.
	if resp, n := b.submit(b.req.AddChain([]fe.Buf{{GPA: b.hdrGPA, Len: 10}, {GPA: b.respGPA, Len: abi.ResponseSize, Write: true}})); n != abi.ResponseSize || resp.Status != abi.StatusInvalid {
		t.Errorf("short header: len %d status %v", n, resp.Status)
	}
}

// TestMalformedMessageClosesOnlyThatVM: a broken vhost-user message closes the
// sender's connection; the other VM's device keeps working, and the closed
// VM's DMBs are gone.
func TestMalformedMessageClosesOnlyThatVM(t *testing.T) {
	msgs := []struct {
		name string
		send func(g *guest) error
	}{
		{"truncated message", func(g *guest) error {
			// Header says 8 bytes of payload, 3 arrive before the writer goes away.
			return g.fe.SendRaw(fe.RawMessage(vhostuser.ReqSetVringNum, fe.FlagVersion, 8, []byte{0, 0, 0}), nil)
		}},
		{"wrong fd count", func(g *guest) error {
			// SET_VRING_KICK carries one fd; send two.
			payload := make([]byte, 8)
			return g.fe.SendRaw(fe.RawMessage(vhostuser.ReqSetVringKick, fe.FlagVersion, 8, payload), []int{g.req.KickFD, g.req.CallFD})
		}},
		{"payload size wrong for request", func(g *guest) error {
			return g.fe.SendRaw(fe.RawMessage(vhostuser.ReqSetVringNum, fe.FlagVersion, 4, []byte{1, 2, 3, 4}), nil)
		}},
	}
	for _, m := range msgs {
		t.Run(m.name, func(t *testing.T) {
			s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
			a, b := s.connect("a"), s.connect("b")
			a.setSBA()
			b.setSBA()
			tokenA, dmbA := a.register(4096, gidB, 0)
			tokenB, _ := b.register(4096, gidA, 0)
			_, evBuf := a.postEventBuffer()

			if err := m.send(b); err != nil {
				t.Fatal(err)
			}
			if m.name == "truncated message" {
				b.fe.Conn().CloseWrite()
			}
			if !b.fe.WaitClosed() {
				t.Fatal("backend kept the connection of the VM that sent a malformed message")
			}
			if ev := a.waitEvent(evBuf); ev.Type != abi.EventGID || ev.GID != gidB {
				t.Fatalf("A got event %+v, want GID-gone for B", ev)
			}
			if st := a.move(tokenB, 0, []byte("x"), false); st != abi.StatusNoEntry {
				t.Fatalf("MOVE to the dead VM's DMB: %v, want NOENTRY", st)
			}
			// A is unaffected, and B can come back on the same socket.
			b2 := s.connect("b")
			b2.setSBA()
			if st := b2.move(tokenA, 0, []byte("back"), true); st != abi.StatusOK {
				t.Fatalf("reconnected B's MOVE: %v", st)
			}
			if string(dmbA[:4]) != "back" {
				t.Fatal("reconnected B's MOVE did not land")
			}
		})
	}
}

// TestResetDropsDMBs: a guest reset (status 0) kills its DMBs, and the device
// works again after the next start.
func TestResetDropsDMBs(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	a.setSBA()
	token, _ := a.register(4096, gidB, 0)
	if err := a.fe.SetStatus(0); err != nil {
		t.Fatal(err)
	}
	if st := b.move(token, 0, []byte("x"), false); st != abi.StatusNoEntry {
		t.Fatalf("MOVE after owner reset: %v, want NOENTRY", st)
	}
	if st := b.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusNoEntry {
		t.Fatalf("QUERY_RGID of a reset device: %v", st)
	}
}

// TestSignalEvent: SIGNAL reaches the peer's event queue as a software event,
// also when the peer posts its buffer only afterwards.
func TestSignalEvent(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	a.register(4096, gidB, 0) // B may signal A: a DMB between them
	if st := b.do(abi.Request{Op: abi.OpSignal, GID: gidA, Index: 0x83, Offset: 42}, nil).Status; st != abi.StatusOK {
		t.Fatalf("SIGNAL: %v", st)
	}
	_, buf := a.postEventBuffer()
	ev := a.waitEvent(buf)
	if ev.Type != abi.EventSWR || ev.GID != gidB || ev.Code != 0x83 || ev.Info != 42 {
		t.Fatalf("event %+v", ev)
	}
}

// TestIntraVM: a DMB whose rgid is its owner's own GID (both SMC-D ends in
// one guest) accepts the owner's MOVEs.
func TestIntraVM(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA})
	a := s.connect("a")
	sba := a.setSBA()
	token, dmb := a.register(8192, gidA, 5)
	if st := a.move(token, 4096, []byte("self"), true); st != abi.StatusOK {
		t.Fatalf("intra-VM MOVE: %v", st)
	}
	if string(dmb[4096:4100]) != "self" || sbaSeq(sba, 5) != 1 {
		t.Fatal("intra-VM MOVE did not land or signal")
	}
}

// TestThrottleFault: a VM whose queue is throttled to one chain a second
// still gets every request served (the queue is woken when the next chain
// may be taken), and the chains held back are counted; its peer is not
// throttled.
func TestThrottleFault(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	if _, err := s.fabric.SetFault(ism.FaultSpec{Kind: ism.FaultThrottle, VM: "a", Rate: 1}, "test"); err != nil {
		t.Fatal(err)
	}
	const n = 4
	for range n {
		if r := a.do(abi.Request{Op: abi.OpQueryRGID, GID: gidB}, nil); r.Status != abi.StatusOK {
			t.Fatalf("QUERY_RGID under throttle: %v", r.Status)
		}
	}
	for range 3 * n {
		if r := b.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil); r.Status != abi.StatusOK {
			t.Fatalf("b's QUERY_RGID: %v", r.Status)
		}
	}
	var held, heldB uint64
	for _, d := range s.fabric.DeviceStats() {
		switch d.Name {
		case "a":
			held = d.Stats.Faults[ism.FaultThrottle]
		case "b":
			heldB = d.Stats.Faults[ism.FaultThrottle]
		}
	}
	// n requests one after another at one a second: a request that came
	// within a second of the one before waited (at least one of the n-1).
	if held == 0 || held > n-1 || heldB != 0 {
		t.Errorf("chains held back: a %d (want 1..%d), b %d", held, n-1, heldB)
	}
}
