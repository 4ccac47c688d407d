package ism

import (
	"bytes"
	"errors"
	"math"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

// TestRefusals runs every kind of refused request and checks the status,
// that A's and B's RAM did not change, and that the refusal was counted.
func TestRefusals(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	c := newGuest(t, f, "c", 0xC)
	setSBA(t, a.dev, sbaGPA, true)
	const size = 1 << 20
	tok := register(t, a.dev, dmbGPA, size, 0xB, 5)
	for i := range a.high {
		a.high[i] = 0x5A
	}
	one := [][]byte{{1}}
	const max = math.MaxUint64

	cases := []struct {
		name string
		dev  *Device
		req  abi.Request
		data [][]byte
		want abi.Status
	}{
		// MOVE
		{"unknown token", b.dev, move(tok^1, 0, 0, 1, true), one, abi.StatusNoEntry},
		{"token 0", b.dev, move(0, 0, 0, 1, true), one, abi.StatusNoEntry},
		{"wrong rgid", c.dev, move(tok, 0, 0, 1, true), one, abi.StatusPermission},
		{"owner is not rgid", a.dev, move(tok, 0, 0, 1, true), one, abi.StatusPermission},
		{"past the end", b.dev, move(tok, 0, size-1, 2, true), [][]byte{{1, 2}}, abi.StatusRange},
		{"offset at end +1", b.dev, move(tok, 0, size+1, 0, true), nil, abi.StatusRange},
		{"offset+len wraps", b.dev, move(tok, 0, max, 2, true), [][]byte{{1, 2}}, abi.StatusRange},
		{"offset+len wraps to 0", b.dev, move(tok, 0, max, 1, true), one, abi.StatusRange},
		{"huge offset len 0", b.dev, move(tok, 0, max, 0, true), nil, abi.StatusRange},
		{"DMBE index 32", b.dev, move(tok, abi.MaxDMBEs, 0, 1, true), one, abi.StatusRange},
		{"data shorter than len", b.dev, move(tok, 0, 0, 2, true), one, abi.StatusInvalid},
		{"data longer than len", b.dev, move(tok, 0, 0, 0, true), one, abi.StatusInvalid},
		{"len 0 signalled MOVE is no refusal", b.dev, move(tok, 0, 0, 0, true), nil, abi.StatusOK},
		{"unknown MOVE flag", b.dev, abi.Request{Op: abi.OpMove, Token: tok, Len: 1, Flags: 2}, one, abi.StatusInvalid},
		// REGISTER
		{"DMB in the hole", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: lowGPA + lowSize, Len: 4096, GID: 0xB, Index: 1}, nil, abi.StatusFault},
		{"DMB across a region end", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: highGPA + highSize - 4096, Len: 8192, GID: 0xB, Index: 1}, nil, abi.StatusFault},
		{"DMB past all RAM", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: 1 << 40, Len: 4096, GID: 0xB, Index: 1}, nil, abi.StatusFault},
		{"DMB wraps", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: max - 100, Len: 4096, GID: 0xB, Index: 1}, nil, abi.StatusFault},
		{"DMB length 0", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 0, GID: 0xB, Index: 1}, nil, abi.StatusRange},
		{"DMB too long", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: highGPA, Len: abi.MaxDMBSize + 1, GID: 0xB, Index: 1}, nil, abi.StatusRange},
		{"DMB index past SBA", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0xB, Index: abi.MaxDMBs}, nil, abi.StatusRange},
		{"DMB index busy", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: highGPA, Len: 4096, GID: 0xB, Index: 5}, nil, abi.StatusBusy},
		{"rgid 0", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0, Index: 1}, nil, abi.StatusInvalid},
		{"REGISTER flags", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0xB, Index: 1, Flags: 1}, nil, abi.StatusInvalid},
		{"REGISTER with data", a.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0xB, Index: 1}, one, abi.StatusInvalid},
		// SET_SBA
		{"SBA misaligned", a.dev, abi.Request{Op: abi.OpSetSBA, Addr: sbaGPA + 4}, nil, abi.StatusInvalid},
		{"SBA across a region end", a.dev, abi.Request{Op: abi.OpSetSBA, Addr: lowGPA + lowSize - 4096}, nil, abi.StatusFault},
		{"SBA outside RAM", a.dev, abi.Request{Op: abi.OpSetSBA, Addr: 1 << 40}, nil, abi.StatusFault},
		{"SBA wraps", a.dev, abi.Request{Op: abi.OpSetSBA, Addr: max &^ (abi.SBAAlign - 1)}, nil, abi.StatusFault},
		{"SBA flags", a.dev, abi.Request{Op: abi.OpSetSBA, Addr: sbaGPA, Flags: 2}, nil, abi.StatusInvalid},
		// UNREGISTER
		{"unregister by non-owner", b.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusPermission},
		{"unregister unknown", a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok ^ 1}, nil, abi.StatusNoEntry},
		// SIGNAL, QUERY_RGID
		{"signal unknown GID", a.dev, abi.Request{Op: abi.OpSignal, GID: 0xD}, nil, abi.StatusNoEntry},
		{"signal GID 0", a.dev, abi.Request{Op: abi.OpSignal, GID: 0}, nil, abi.StatusNoEntry},
		{"signal code over 16 bits", a.dev, abi.Request{Op: abi.OpSignal, GID: 0xB, Index: 0x10000}, nil, abi.StatusRange},
		{"query unknown GID", a.dev, abi.Request{Op: abi.OpQueryRGID, GID: 0xD}, nil, abi.StatusNoEntry},
		{"query GID 0", a.dev, abi.Request{Op: abi.OpQueryRGID, GID: 0}, nil, abi.StatusNoEntry},
		// not offered
		{"attach", b.dev, abi.Request{Op: abi.OpAttachDMB, Token: tok}, nil, abi.StatusUnsupported},
		{"detach", b.dev, abi.Request{Op: abi.OpDetachDMB, Token: tok}, nil, abi.StatusUnsupported},
		{"op 0", b.dev, abi.Request{Op: 0}, nil, abi.StatusUnsupported},
		{"op 9", b.dev, abi.Request{Op: 9}, nil, abi.StatusUnsupported},
	}
	lowA, highA := a.snapshot()
	lowB, highB := b.snapshot()
	refused := uint64(0)
	for _, c := range cases {
		before := c.dev.Stats().Refused[c.want]
		r := c.dev.Handle(c.req, c.data)
		if r.Status != c.want {
			t.Errorf("%s: status %d (%v), want %d (%v)", c.name, r.Status, r.Status, c.want, c.want)
			continue
		}
		if c.want == abi.StatusOK {
			continue
		}
		refused++
		if r.Value != 0 {
			t.Errorf("%s: value %#x in a refusal", c.name, r.Value)
		}
		if got := c.dev.Stats().Refused[c.want]; got != before+1 {
			t.Errorf("%s: refused[%d] counter %d, was %d", c.name, c.want, got, before)
		}
	}
	// The one OK case signalled: take its SBA words out of the comparison.
	clear(a.low[sbaGPA : sbaGPA+abi.SBASize])
	clear(lowA[sbaGPA : sbaGPA+abi.SBASize])
	if !bytes.Equal(a.low, lowA) || !bytes.Equal(a.high, highA) {
		t.Error("a refused request changed A's RAM")
	}
	if !bytes.Equal(b.low, lowB) || !bytes.Equal(b.high, highB) {
		t.Error("a refused request changed B's RAM")
	}
	if got := f.Stats().RefusedTotal(); got != refused {
		t.Errorf("fabric counts %d refusals, want %d", got, refused)
	}
}

