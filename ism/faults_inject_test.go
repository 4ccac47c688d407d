package ism

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/abi"
)

// faultPair is guest a owning a copy-mode DMB (index 5, SBA with
// interrupts) whose rgid is guest b.
func faultPair(t *testing.T) (f *Fabric, a, b *guest, tok uint64) {
	t.Helper()
	f = newFabric()
	a = newGuest(t, f, "a", 0xA)
	b = newGuest(t, f, "b", 0xB)
	setSBA(t, a.dev, sbaGPA, true)
	tok = register(t, a.dev, dmbGPA, 4096, 0xB, 5)
	return f, a, b, tok
}

func setFault(t *testing.T, f *Fabric, s FaultSpec) uint64 {
	t.Helper()
	id, err := f.SetFault(s, "test")
	if err != nil {
		t.Fatalf("SetFault(%v): %v", s, err)
	}
	if !f.FaultsOn() {
		t.Fatal("FaultsOn false with a fault set")
	}
	return id
}

// TestFaultDropSignals: with every 3rd signal toward a dropped, 9 signalled
// MOVEs all copy their data and all answer OK, but only 6 count in a's SBA
// and interrupt it; the drops are counted on a. Clearing restores every
// signal.
func TestFaultDropSignals(t *testing.T) {
	f, a, b, tok := faultPair(t)
	id := setFault(t, f, FaultSpec{Kind: FaultDropSignals, VM: "a", Every: 3})
	for i := range 9 {
		do(t, b.dev, move(tok, 0, uint64(i), 1, true), [][]byte{{byte(i + 1)}}, abi.StatusOK)
	}
	for i := range 9 {
		if got := a.at(t, dmbGPA+uint64(i), 1)[0]; got != byte(i+1) {
			t.Errorf("DMB byte %d = %d: a dropped signal lost its MOVE's data", i, got)
		}
	}
	if got := a.sbaSeq(t, sbaGPA, 5); got != 6 {
		t.Errorf("SBA seq %d, want 6 of 9 (every 3rd dropped)", got)
	}
	if n, _ := a.n.snapshot(); n != 6 {
		t.Errorf("%d interrupts, want 6", n)
	}
	if s := a.dev.Stats(); s.Faults[FaultDropSignals] != 3 {
		t.Errorf("a counts %d dropped signals, want 3", s.Faults[FaultDropSignals])
	}
	if s := b.dev.Stats(); s.Signals != 9 || s.RefusedTotal() != 0 || s.Faults[FaultDropSignals] != 0 {
		t.Errorf("b stats %+v: the sender is told OK and is not the target", s)
	}
	if l := f.Faults(); len(l) != 1 || l[0].Injected != 3 || l[0].By != "test" {
		t.Errorf("Faults() = %+v", l)
	}
	if _, err := f.ClearFault(id, "test"); err != nil {
		t.Fatal(err)
	}
	if f.FaultsOn() {
		t.Error("FaultsOn after the last fault was cleared")
	}
	for range 3 {
		do(t, b.dev, move(tok, 0, 0, 0, true), nil, abi.StatusOK)
	}
	if got := a.sbaSeq(t, sbaGPA, 5); got != 9 {
		t.Errorf("SBA seq %d after clearing, want 9", got)
	}
}

