package ism

import (
	"bytes"
	"encoding/binary"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
)

// handOver exports f and imports it into a new fabric, as the new process
// does; the fds are closed after (Import keeps duplicates).
func handOver(t *testing.T, f *Fabric) *Imported {
	t.Helper()
	st, fds, err := f.Export()
	if err != nil {
		t.Fatal("export:", err)
	}
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	f2 := newFabric()
	im, err := f2.Import(st, fds)
	if err != nil {
		t.Fatal("import:", err)
	}
	return im
}

// adopt gives imported device name the guest's RAM (the same memory: the
// new process maps the same guest RAM) and a fresh notifier.
func adopt(t *testing.T, im *Imported, g *guest, name string, m Mapper) *guest {
	t.Helper()
	g2 := &guest{low: g.low, high: g.high, mem: g.mem, n: &notifier{}}
	var err error
	if g2.dev, err = im.Adopt(name, g.dev.GID(), g2.mem, g2.n, m); err != nil {
		t.Fatal("adopt:", err)
	}
	return g2
}

// Copy mode: tokens, rgids, the SBA, counters and the heartbeat survive;
// a MOVE after the import lands where it did before and signals the same
// SBA counters on.
func TestHandoverCopyMode(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	setSBA(t, a.dev, sbaGPA, true)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 5)
	do(t, b.dev, move(tok, 1, 0, 4, true), [][]byte{[]byte("abcd")}, abi.StatusOK)
	a.dev.Beat()
	a.dev.Beat()
	if a.sbaSeq(t, sbaGPA, 5) != 1 {
		t.Fatal("setup: no signal")
	}

	im := handOver(t, f)
	if p := im.Pending(); !slices.Equal(p, []string{"a", "b"}) {
		t.Fatalf("pending %v", p)
	}
	if _, err := im.Adopt("a", 0xB, a.mem, &notifier{}, nil); err == nil {
		t.Fatal("adopted a with b's GID")
	}
	a2, b2 := adopt(t, im, a, "a", nil), adopt(t, im, b, "b", nil)
	if len(im.Pending()) != 0 {
		t.Fatal("devices still pending")
	}
	do(t, b2.dev, move(tok, 1, 4, 4, true), [][]byte{[]byte("efgh")}, abi.StatusOK)
	if got := a.at(t, dmbGPA, 8); !bytes.Equal(got, []byte("abcdefgh")) {
		t.Fatalf("DMB holds %q", got)
	}
	if a.sbaSeq(t, sbaGPA, 5) != 2 || a.sbaDMBE(t, sbaGPA, 5, 1) != 2 {
		t.Fatal("the signal after the import did not count on")
	}
	if n, _ := a2.n.snapshot(); n != 1 {
		t.Fatalf("%d interrupts to the adopted notifier, want 1", n)
	}
	// Only b may MOVE into it, as before; SIGNAL needs the relationship,
	// which came along.
	do(t, a2.dev, move(tok, 1, 0, 1, false), [][]byte{{1}}, abi.StatusPermission)
	do(t, b2.dev, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 9}, nil, abi.StatusOK)
	if bs := b2.dev.Stats(); bs.Moves != 2 || bs.MoveBytes != 8 || bs.SWEvents != 1 {
		t.Fatalf("b's counters did not go on: %+v", bs)
	}
	if !a2.dev.Beat() {
		t.Fatal("no beat after the import")
	}
	if hb := binary.LittleEndian.Uint32(a.at(t, sbaGPA+abi.SBAHeartbeatOffset, 4)); hb != 3 {
		t.Fatalf("heartbeat %d after the import, want 3 (two before, one after)", hb)
	}
	// b going away is told to a, as before the handover.
	b2.dev.Disconnect()
	if _, evs := a2.n.snapshot(); len(evs) == 0 || evs[len(evs)-1] != (abi.Event{Type: abi.EventGID, GID: 0xB}) {
		t.Fatalf("a's events after b left: %+v", evs)
	}
	if s := a2.dev.Fabric().DeviceStats(); len(s) != 2 || s[1].Connected || s[1].Stats.Moves != 2 {
		t.Fatalf("device stats after the import: %+v", s)
	}
}

