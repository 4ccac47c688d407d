package ism

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/dmb"
)

// FuzzHandle feeds sequences of requests from two guests, A (GID 0xA) and
// B (GID 0xB), to Handle and checks every outcome against a reference model:
// each guest's RAM must equal the model's byte for byte after every request,
// so a write anywhere but the target DMB range and the target SBA words (the
// RAM around them is the guard) fails; and a request succeeds exactly when
// the model says it may.
//
// Input: records of [sender byte][split byte][48-byte request][MOVE data].
// sender bit 0 picks A or B; bit 7 resets the sender instead (disconnect
// and connect again). A token below 16 names the model's n-th registered DMB, so that the fuzzer reaches live tokens. MOVE data is the
// next min(len, remaining, 64 KiB) bytes, cut in two at the split byte.
func FuzzHandle(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		runFuzzHandle(t, in)
	})
}

const (
	fzLowGPA   = 0x0
	fzLowSize  = 0x40000
	fzHighGPA  = 0x80000
	fzHighSize = 0x10000
)

type fzGuest struct {
	dev        *Device
	name       string
	mem        Memory
	n          *notifier
	low, high  []byte // the device's view
	mlow, mhig []byte // the model
	sbaSet     bool
	sba        uint64
	intr       bool
	indices    map[uint32]bool
}

type fzDMB struct {
	owner     *fzGuest
	rgid      uint64
	gpa, size uint64
	index     uint32
	live      bool
}

// model returns the model's bytes of g at [gpa, gpa+n), or nil.
func (g *fzGuest) model(gpa, n uint64) []byte {
	for _, r := range []struct {
		gpa uint64
		b   []byte
	}{{fzLowGPA, g.mlow}, {fzHighGPA, g.mhig}} {
		if gpa >= r.gpa && dmb.CheckRange(gpa-r.gpa, n, uint64(len(r.b))) == nil {
			return r.b[gpa-r.gpa : gpa-r.gpa+n]
		}
	}
	return nil
}