// TestFaultDropSignalsFrom: a fault on signals from b drops b's signals
// only, and counts them on b; SIGNAL's software events are dropped too.
func TestFaultDropSignalsFrom(t *testing.T) {
	f, a, b, tok := faultPair(t)
	tokB := register(t, b.dev, dmbGPA, 4096, 0xA, 1)
	setSBA(t, b.dev, sbaGPA, false)
	setFault(t, f, FaultSpec{Kind: FaultDropSignals, VM: "b", From: true, Every: 2})
	for range 4 {
		do(t, b.dev, move(tok, 0, 0, 0, true), nil, abi.StatusOK)
		do(t, a.dev, move(tokB, 0, 0, 0, true), nil, abi.StatusOK) // a's signals toward b: untouched
	}
	if got := a.sbaSeq(t, sbaGPA, 5); got != 2 {
		t.Errorf("a's SBA seq %d, want 2 of b's 4 signals", got)
	}
	if got := b.sbaSeq(t, sbaGPA, 1); got != 4 {
		t.Errorf("b's SBA seq %d, want all 4 of a's", got)
	}
	for i := range 4 {
		do(t, b.dev, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 7, Offset: uint64(i)}, nil, abi.StatusOK)
	}
	_, evs := a.n.snapshot()
	var infos []uint64
	for _, ev := range evs {
		if ev.Type == abi.EventSWR {
			infos = append(infos, ev.Info)
		}
	}
	// The 5th..8th signals from b: the 6th and the 8th are dropped.
	if len(infos) != 2 || infos[0] != 0 || infos[1] != 2 {
		t.Errorf("a got software events with info %v, want [0 2]", infos)
	}
	if s := b.dev.Stats(); s.Faults[FaultDropSignals] != 4 {
		t.Errorf("b counts %d dropped signals, want 4", s.Faults[FaultDropSignals])
	}
}

// TestFaultDelaySignals: held signals (an hour: none is due during the
// test) are not in the SBA nor posted; clearing delivers them all, in
// order, and the MOVEs' data was there all along.
func TestFaultDelaySignals(t *testing.T) {
	f, a, b, tok := faultPair(t)
	setFault(t, f, FaultSpec{Kind: FaultDelaySignals, VM: "a", Delay: time.Hour})
	do(t, b.dev, move(tok, 2, 0, 1, true), [][]byte{{42}}, abi.StatusOK)
	do(t, b.dev, move(tok, 3, 0, 0, true), nil, abi.StatusOK)
	for i := range 3 {
		do(t, b.dev, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 9, Offset: uint64(10 + i)}, nil, abi.StatusOK)
	}
	if got := a.at(t, dmbGPA, 1)[0]; got != 42 {
		t.Errorf("DMB byte %d: the data of a delayed signal's MOVE must be there at once", got)
	}
	if got := a.sbaSeq(t, sbaGPA, 5); got != 0 {
		t.Errorf("SBA seq %d while the signals are held", got)
	}
	if n, evs := a.n.snapshot(); n != 0 || len(evs) != 0 {
		t.Errorf("%d interrupts and events %v while held", n, evs)
	}
	if _, err := f.ClearFault(0, "test"); err != nil {
		t.Fatal(err)
	}
	if got := a.sbaSeq(t, sbaGPA, 5); got != 2 {
		t.Errorf("SBA seq %d after clearing, want 2", got)
	}
	if a.sbaDMBE(t, sbaGPA, 5, 2) != 1 || a.sbaDMBE(t, sbaGPA, 5, 3) != 1 {
		t.Error("the held signals' DMBEs were not counted")
	}
	n, evs := a.n.snapshot()
	if n != 2 {
		t.Errorf("%d interrupts, want 2", n)
	}
	if len(evs) != 3 || evs[0].Info != 10 || evs[1].Info != 11 || evs[2].Info != 12 {
		t.Errorf("events %+v, want SIGNAL infos 10, 11, 12 in order", evs)
	}
	if s := a.dev.Stats(); s.Faults[FaultDelaySignals] != 5 {
		t.Errorf("a counts %d delayed signals, want 5", s.Faults[FaultDelaySignals])
	}
}

// TestFaultDelayedSignalAfterUnregister: a held signal whose DMB is gone by
// the time it is due is not counted (no MOVE reaches an index without a
// DMB, as the ABI says of the SBA).
func TestFaultDelayedSignalAfterUnregister(t *testing.T) {
	f, a, b, tok := faultPair(t)
	setFault(t, f, FaultSpec{Kind: FaultDelaySignals, VM: "a", Delay: time.Hour})
	do(t, b.dev, move(tok, 0, 0, 0, true), nil, abi.StatusOK)
	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusOK)
	if _, err := f.ClearFault(0, "test"); err != nil {
		t.Fatal(err)
	}
	if got := a.sbaSeq(t, sbaGPA, 5); got != 0 {
		t.Errorf("SBA seq %d: a signal for a dead DMB was counted", got)
	}
}