// Attach mode: the memfd, both mappings' offsets and the attachment
// survive; a MOVE after the import lands in the memory both guests map; a
// DETACH frees the attacher's range, which a new ATTACH gets back.
func TestHandoverAttachMode(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	setSBA(t, a.dev, sbaGPA, false)
	tok, offA := registerAttach(t, a, 10000, 0xB, 7)
	r := attach(t, b, tok, abi.StatusOK)
	own, peer := a.m.at(offA), b.m.at(r.Value)

	im := handOver(t, f)
	ma, mb := newFakeMapper(), newFakeMapper()
	a2, b2 := adopt(t, im, a.guest, "a", ma), adopt(t, im, b.guest, "b", mb)
	do(t, b2.dev, move(tok, 3, 100, 5, true), [][]byte{[]byte("after")}, abi.StatusOK)
	if string(own[100:105]) != "after" || string(peer[100:105]) != "after" {
		t.Fatal("a MOVE after the import did not land in the mapped memfd")
	}
	if a.sbaDMBE(t, sbaGPA, 7, 3) != 1 {
		t.Fatal("no signal")
	}
	if as, bs := a2.dev.Stats(), b2.dev.Stats(); as.AttachDMBs != 1 || as.MappedBytes != 12288 || bs.Attached != 1 || bs.MappedBytes != 12288 {
		t.Fatalf("gauges after the import: a %+v b %+v", as, bs)
	}
	attach(t, &attachGuest{b2, mb}, tok, abi.StatusBusy) // still attached
	// A new DMB of a's does not land on the range its first one holds.
	_, off2 := registerAttach(t, &attachGuest{a2, ma}, 4096, 0xB, 8)
	if off2 >= offA && off2 < offA+12288 {
		t.Fatalf("new DMB at %#x inside the imported one at %#x", off2, offA)
	}
	do(t, b2.dev, abi.Request{Op: abi.OpDetachDMB, Token: tok}, nil, abi.StatusOK)
	if mb.flush() != 1 {
		t.Fatal("DETACH after the import queued no unmap")
	}
	if r2 := attach(t, &attachGuest{b2, mb}, tok, abi.StatusOK); r2.Value != r.Value {
		t.Fatalf("re-attach at %#x, want the freed %#x", r2.Value, r.Value)
	}
	// UNREGISTER revokes b's attachment and tells b.
	do(t, a2.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusOK)
	if _, evs := b2.n.snapshot(); len(evs) != 1 || evs[0] != (abi.Event{Type: abi.EventDMB, Token: tok, GID: 0xA}) {
		t.Fatalf("b's events: %+v", evs)
	}
	a2.dev.Disconnect()
	b2.dev.Disconnect()
	ma.flush()
	mb.flush()
}

// A state that does not hold together is refused whole: the fabric stays
// empty, and nothing panics.
func TestHandoverImportRefuses(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	tok, _ := registerAttach(t, a, 4096, 0xB, 1)
	attach(t, b, tok, abi.StatusOK)
	register(t, b.dev, dmbGPA, 4096, 0xA, 2)
	good, fds, err := f.Export()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	devs := func(st *FabricState) (*DeviceState, *DeviceState) {
		if st.Devices[0].Name == "a" {
			return &st.Devices[0], &st.Devices[1]
		}
		return &st.Devices[1], &st.Devices[0]
	}
	for name, mutate := range map[string]func(st *FabricState){
		"chid":             func(st *FabricState) { st.CHID++ },
		"GID 0":            func(st *FabricState) { st.Devices[0].GID = 0 },
		"GID twice":        func(st *FabricState) { st.Devices[1].GID = st.Devices[0].GID },
		"name twice":       func(st *FabricState) { st.Devices[1].Name = st.Devices[0].Name },
		"token twice":      func(st *FabricState) { da, db := devs(st); db.DMBs[0].Token = da.DMBs[0].Token },
		"token 0":          func(st *FabricState) { _, db := devs(st); db.DMBs[0].Token = 0 },
		"index twice":      func(st *FabricState) { da, _ := devs(st); da.DMBs = append(da.DMBs, da.DMBs[0]); da.DMBs[1].Token++ },
		"fd out of range":  func(st *FabricState) { da, _ := devs(st); da.DMBs[0].BufFD = len(fds) },
		"fd not a memfd":   func(st *FabricState) { da, _ := devs(st); da.DMBs[0].BufFD = -2 },
		"attach unknown":   func(st *FabricState) { _, db := devs(st); db.Attached[0].Token++ },
		"attached twice":   func(st *FabricState) { _, db := devs(st); db.Attached = append(db.Attached, db.Attached[0]) },
		"offset unaligned": func(st *FabricState) { da, _ := devs(st); da.DMBs[0].Off = 100 },
		"offset outside":   func(st *FabricState) { da, _ := devs(st); da.DMBs[0].Off = testRegion },
		"size 0":           func(st *FabricState) { _, db := devs(st); db.DMBs[0].Size = 0 },
		"copy DMB wraps":   func(st *FabricState) { _, db := devs(st); db.DMBs[0].GPA = ^uint64(0) - 10 },
		"modes":            func(st *FabricState) { st.Devices[0].Modes = 0x80 },
		"SBA unaligned":    func(st *FabricState) { st.Devices[0].SBASet, st.Devices[0].SBAGPA = true, 3 },
		"limits":           func(st *FabricState) { da, _ := devs(st); da.MaxMapped = da.RegionSize + 1 },
		"name without GID": func(st *FabricState) { st.Names = append(st.Names, NameState{Name: "ghost"}) },
	} {
		st := clone(t, good)
		mutate(st)
		f2 := newFabric()
		if _, err := f2.Import(st, fds); err == nil {
			t.Errorf("%s: imported", name)
		}
		if s := f2.Stats(); s.Devices != 0 || s.DMBs != 0 || len(f2.DeviceStats()) != 0 {
			t.Errorf("%s: the refused import left %+v", name, s)
		}
	}
	// And the good one imports.
	if _, err := newFabric().Import(clone(t, good), fds); err != nil {
		t.Fatal(err)
	}
}

func clone(t *testing.T, st *FabricState) *FabricState {
	t.Helper()
	c := *st
	c.Names = slices.Clone(st.Names)
	c.Devices = slices.Clone(st.Devices)
	for i := range c.Devices {
		c.Devices[i].DMBs = slices.Clone(c.Devices[i].DMBs)
		c.Devices[i].Attached = slices.Clone(c.Devices[i].Attached)
	}
	return &c
}
