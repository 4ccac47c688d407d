package ism

import (
	"encoding/binary"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
)

// notifier records what the device model sends a guest's driver. With
// swRoom set, it takes at most that many software events (a transport whose
// queue is full), and refuses device events once deviceFull is set.
type notifier struct {
	mu         sync.Mutex
	interrupts int
	events     []abi.Event
	swRoom     *int
	deviceFull bool
}

func (n *notifier) Interrupt() {
	n.mu.Lock()
	n.interrupts++
	n.mu.Unlock()
}

func (n *notifier) PostEvent(ev abi.Event) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if ev.Type == abi.EventSWR && n.swRoom != nil {
		if *n.swRoom == 0 {
			return false
		}
		*n.swRoom--
	}
	if ev.Type != abi.EventSWR && n.deviceFull {
		return false
	}
	n.events = append(n.events, ev)
	return true
}

func (n *notifier) snapshot() (int, []abi.Event) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.interrupts, append([]abi.Event(nil), n.events...)
}

// Guest RAM layout of test guests: two regions with a hole between them, so
// that ranges crossing a region end are refused.
const (
	lowGPA   = 0x0
	lowSize  = 256 << 10
	highGPA  = 0x100000
	highSize = 4 << 20
	sbaGPA   = 0x1000 // in the low region
	dmbGPA   = highGPA + 0x200000
)

type guest struct {
	low, high []byte
	mem       *SliceMemory
	n         *notifier
	dev       *Device
}

func newGuest(t testing.TB, f *Fabric, name string, gid uint64) *guest {
	t.Helper()
	g := &guest{low: make([]byte, lowSize), high: make([]byte, highSize), n: &notifier{}}
	var err error
	g.mem, err = NewSliceMemory(Region{GPA: lowGPA, Data: g.low}, Region{GPA: highGPA, Data: g.high})
	if err != nil {
		t.Fatal(err)
	}
	g.dev, err = f.Connect(name, gid, g.mem, g.n)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// at returns the guest's bytes at [gpa, gpa+n).
func (g *guest) at(t testing.TB, gpa, n uint64) []byte {
	t.Helper()
	b, err := g.mem.Bytes(gpa, n)
	if err != nil {
		t.Fatalf("gpa %#x+%d: %v", gpa, n, err)
	}
	return b
}

// sbaSeq and sbaDMBE read the SBA's counters for DMB index i by their
// documented offsets (not through abi.SBA, which is what is under test).
func (g *guest) sbaSeq(t testing.TB, sba uint64, i uint32) uint32 {
	return binary.LittleEndian.Uint32(g.at(t, sba+abi.SBASeqOffset+4*uint64(i), 4))
}

func (g *guest) sbaDMBE(t testing.TB, sba uint64, i, e uint32) uint16 {
	return binary.LittleEndian.Uint16(g.at(t, sba+abi.SBADMBEOffset+64*uint64(i)+2*uint64(e), 2))
}

// modelSignal is the ABI's signal written out by hand on a model of guest
// RAM holding an SBA at its start: four little-endian counters go up by one.
func modelSignal(sba []byte, i, e uint32) {
	inc16 := func(b []byte) { binary.LittleEndian.PutUint16(b, binary.LittleEndian.Uint16(b)+1) }
	inc32 := func(b []byte) { binary.LittleEndian.PutUint32(b, binary.LittleEndian.Uint32(b)+1) }
	inc16(sba[abi.SBADMBEOffset+64*int(i)+2*int(e):])
	inc32(sba[abi.SBASeqOffset+4*int(i):])
	inc32(sba[abi.SBAGroupOffset+4*int(i/64):])
	inc32(sba[abi.SBASumOffset:])
}

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetLevel(logrus.PanicLevel)
	return logrus.NewEntry(l)
}

func newFabric() *Fabric { return NewFabric(abi.DefaultCHID, quietLog()) }

// do runs a request through Handle and checks the status.
func do(t testing.TB, d *Device, req abi.Request, data [][]byte, want abi.Status) abi.Response {
	t.Helper()
	r := d.Handle(req, data)
	if r.Status != want {
		t.Fatalf("%v %+v: status %d (%v), want %d (%v)", req.Op, req, r.Status, r.Status, want, want)
	}
	return r
}

func register(t testing.TB, d *Device, gpa, n, rgid uint64, index uint32) uint64 {
	t.Helper()
	r := do(t, d, abi.Request{Op: abi.OpRegisterDMB, Addr: gpa, Len: n, GID: rgid, Index: index}, nil, abi.StatusOK)
	if r.Value == 0 || r.Index != index {
		t.Fatalf("register: token %#x index %d", r.Value, r.Index)
	}
	return r.Value
}

func setSBA(t testing.TB, d *Device, gpa uint64, interrupts bool) {
	t.Helper()
	var fl uint16
	if interrupts {
		fl = abi.FlagInterrupts
	}
	do(t, d, abi.Request{Op: abi.OpSetSBA, Addr: gpa, Flags: fl}, nil, abi.StatusOK)
}

func move(tok uint64, dmbe uint32, off uint64, n int, signal bool) abi.Request {
	r := abi.Request{Op: abi.OpMove, Token: tok, Index: dmbe, Offset: off, Len: uint64(n)}
	if signal {
		r.Flags = abi.FlagSignal
	}
	return r
}

func putLE64(b []byte, v uint64) { binary.LittleEndian.PutUint64(b, v) }
func putLE32(b []byte, v uint32) { binary.LittleEndian.PutUint32(b, v) }

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