// TestFaultFailMoves: the next 2 MOVEs into the DMB fail with the chosen
// status and change nothing; the third goes through. A fault on another
// token does not touch this DMB; one without a count fails until cleared.
func TestFaultFailMoves(t *testing.T) {
	f, a, b, tok := faultPair(t)
	setFault(t, f, FaultSpec{Kind: FaultFailMoves, VM: "a", Token: tok ^ 1, Status: abi.StatusFault})
	setFault(t, f, FaultSpec{Kind: FaultFailMoves, VM: "a", Token: tok, Count: 2, Status: abi.StatusBusy})
	do(t, b.dev, move(tok, 0, 0, 1, true), [][]byte{{1}}, abi.StatusBusy)
	do(t, b.dev, move(tok, 0, 0, 1, true), [][]byte{{2}}, abi.StatusBusy)
	if got := a.at(t, dmbGPA, 1)[0]; got != 0 || a.sbaSeq(t, sbaGPA, 5) != 0 {
		t.Fatalf("a failed MOVE changed the DMB (%d) or the SBA", got)
	}
	do(t, b.dev, move(tok, 0, 0, 1, true), [][]byte{{3}}, abi.StatusOK)
	if got := a.at(t, dmbGPA, 1)[0]; got != 3 || a.sbaSeq(t, sbaGPA, 5) != 1 {
		t.Errorf("after the count: DMB %d, seq %d", got, a.sbaSeq(t, sbaGPA, 5))
	}
	l := f.Faults()
	if len(l) != 2 || l[1].Injected != 2 || l[1].Left != 0 || l[0].Injected != 0 {
		t.Errorf("Faults() = %+v", l)
	}
	if s := b.dev.Stats(); s.Refused[abi.StatusBusy] != 2 {
		t.Errorf("b's refusals %v: a failed MOVE is refused as any other", s.Refused)
	}
	f.ClearFault(0, "test")
	setFault(t, f, FaultSpec{Kind: FaultFailMoves, VM: "b", From: true, Status: abi.StatusNoEntry})
	for range 3 {
		do(t, b.dev, move(tok, 0, 0, 1, false), [][]byte{{4}}, abi.StatusNoEntry)
	}
	if s := b.dev.Stats(); s.Faults[FaultFailMoves] != 3 {
		t.Errorf("b counts %d failed MOVEs, want 3", s.Faults[FaultFailMoves])
	}
	if s := a.dev.Stats(); s.Faults[FaultFailMoves] != 2 {
		t.Errorf("a counts %d failed MOVEs, want the 2 toward it", s.Faults[FaultFailMoves])
	}
}

// TestFaultThrottle: at 4 chains a second, the queue may take one chain
// and must then wait a quarter second; other VMs are not throttled.
func TestFaultThrottle(t *testing.T) {
	f, a, b, _ := faultPair(t)
	setFault(t, f, FaultSpec{Kind: FaultThrottle, VM: "a", Rate: 4})
	now := time.Unix(1000, 0)
	if w := a.dev.ThrottleChain(now); w != 0 {
		t.Fatalf("first chain waits %v", w)
	}
	if w := a.dev.ThrottleChain(now); w != 250*time.Millisecond {
		t.Fatalf("second chain at once waits %v, want 250ms", w)
	}
	if w := a.dev.ThrottleChain(now.Add(100 * time.Millisecond)); w != 150*time.Millisecond {
		t.Fatalf("100ms later waits %v, want 150ms", w)
	}
	if w := a.dev.ThrottleChain(now.Add(250 * time.Millisecond)); w != 0 {
		t.Fatalf("250ms later waits %v", w)
	}
	if w := b.dev.ThrottleChain(now); w != 0 {
		t.Fatalf("b is throttled: %v", w)
	}
	if s := a.dev.Stats(); s.Faults[FaultThrottle] != 2 {
		t.Errorf("a counts %d throttled takes, want 2", s.Faults[FaultThrottle])
	}
}