func runFuzzHandle(t *testing.T, in []byte) Stats {
	fab := NewFabric(abi.DefaultCHID, quietLog())
	// The model has no clock: no input may meet the signal rate limit.
	fab.SetLimits(Limits{SignalRate: 1, SignalBurst: 1 << 30})
	var gs [2]*fzGuest
	for i := range gs {
		g := &fzGuest{n: &notifier{}, indices: map[uint32]bool{}}
		g.low, g.high = make([]byte, fzLowSize), make([]byte, fzHighSize)
		for j := range g.low {
			g.low[j] = byte(j*31 + i)
		}
		for j := range g.high {
			g.high[j] = byte(j*17 + i)
		}
		g.mlow, g.mhig = bytes.Clone(g.low), bytes.Clone(g.high)
		mem, err := NewSliceMemory(Region{GPA: fzLowGPA, Data: g.low}, Region{GPA: fzHighGPA, Data: g.high})
		if err != nil {
			t.Fatal(err)
		}
		g.name, g.mem = fmt.Sprint("g", i), mem
		if g.dev, err = fab.Connect(g.name, uint64(0xA+i), mem, g.n); err != nil {
			t.Fatal(err)
		}
		gs[i] = g
	}
	byGID := func(gid uint64) *fzGuest {
		if gid == 0xA || gid == 0xB {
			return gs[gid-0xA]
		}
		return nil
	}
	var slots []uint64
	dmbs := map[uint64]*fzDMB{}

	for step := 0; len(in) >= 2+abi.RequestSize; step++ {
		g := gs[in[0]&1]
		in0 := in[0]
		split := int(in[1])
		req, err := abi.DecodeRequest(in[2:])
		if err != nil {
			t.Fatal(err)
		}
		in = in[2+abi.RequestSize:]
		if req.Token < 16 && int(req.Token) < len(slots) {
			req.Token = slots[req.Token]
		}
		if in0&0x80 != 0 {
			// A virtio reset instead of the request, as the transport
			// does it: the device is disconnected and a new one connects
			// with the same GID. The sender's DMBs die and its SBA is
			// forgotten.
			gid := g.dev.GID()
			g.dev.Disconnect()
			if g.dev, err = fab.Connect(g.name, gid, g.mem, g.n); err != nil {
				t.Fatalf("step %d: reconnect after the reset: %v", step, err)
			}
			for _, e := range dmbs {
				if e.owner == g {
					e.live = false
				}
			}
			clear(g.indices)
			g.sbaSet = false
			continue
		}
		var data [][]byte
		if req.Op == abi.OpMove {
			n := int(min(req.Len, uint64(len(in)), 1<<16))
			d := in[:n]
			in = in[n:]
			s := min(split, n)
			data = [][]byte{d[:s], d[s:]}
		}

		// The model's verdict, and what a success does.
		var apply func(resp abi.Response)
		ok := false
		switch req.Op {
		case abi.OpRegisterDMB:
			ok = req.Flags == 0 && req.GID != 0 && req.Len >= 1 && req.Len <= abi.MaxDMBSize &&
				req.Index < abi.MaxDMBs && !g.indices[req.Index] && g.model(req.Addr, req.Len) != nil
			apply = func(resp abi.Response) {
				if resp.Value == 0 || dmbs[resp.Value] != nil {
					t.Fatalf("step %d: token %#x zero or reused", step, resp.Value)
				}
				dmbs[resp.Value] = &fzDMB{owner: g, rgid: req.GID, gpa: req.Addr, size: req.Len, index: req.Index, live: true}
				slots = append(slots, resp.Value)
				g.indices[req.Index] = true
			}
		case abi.OpUnregisterDMB:
			e := dmbs[req.Token]
			ok = req.Flags == 0 && e != nil && e.live && e.owner == g
			apply = func(abi.Response) { e.live = false; delete(g.indices, e.index) }
		case abi.OpMove:
			e := dmbs[req.Token]
			sig := req.Flags&abi.FlagSignal != 0
			ok = req.Flags&^abi.FlagSignal == 0 && totalLen(data) == req.Len && req.Index < abi.MaxDMBEs &&
				e != nil && e.live && e.rgid == g.dev.GID() && dmb.CheckRange(req.Offset, req.Len, e.size) == nil &&
				(!sig || e.owner.sbaSet)
			apply = func(abi.Response) {
				if req.Len > 0 {
					dst := e.owner.model(e.gpa+req.Offset, req.Len)
					copy(dst[copy(dst, data[0]):], data[1])
				}
				if sig {
					o := e.owner
					modelSignal(o.model(o.sba, abi.SBASize), e.index, req.Index)
				}
			}
		case abi.OpSignal:
			// Only toward a GID with a live DMB between the two (or itself).
			related := req.GID == g.dev.GID()
			for _, e := range dmbs {
				if e.live && (e.owner == g && e.rgid == req.GID || e.owner == byGID(req.GID) && e.rgid == g.dev.GID()) {
					related = true
				}
			}
			ok = req.Flags == 0 && req.Index <= 0xFFFF && byGID(req.GID) != nil && related
		case abi.OpQueryRGID:
			ok = req.Flags == 0 && byGID(req.GID) != nil
		case abi.OpSetSBA:
			ok = req.Flags&^abi.FlagInterrupts == 0 && req.Addr%abi.SBAAlign == 0 && g.model(req.Addr, abi.SBASize) != nil
			apply = func(abi.Response) {
				g.sbaSet, g.sba, g.intr = true, req.Addr, req.Flags&abi.FlagInterrupts != 0
			}
		}

		resp := g.dev.Handle(req, data)
		if (resp.Status == abi.StatusOK) != ok {
			t.Fatalf("step %d: %v %+v from %#x: status %v, model says ok=%v", step, req.Op, req, g.dev.GID(), resp.Status, ok)
		}
		if ok && apply != nil {
			apply(resp)
		}
		if !ok && resp.Value != 0 {
			t.Fatalf("step %d: refused %v returned value %#x", step, req.Op, resp.Value)
		}
		for _, o := range gs {
			if !bytes.Equal(o.low, o.mlow) || !bytes.Equal(o.high, o.mhig) {
				t.Fatalf("step %d: %v %+v: guest %#x RAM differs from the model (low at %d, high at %d)",
					step, req.Op, req, o.dev.GID(), firstDiff(o.low, o.mlow), firstDiff(o.high, o.mhig))
			}
		}
	}
	return fab.Stats()
}

// fzRecord encodes one FuzzHandle input record.
func fzRecord(sender byte, split byte, req abi.Request, data []byte) []byte {
	b := make([]byte, 2+abi.RequestSize, 2+abi.RequestSize+len(data))
	b[0], b[1] = sender, split
	req.Encode(b[2:])
	return append(b, data...)
}