// A signalled MOVE to an owner without SBA is refused and copies nothing.
func TestSignalWithoutSBA(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 0)
	do(t, b.dev, move(tok, 0, 0, 3, true), [][]byte{{1, 2, 3}}, abi.StatusNotReady)
	if got := a.at(t, dmbGPA, 3); !bytes.Equal(got, []byte{0, 0, 0}) {
		t.Fatalf("data copied by a refused MOVE: %v", got)
	}
	// Unsignalled MOVEs need no SBA (a polling driver).
	do(t, b.dev, move(tok, 0, 0, 3, false), [][]byte{{1, 2, 3}}, abi.StatusOK)
	if got := a.at(t, dmbGPA, 3); !bytes.Equal(got, []byte{1, 2, 3}) {
		t.Fatalf("DMB %v", got)
	}
}

func TestUnregister(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 9)
	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusOK)
	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusNoEntry)
	do(t, b.dev, move(tok, 0, 0, 1, false), [][]byte{{1}}, abi.StatusNoEntry)
	register(t, a.dev, dmbGPA, 4096, 0xB, 9) // index free again
	if s := a.dev.Stats(); s.DMBs != 1 || s.Registered != 2 {
		t.Fatalf("stats %+v", s)
	}
}

func TestLimits(t *testing.T) {
	f := newFabric()
	f.SetLimits(Limits{FabricDMBs: 5, DeviceDMBs: 3})
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	reg := func(d *Device, i uint32) abi.Request {
		return abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA + uint64(i)*4096, Len: 4096, GID: 0xB, Index: i}
	}
	var toks []uint64
	for i := range uint32(3) {
		toks = append(toks, do(t, a.dev, reg(a.dev, i), nil, abi.StatusOK).Value)
	}
	do(t, a.dev, reg(a.dev, 3), nil, abi.StatusNoSpace) // device limit
	do(t, b.dev, reg(b.dev, 0), nil, abi.StatusOK)
	do(t, b.dev, reg(b.dev, 1), nil, abi.StatusOK)
	do(t, b.dev, reg(b.dev, 2), nil, abi.StatusNoSpace) // fabric limit
	do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: toks[0]}, nil, abi.StatusOK)
	do(t, b.dev, reg(b.dev, 2), nil, abi.StatusOK)
	if got := a.dev.Stats().Refused[abi.StatusNoSpace] + b.dev.Stats().Refused[abi.StatusNoSpace]; got != 2 {
		t.Fatalf("NoSpace counted %d times", got)
	}
	if l := f.Limits(); l.FabricDMBs != 5 || l.DeviceDMBs != 3 {
		t.Fatalf("limits %+v", l)
	}
	f.SetLimits(Limits{})
	if l := f.Limits(); l.FabricDMBs != DefaultFabricDMBs || l.DeviceDMBs != abi.MaxDMBs {
		t.Fatalf("default limits %+v", l)
	}
}

