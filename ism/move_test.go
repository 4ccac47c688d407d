package ism

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

// snapshot copies a guest's whole RAM.
func (g *guest) snapshot() (low, high []byte) {
	return bytes.Clone(g.low), bytes.Clone(g.high)
}

// TestMovePattern moves a seeded pattern from B into A's 1 MiB DMB in pieces
// of 1 B to 64 KiB at varied offsets, split into varied data segments, and
// compares A's RAM with an independent model: the DMB holds exactly the bytes
// moved, and nothing else in A's RAM changed but the SBA words of the DMB.
func TestMovePattern(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	setSBA(t, a.dev, sbaGPA, true)
	const size = 1 << 20
	const index = 1000
	tok := register(t, a.dev, dmbGPA, size, b.dev.GID(), index)

	// A's RAM is prefilled so that a write of zeros would show too.
	for i := range a.high {
		a.high[i] = byte(i*7 + 3)
	}
	wantLow, wantHigh := a.snapshot()
	model := wantHigh[dmbGPA-highGPA : dmbGPA-highGPA+size]

	rng := rand.New(rand.NewPCG(1, 2))
	sizes := []int{1, 2, 3, 7, 8, 31, 64, 100, 511, 4096, 4097, 65535, 65536}
	var dmbeCounts [abi.MaxDMBEs]int
	for i := range 400 {
		n := sizes[i%len(sizes)]
		if i >= len(sizes) {
			n = 1 + rng.IntN(64<<10)
		}
		var off int
		switch i % 4 {
		case 0:
			off = 0
		case 1:
			off = size - n // flush with the end
		default:
			off = rng.IntN(size - n + 1)
		}
		src := make([]byte, n)
		for j := range src {
			src[j] = byte(rng.Uint32())
		}
		// Split into up to 4 segments, some possibly empty.
		var segs [][]byte
		rest := src
		for k := rng.IntN(4); k > 0 && len(rest) > 0; k-- {
			c := rng.IntN(len(rest) + 1)
			segs, rest = append(segs, rest[:c]), rest[c:]
		}
		segs = append(segs, rest)
		dmbe := uint32(rng.IntN(abi.MaxDMBEs))
		dmbeCounts[dmbe]++
		do(t, b.dev, move(tok, dmbe, uint64(off), n, true), segs, abi.StatusOK)
		copy(model[off:], src)
	}

	// The SBA counters the MOVEs count up, in the model.
	sbaOff := sbaGPA - lowGPA
	for e, n := range dmbeCounts {
		for range n {
			modelSignal(wantLow[sbaOff:], index, uint32(e))
		}
	}

	if !bytes.Equal(a.high, wantHigh) {
		t.Errorf("A's high RAM differs from the model at %d", firstDiff(a.high, wantHigh))
	}
	if !bytes.Equal(a.low, wantLow) {
		t.Errorf("A's low RAM (SBA) differs from the model at %d", firstDiff(a.low, wantLow))
	}
	if got := a.sbaSeq(t, sbaGPA, index); got != 400 {
		t.Errorf("SBA seq %d, want 400", got)
	}
	// One interrupt per signal: nothing the driver writes coalesces them.
	if n, _ := a.n.snapshot(); n != 400 {
		t.Errorf("%d interrupts, want 400", n)
	}
	s := b.dev.Stats()
	if s.Moves != 400 || s.Signals != 400 || s.RefusedTotal() != 0 {
		t.Errorf("B stats %+v", s)
	}
}

