package ism

import (
	"bytes"
	"sync"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

// TestMoveWhileDisconnect: senders MOVE into A's DMBs while A disconnects.
// Once Disconnect has returned, A's RAM must not change any more (with -race
// a late write also shows as a race with the snapshot below), every sender
// ends with StatusNoEntry, and B and C get EventGID.
func TestMoveWhileDisconnect(t *testing.T) {
	for round := range 20 {
		f := newFabric()
		a := newGuest(t, f, "a", 0xA)
		b := newGuest(t, f, "b", 0xB)
		c := newGuest(t, f, "c", 0xC)
		setSBA(t, a.dev, sbaGPA, true)
		tokB := register(t, a.dev, dmbGPA, 1<<20, 0xB, 1)
		tokC := register(t, a.dev, dmbGPA+(1<<20), 1<<20, 0xC, 2)
		tokA := register(t, a.dev, highGPA, 256<<10, 0xA, 3) // intra-VM

		type sender struct {
			d   *Device
			tok uint64
			off uint64
		}
		senders := []sender{
			{b.dev, tokB, 0}, {b.dev, tokB, 512 << 10},
			{c.dev, tokC, 0}, {c.dev, tokC, 512 << 10},
			{a.dev, tokA, 0},
		}
		started := make(chan struct{}, len(senders))
		var wg sync.WaitGroup
		for i, s := range senders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				data := bytes.Repeat([]byte{byte(i + 1)}, 4096)
				once := sync.OnceFunc(func() { started <- struct{}{} })
				defer once()
				for n := 0; ; n++ {
					off := s.off + uint64(n%64)*4096
					r := s.d.Handle(move(s.tok, uint32(n%32), off, len(data), n%2 == 0), [][]byte{data[:100], data[100:]})
					if n == 10 {
						once()
					}
					switch r.Status {
					case abi.StatusOK:
						continue
					case abi.StatusNoEntry, abi.StatusNotReady:
						return
					default:
						t.Errorf("sender %d: status %v", i, r.Status)
						return
					}
				}
			}()
		}
		for range senders {
			<-started
		}
		a.dev.Disconnect()
		low, high := a.snapshot()
		wg.Wait()
		if !bytes.Equal(a.low, low) || !bytes.Equal(a.high, high) {
			t.Fatalf("round %d: A's RAM written after Disconnect returned", round)
		}
		for _, g := range []*guest{b, c} {
			_, evs := g.n.snapshot()
			if len(evs) != 1 || evs[0] != (abi.Event{Type: abi.EventGID, GID: 0xA}) {
				t.Fatalf("round %d: %s events %+v", round, g.dev.Name(), evs)
			}
		}
		if s := f.Stats(); s.DMBs != 0 || s.Moves == 0 {
			t.Fatalf("round %d: stats %+v", round, s)
		}
	}
}

// TestMoveWhileUnregister: once UNREGISTER has returned OK, the DMB's memory
// is the driver's again and no MOVE writes it.
func TestMoveWhileUnregister(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	for round := range 50 {
		tok := register(t, a.dev, dmbGPA, 1<<20, 0xB, 1)
		started := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			data := make([]byte, 8192)
			for n := 0; ; n++ {
				r := b.dev.Handle(move(tok, 0, uint64(n%100)*8192, len(data), false), [][]byte{data})
				if n == 5 {
					close(started)
				}
				if r.Status != abi.StatusOK {
					if r.Status != abi.StatusNoEntry {
						t.Errorf("status %v", r.Status)
					}
					if n < 5 {
						close(started)
					}
					return
				}
			}
		}()
		<-started
		do(t, a.dev, abi.Request{Op: abi.OpUnregisterDMB, Token: tok}, nil, abi.StatusOK)
		// The driver reuses the memory: plain writes, which -race checks
		// against any late MOVE.
		mark := byte(round + 1)
		dmb := a.at(t, dmbGPA, 1<<20)
		for i := range dmb {
			dmb[i] = mark
		}
		<-done
		if bytes.Count(dmb, []byte{mark}) != len(dmb) {
			t.Fatalf("round %d: DMB written after UNREGISTER returned", round)
		}
	}
}

// TestConcurrentMixed runs every op from several guests at once, for -race.
func TestConcurrentMixed(t *testing.T) {
	f := newFabric()
	const n = 4
	gs := make([]*guest, n)
	for i := range gs {
		gs[i] = newGuest(t, f, "g", uint64(0x100+i))
		setSBA(t, gs[i].dev, sbaGPA, true)
	}
	var wg sync.WaitGroup
	for i, g := range gs {
		peer := gs[(i+1)%n]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := range 200 {
				idx := uint32(round % 16)
				// g's DMB for peer: peer is the only sender, and it
				// writes a region of its own choosing.
				r := g.dev.Handle(abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA + uint64(idx)*8192, Len: 8192, GID: peer.dev.GID(), Index: idx}, nil)
				if r.Status != abi.StatusOK {
					t.Errorf("register: %v", r.Status)
					return
				}
				g.dev.Handle(abi.Request{Op: abi.OpSignal, GID: peer.dev.GID(), Index: 1}, nil)
				g.dev.Handle(abi.Request{Op: abi.OpQueryRGID, GID: peer.dev.GID()}, nil)
				_ = f.Stats()
				_ = g.dev.Stats()
				g.dev.Handle(abi.Request{Op: abi.OpUnregisterDMB, Token: r.Value}, nil)
			}
		}()
		// Senders guess nothing: they MOVE to tokens from the table they
		// may write, racing with the owner's UNREGISTER.
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := make([]byte, 256)
			for range 2000 {
				var toks []uint64
				f.dmbs.Range(func(tok uint64, e *dmbEntry) bool {
					if e.rgid == peer.dev.GID() {
						toks = append(toks, tok)
					}
					return true
				})
				for _, tok := range toks {
					st := peer.dev.Handle(move(tok, 1, 0, len(data), true), [][]byte{data}).Status
					if st != abi.StatusOK && st != abi.StatusNoEntry {
						t.Errorf("move: %v", st)
					}
				}
			}
		}()
	}
	wg.Wait()
	if s := f.Stats(); s.DMBs != 0 {
		t.Fatalf("stats %+v", s)
	}
}