// TestFaultRevokeDMB: the device unregisters a's copy-mode DMB; a (owner)
// and b (rgid) each get EventDMB with the token and a's GID; b's next MOVE
// and a's own UNREGISTER find no entry.
func TestFaultRevokeDMB(t *testing.T) {
	f, a, b, tok := faultPair(t)
	got, err := f.RevokeDMB("a", 0, 5, "test")
	if err != nil || got != tok {
		t.Fatalf("RevokeDMB by index: %#x, %v", got, err)
	}
	want := abi.Event{Type: abi.EventDMB, Code: abi.DMBRevoked, Token: tok, GID: 0xA}
	for _, g := range []*guest{a, b} {
		if _, evs := g.n.snapshot(); len(evs) != 1 || evs[0] != want {
			t.Errorf("%s's events %+v, want %+v", g.dev.Name(), evs, want)
		}
	}
	do(t, b.dev, move(tok, 0, 0, 1, true), [][]byte{{1}}, abi.StatusNoEntry)
	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusNoEntry)
	// The index is free again for the owner.
	register(t, a.dev, dmbGPA, 4096, 0xB, 5)
	if s := a.dev.Stats(); s.Faults[FaultRevokeDMB] != 1 {
		t.Errorf("a counts %d revoked DMBs", s.Faults[FaultRevokeDMB])
	}
	if _, err := f.RevokeDMB("a", 0, 6, "test"); !errors.Is(err, ErrNoSuchDMB) {
		t.Errorf("revoking a free index: %v", err)
	}
	if _, err := f.RevokeDMB("a", tok, 0, "test"); !errors.Is(err, ErrNoSuchDMB) {
		t.Errorf("revoking a dead token: %v", err)
	}
	if _, err := f.RevokeDMB("c", 0, 5, "test"); !errors.Is(err, ErrNotConnected) {
		t.Errorf("revoking in an unknown VM: %v", err)
	}
	if _, err := f.RevokeDMB("b", tok, 0, "test"); !errors.Is(err, ErrNoSuchDMB) {
		t.Errorf("revoking a DMB through a VM that does not own it: %v", err)
	}
}

// TestFaultRevokeAttachedDMB: an attach-mode DMB the rgid attached is
// unmapped from both regions; the rgid gets the attacher's DMB-gone event
// and the revoke's, the owner the revoke's.
func TestFaultRevokeAttachedDMB(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, abi.ModeCopy|abi.ModeAttach)
	b := newAttachGuest(t, f, "b", 0xB, abi.ModeCopy|abi.ModeAttach)
	tok, _, err := a.dev.RegisterAttachDMB(8192, 0xB, 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.dev.Attach(tok); err != nil {
		t.Fatal(err)
	}
	if _, err := f.RevokeDMB("a", tok, 0, "test"); err != nil {
		t.Fatal(err)
	}
	revoked := abi.Event{Type: abi.EventDMB, Code: abi.DMBRevoked, Token: tok, GID: 0xA}
	gone := revoked
	gone.Code = abi.DMBGone
	if _, evs := a.n.snapshot(); len(evs) != 1 || evs[0] != revoked {
		t.Errorf("a's events %+v, want %+v", evs, revoked)
	}
	if _, evs := b.n.snapshot(); len(evs) != 2 || evs[0] != gone || evs[1] != revoked {
		t.Errorf("b's events %+v, want the UNREGISTER's %+v, then %+v", evs, gone, revoked)
	}
	if s := b.dev.Stats(); s.Attached != 0 {
		t.Errorf("b still has %d attached", s.Attached)
	}
	if s := a.dev.Stats(); s.AttachDMBs != 0 {
		t.Errorf("a still owns %d attach-mode DMBs", s.AttachDMBs)
	}
}