func TestConnect(t *testing.T) {
	f := newFabric()
	newGuest(t, f, "a", 0xA)
	mem, _ := NewSliceMemory(Region{GPA: 0, Data: make([]byte, 4096)})
	if _, err := f.Connect("z", 0, mem, &notifier{}); !errors.Is(err, ErrGIDZero) {
		t.Fatalf("GID 0: %v", err)
	}
	if _, err := f.Connect("a2", 0xA, mem, &notifier{}); !errors.Is(err, ErrGIDInUse) {
		t.Fatalf("GID in use: %v", err)
	}
	if _, err := f.Connect("n", 0xE, nil, &notifier{}); err == nil {
		t.Fatal("nil Memory accepted")
	}
	if f.CHID() != abi.DefaultCHID {
		t.Fatal("CHID")
	}
}

// Tokens are unique across devices and never 0, with the index space full.
func TestTokenUniqueness(t *testing.T) {
	f := newFabric()
	seen := map[uint64]bool{}
	for g := range uint64(3) {
		gu := newGuest(t, f, "g", 0x10+g)
		for i := range uint32(abi.MaxDMBs) {
			tok := register(t, gu.dev, highGPA, 4096, 0xB, i)
			if seen[tok] {
				t.Fatalf("token %#x handed out twice", tok)
			}
			seen[tok] = true
		}
		do(t, gu.dev, abi.Request{Op: abi.OpRegisterDMB, Addr: highGPA, Len: 4096, GID: 0xB, Index: 0}, nil, abi.StatusBusy)
	}
}

func TestSliceMemory(t *testing.T) {
	if _, err := NewSliceMemory(Region{GPA: 0, Data: make([]byte, 10)}, Region{GPA: 9, Data: make([]byte, 10)}); err == nil {
		t.Fatal("overlap accepted")
	}
	if _, err := NewSliceMemory(Region{GPA: math.MaxUint64 - 4, Data: make([]byte, 10)}); err == nil {
		t.Fatal("wrap accepted")
	}
	m, _ := NewSliceMemory(Region{GPA: 100, Data: make([]byte, 10)}, Region{GPA: 110, Data: make([]byte, 10)})
	for _, c := range []struct {
		gpa, n uint64
		ok     bool
	}{{100, 10, true}, {105, 5, true}, {105, 6, false}, {110, 10, true}, {99, 1, false}, {119, 1, true}, {120, 1, false}, {101, math.MaxUint64, false}} {
		b, err := m.Bytes(c.gpa, c.n)
		if (err == nil) != c.ok || (err == nil && (uint64(len(b)) != c.n || uint64(cap(b)) != c.n)) {
			t.Errorf("Bytes(%d, %d) = len %d cap %d, %v", c.gpa, c.n, len(b), cap(b), err)
		}
	}
}