// TestSignalCounters: each signal counts up its DMBE, its DMB, its group and
// the sum, raises one interrupt if asked for, and nothing the driver could
// write (it writes nothing) changes that.
func TestSignalCounters(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	setSBA(t, a.dev, sbaGPA, true)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 3)
	tok2 := register(t, a.dev, dmbGPA+8192, 4096, 0xB, 70)
	one := [][]byte{{1}}
	do(t, b.dev, move(tok, 0, 0, 1, true), one, abi.StatusOK)
	do(t, b.dev, move(tok, 1, 0, 1, true), one, abi.StatusOK)
	do(t, b.dev, move(tok, 1, 0, 1, false), one, abi.StatusOK) // no signal: counts nothing
	do(t, b.dev, move(tok, 1, 0, 0, true), nil, abi.StatusOK)  // len 0 signals too
	do(t, b.dev, move(tok2, 31, 0, 0, true), nil, abi.StatusOK)
	if n, _ := a.n.snapshot(); n != 4 {
		t.Fatalf("%d interrupts, want 4", n)
	}
	want := make([]byte, abi.SBASize)
	for _, s := range []struct{ i, e uint32 }{{3, 0}, {3, 1}, {3, 1}, {70, 31}} {
		modelSignal(want, s.i, s.e)
	}
	if got := a.at(t, sbaGPA, abi.SBASize); !bytes.Equal(got, want) {
		t.Fatalf("SBA differs from the model at byte %d", firstDiff(got, want))
	}
	// Without interrupts asked for, signals only count.
	setSBA(t, a.dev, sbaGPA, false)
	do(t, b.dev, move(tok, 4, 0, 1, true), one, abi.StatusOK)
	if n, _ := a.n.snapshot(); n != 4 || a.sbaSeq(t, sbaGPA, 3) != 4 || a.sbaDMBE(t, sbaGPA, 3, 4) != 1 {
		t.Fatalf("%d interrupts with interrupts off, seq %d", n, a.sbaSeq(t, sbaGPA, 3))
	}
}

// Both ends of an SMC-D connection in one guest: rgid is the owner's own GID.
func TestIntraVM(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	setSBA(t, a.dev, sbaGPA, true)
	tok := register(t, a.dev, dmbGPA, 4096, 0xA, 0)
	do(t, a.dev, move(tok, 0, 10, 3, true), [][]byte{[]byte("abc")}, abi.StatusOK)
	if got := a.at(t, dmbGPA+10, 3); string(got) != "abc" {
		t.Fatalf("DMB %q", got)
	}
	do(t, a.dev, abi.Request{Op: abi.OpQueryRGID, GID: 0xA}, nil, abi.StatusOK)
	do(t, a.dev, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 0x83, Offset: 9}, nil, abi.StatusOK)
	a.dev.Disconnect()
	if _, evs := a.n.snapshot(); len(evs) != 1 || evs[0].Type != abi.EventSWR {
		t.Fatalf("events %+v: want only the SWR, no EventGID about itself", evs)
	}
}

func TestSignalEvent(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	register(t, a.dev, dmbGPA, 4096, 0xB, 0) // B may signal A: a DMB between them
	do(t, b.dev, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 0x80, Offset: 0x1234}, nil, abi.StatusOK)
	_, evs := a.n.snapshot()
	want := abi.Event{Type: abi.EventSWR, Code: 0x80, GID: 0xB, Info: 0x1234}
	if len(evs) != 1 || evs[0] != want {
		t.Fatalf("events %+v, want %+v", evs, want)
	}
	if s := b.dev.Stats(); s.SWEvents != 1 {
		t.Fatalf("stats %+v", s)
	}
	if s := a.dev.Stats(); s.Events != 1 {
		t.Fatalf("stats %+v", s)
	}
}

func TestDisconnectEvents(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	c := newGuest(t, f, "c", 0xC)
	d := newGuest(t, f, "d", 0xD)
	setSBA(t, a.dev, sbaGPA, true)
	tokAB := register(t, a.dev, dmbGPA, 4096, 0xB, 0) // B may write A's DMB
	register(t, a.dev, dmbGPA+4096, 4096, 0xB, 1)     // a second one: still one event
	tokCA := register(t, c.dev, dmbGPA, 4096, 0xA, 0) // A may write C's DMB
	tokDD := register(t, d.dev, dmbGPA, 4096, 0xD, 0) // unrelated
	if s := f.Stats(); s.DMBs != 4 || s.Devices != 4 {
		t.Fatalf("fabric stats %+v", s)
	}

	a.dev.Disconnect()
	a.dev.Disconnect() // idempotent

	for _, c := range []struct {
		g    *guest
		want int
	}{{b, 1}, {c, 1}, {d, 0}} {
		_, evs := c.g.n.snapshot()
		if len(evs) != c.want {
			t.Fatalf("%s got %d events %+v, want %d", c.g.dev.Name(), len(evs), evs, c.want)
		}
		if c.want == 1 && evs[0] != (abi.Event{Type: abi.EventGID, GID: 0xA}) {
			t.Fatalf("%s got %+v", c.g.dev.Name(), evs[0])
		}
	}
	// A's DMBs are dead; C's DMB for A stays C's.
	do(t, b.dev, move(tokAB, 0, 0, 1, true), [][]byte{{1}}, abi.StatusNoEntry)
	do(t, c.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tokCA}, nil, abi.StatusOK)
	do(t, d.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tokDD}, nil, abi.StatusOK)
	do(t, b.dev, abi.Request{Op: abi.OpQueryRGID, GID: 0xA}, nil, abi.StatusNoEntry)
	do(t, b.dev, abi.Request{Op: abi.OpSignal, GID: 0xA}, nil, abi.StatusNoEntry)
	do(t, a.dev, abi.Request{Op: abi.OpQueryRGID, GID: 0xB}, nil, abi.StatusNotReady)
	if s := f.Stats(); s.DMBs != 0 || s.Devices != 3 {
		t.Fatalf("fabric stats %+v", s)
	}

	// The GID is free again: a reconnecting guest gets it.
	a2 := newGuest(t, f, "a", 0xA)
	do(t, b.dev, abi.Request{Op: abi.OpQueryRGID, GID: 0xA}, nil, abi.StatusOK)
	if _, evs := a2.n.snapshot(); len(evs) != 0 {
		t.Fatal("new device got events of the old one")
	}
}