// TestFaultGIDGone: b (a's peer through the DMB) gets EventGID for a, c
// (no relation) nothing, and a stays connected.
func TestFaultGIDGone(t *testing.T) {
	f, a, b, _ := faultPair(t)
	c := newGuest(t, f, "c", 0xC)
	n, err := f.SendGIDGone("a", "test")
	if err != nil || n != 1 {
		t.Fatalf("SendGIDGone: %d peers, %v", n, err)
	}
	if _, evs := b.n.snapshot(); len(evs) != 1 || evs[0] != (abi.Event{Type: abi.EventGID, GID: 0xA}) {
		t.Errorf("b's events %+v", evs)
	}
	if _, evs := c.n.snapshot(); len(evs) != 0 {
		t.Errorf("c got %+v", evs)
	}
	if _, evs := a.n.snapshot(); len(evs) != 0 {
		t.Errorf("a got %+v", evs)
	}
	do(t, b.dev, abi.Request{Op: abi.OpQueryRGID, GID: 0xA}, nil, abi.StatusOK)
	if _, err := f.SendGIDGone("zz", "test"); !errors.Is(err, ErrNotConnected) {
		t.Errorf("unknown VM: %v", err)
	}
	if s := a.dev.Stats(); s.Faults[FaultGIDGone] != 1 {
		t.Errorf("a counts %d GID-gone events", s.Faults[FaultGIDGone])
	}
}

// TestFaultSpecCheck: every field out of range is refused with a message
// naming it; clearing an unknown id fails.
func TestFaultSpecCheck(t *testing.T) {
	f := newFabric()
	for _, c := range []struct {
		s    FaultSpec
		want string
	}{
		{FaultSpec{Kind: FaultDropSignals, Every: 1}, "target VM"},
		{FaultSpec{Kind: FaultDropSignals, VM: "a"}, "every 0"},
		{FaultSpec{Kind: FaultDropSignals, VM: "a", Every: MaxFaultEvery + 1}, "every"},
		{FaultSpec{Kind: FaultDelaySignals, VM: "a"}, "delay"},
		{FaultSpec{Kind: FaultDelaySignals, VM: "a", Delay: 2 * time.Hour}, "delay"},
		{FaultSpec{Kind: FaultFailMoves, VM: "a"}, "status"},
		{FaultSpec{Kind: FaultFailMoves, VM: "a", Status: abi.Status(NumStatus)}, "status"},
		{FaultSpec{Kind: FaultFailMoves, VM: "a", Status: abi.StatusBusy, Count: MaxFaultCount + 1}, "count"},
		{FaultSpec{Kind: FaultFailMoves, VM: "a", Status: abi.StatusBusy, Token: 1, From: true}, "token"},
		{FaultSpec{Kind: FaultDropSignals, VM: "a", Every: 1, Token: 1}, "token"},
		{FaultSpec{Kind: FaultThrottle, VM: "a"}, "rate"},
		{FaultSpec{Kind: FaultThrottle, VM: "a", Rate: 1, From: true}, "direction"},
		{FaultSpec{Kind: FaultRevokeDMB, VM: "a"}, "not a standing"},
		{FaultSpec{Kind: FaultKind(99), VM: "a"}, "not a standing"},
	} {
		_, err := f.SetFault(c.s, "test")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("SetFault(%+v) = %v, want an error about %q", c.s, err, c.want)
		}
	}
	if f.FaultsOn() {
		t.Error("a refused fault turned faults on")
	}
	if _, err := f.ClearFault(7, "test"); err == nil {
		t.Error("clearing an unknown fault id succeeded")
	}
	for range MaxFaults {
		setFault(t, f, FaultSpec{Kind: FaultThrottle, VM: "a", Rate: 1})
	}
	if _, err := f.SetFault(FaultSpec{Kind: FaultThrottle, VM: "a", Rate: 1}, "test"); err == nil {
		t.Error("more than MaxFaults faults")
	}
	if gone, err := f.ClearFault(0, "test"); err != nil || len(gone) != MaxFaults || f.FaultsOn() {
		t.Errorf("clear all: %d, %v", len(gone), err)
	}
}

func TestParseFaultKind(t *testing.T) {
	for k := range NumFaultKinds {
		got, err := ParseFaultKind(FaultKind(k).String())
		if err != nil || got != FaultKind(k) {
			t.Errorf("%v: %v, %v", FaultKind(k), got, err)
		}
	}
	if _, err := ParseFaultKind("drop"); err == nil {
		t.Error("unknown kind parsed")
	}
}