// TestWriteFuzzHandleCorpus regenerates testdata/fuzz/FuzzHandle when
// ISM_WRITE_CORPUS=1; otherwise it runs the seeds like go test does.
func TestWriteFuzzHandleCorpus(t *testing.T) {
	const a, b = 0, 1
	sba := abi.Request{Op: abi.OpSetSBA, Addr: 0x1000, Flags: abi.FlagInterrupts}
	regAB := abi.Request{Op: abi.OpRegisterDMB, Addr: fzHighGPA, Len: 0x4000, GID: 0xB, Index: 3}
	mv := func(off, n uint64, flags uint16) abi.Request {
		return abi.Request{Op: abi.OpMove, Token: 0, Index: 5, Offset: off, Len: n, Flags: flags}
	}
	pat := bytes.Repeat([]byte("0123456789abcdef"), 64)
	cat := func(rs ...[]byte) []byte { return bytes.Join(rs, nil) }
	seeds := map[string][]byte{
		"move-signal": cat(fzRecord(a, 0, sba, nil), fzRecord(a, 0, regAB, nil),
			fzRecord(b, 7, mv(100, 64, abi.FlagSignal), pat[:64]),
			fzRecord(b, 0, mv(0x4000-16, 16, abi.FlagSignal), pat[:16])),
		"move-past-end": cat(fzRecord(a, 0, sba, nil), fzRecord(a, 0, regAB, nil),
			fzRecord(b, 3, mv(0x4000-8, 16, abi.FlagSignal), pat[:16]),
			fzRecord(b, 0, mv(^uint64(0), 1, 0), pat[:1])),
		"move-no-sba": cat(fzRecord(a, 0, regAB, nil), fzRecord(b, 0, mv(0, 32, abi.FlagSignal), pat[:32]),
			fzRecord(b, 0, mv(0, 32, 0), pat[:32])),
		"move-wrong-rgid": cat(fzRecord(a, 0, sba, nil), fzRecord(a, 0, regAB, nil), fzRecord(a, 0, mv(0, 8, 1), pat[:8])),
		"intra-vm": cat(fzRecord(a, 0, sba, nil),
			fzRecord(a, 0, abi.Request{Op: abi.OpRegisterDMB, Addr: 0x30000, Len: 0x1000, GID: 0xA, Index: 1919}, nil),
			fzRecord(a, 1, mv(0xff0, 16, abi.FlagSignal), pat[:16])),
		"unregister-then-move": cat(fzRecord(a, 0, sba, nil), fzRecord(a, 0, regAB, nil),
			fzRecord(b, 0, abi.Request{Op: abi.OpUnregisterDMB, Token: 0}, nil),
			fzRecord(a, 0, abi.Request{Op: abi.OpUnregisterDMB, Token: 0}, nil),
			fzRecord(b, 0, mv(0, 8, 1), pat[:8])),
		"register-refusals": cat(
			fzRecord(a, 0, abi.Request{Op: abi.OpRegisterDMB, Addr: fzLowGPA + fzLowSize - 8, Len: 16, GID: 0xB}, nil),
			fzRecord(a, 0, abi.Request{Op: abi.OpRegisterDMB, Addr: fzHighGPA, Len: abi.MaxDMBSize + 1, GID: 0xB}, nil),
			fzRecord(a, 0, abi.Request{Op: abi.OpRegisterDMB, Addr: fzHighGPA, Len: 16, GID: 0xB, Index: abi.MaxDMBs}, nil),
			fzRecord(a, 0, regAB, nil), fzRecord(a, 0, regAB, nil)),
		"sba-refusals": cat(fzRecord(a, 0, abi.Request{Op: abi.OpSetSBA, Addr: 0x1004}, nil),
			fzRecord(a, 0, abi.Request{Op: abi.OpSetSBA, Addr: fzLowSize - 8}, nil),
			fzRecord(b, 0, abi.Request{Op: abi.OpSetSBA, Addr: fzHighGPA + fzHighSize - abi.SBASize}, nil)),
		"reset": cat(fzRecord(a, 0, sba, nil), fzRecord(a, 0, regAB, nil),
			fzRecord(0x80|a, 0, abi.Request{}, nil),
			fzRecord(b, 0, mv(0, 8, 0), pat[:8]),
			fzRecord(a, 0, regAB, nil), fzRecord(b, 0, abi.Request{Op: abi.OpMove, Token: 1, Len: 8, Flags: 1}, pat[:8]),
			fzRecord(b, 0, abi.Request{Op: abi.OpMove, Token: 1, Len: 8}, pat[:8])),
		"signal-related": cat(fzRecord(b, 0, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 0x83}, nil),
			fzRecord(a, 0, regAB, nil),
			fzRecord(b, 0, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 0x83}, nil),
			fzRecord(a, 0, abi.Request{Op: abi.OpSignal, GID: 0xB, Index: 0x80}, nil),
			fzRecord(a, 0, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 1}, nil),
			fzRecord(a, 0, abi.Request{Op: abi.OpUnregisterDMB, Token: 0}, nil),
			fzRecord(b, 0, abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 0x83}, nil)),
		"signal-query": cat(fzRecord(a, 0, abi.Request{Op: abi.OpSignal, GID: 0xB, Index: 0x80, Offset: 1}, nil),
			fzRecord(b, 0, abi.Request{Op: abi.OpQueryRGID, GID: 0xA}, nil),
			fzRecord(b, 0, abi.Request{Op: abi.OpQueryRGID, GID: 0xC}, nil),
			fzRecord(b, 0, abi.Request{Op: abi.OpAttachDMB}, nil),
			fzRecord(b, 0, abi.Request{Op: 99}, nil)),
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzHandle")
	write := os.Getenv("ISM_WRITE_CORPUS") == "1"
	// The seeds must reach the success paths, not only refusals.
	wantMoves := map[string]uint64{"move-signal": 2, "move-no-sba": 1, "intra-vm": 1, "reset": 1}
	for name, in := range seeds {
		s := runFuzzHandle(t, in)
		if s.Moves != wantMoves[name] {
			t.Errorf("seed %s: %d MOVEs succeeded, want %d", name, s.Moves, wantMoves[name])
		}
		if name == "signal-related" && (s.SWEvents != 3 || s.SignalsRefusedPeer != 2) {
			t.Errorf("seed %s: %d SIGNALs succeeded, %d refused for want of a DMB; want 3 and 2", name, s.SWEvents, s.SignalsRefusedPeer)
		}
		if write {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, name), fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", in), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