// TestReconnectAfterDisconnect: a virtio reset, as the transport does it
// (disconnect, then a new device with the same GID): the old DMBs are dead
// for the peer, which gets an EventGID; the DMB index is free again and the
// SBA forgotten.
func TestReconnectAfterDisconnect(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	setSBA(t, a.dev, sbaGPA, true)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 7)
	a.dev.Disconnect()
	do(t, b.dev, move(tok, 0, 0, 1, false), [][]byte{{1}}, abi.StatusNoEntry)
	if _, evs := b.n.snapshot(); len(evs) != 1 || evs[0] != (abi.Event{Type: abi.EventGID, GID: 0xA}) {
		t.Fatalf("B events %+v", evs)
	}
	a2 := newGuest(t, f, "a", 0xA)
	tok2 := register(t, a2.dev, dmbGPA, 4096, 0xB, 7)
	if tok2 == tok {
		t.Fatal("the reconnected device got the dead DMB's token again")
	}
	do(t, b.dev, move(tok2, 0, 0, 1, true), [][]byte{{1}}, abi.StatusNotReady)
	do(t, b.dev, move(tok2, 0, 0, 1, false), [][]byte{{1}}, abi.StatusOK)
}

func TestSetMemory(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	setSBA(t, a.dev, sbaGPA, true)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 0)

	// A new memory table that maps the same GPAs onto new host memory.
	low2, high2 := make([]byte, lowSize), make([]byte, highSize)
	mem2, err := NewSliceMemory(Region{GPA: lowGPA, Data: low2}, Region{GPA: highGPA, Data: high2})
	if err != nil {
		t.Fatal(err)
	}
	a.dev.SetMemory(mem2)
	do(t, b.dev, move(tok, 0, 0, 2, true), [][]byte{{7, 8}}, abi.StatusOK)
	if a.high[dmbGPA-highGPA] != 0 || high2[dmbGPA-highGPA] != 7 || low2[sbaGPA] != 1 || a.low[sbaGPA] != 0 {
		t.Fatal("MOVE went through the old memory table")
	}

	// A table in which the DMB is no longer RAM: MOVE faults, copies nothing.
	mem3, _ := NewSliceMemory(Region{GPA: lowGPA, Data: make([]byte, lowSize)})
	a.dev.SetMemory(mem3)
	do(t, b.dev, move(tok, 0, 0, 2, false), [][]byte{{9, 9}}, abi.StatusFault)
	do(t, b.dev, move(tok, 0, 0, 0, true), nil, abi.StatusOK) // len 0: only the SBA
}

// The MOVE path allocates nothing: not for the copy, not for the signal, not
// through Handle.
func TestMoveAllocs(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	setSBA(t, a.dev, sbaGPA, true)
	tok := register(t, a.dev, dmbGPA, 1<<20, 0xB, 1)
	data := [][]byte{make([]byte, 100), make([]byte, 4000)}
	req := move(tok, 3, 512, 4100, true)
	if n := testing.AllocsPerRun(100, func() {
		if r := b.dev.Handle(req, data); r.Status != abi.StatusOK {
			t.Fatal(r.Status)
		}
	}); n != 0 {
		t.Fatalf("Handle(MOVE) allocates %v times", n)
	}
	if n := testing.AllocsPerRun(100, func() { _ = b.dev.Move(tok, 3, 0, false, data) }); n != 0 {
		t.Fatalf("Move allocates %v times", n)
	}
}
