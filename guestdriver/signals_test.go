package guestdriver

import (
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/ism-backend/ism-backend/abi"
)

// The signalling block against a device that writes it from other threads
// while the driver reads, with no VM: the driver's claims of ABI v1 made
// non-atomic the way single-threaded TCG makes a guest's XCHG (an atomic load,
// then an atomic store, with a scheduling point between), against ABI v2,
// where the driver writes nothing.
//
// Each of 64 device goroutines plays one side of a ping-pong on its own DMB
// index, all in one 64-bit SBA word: it signals, then waits for the driver
// to acknowledge. A signal whose write completed before a scan started, and
// which that scan does not find and no earlier scan acknowledged, is lost:
// its ping-pong would wait for ever, as the SMC-D HTTP stall did.

// signalProtocol is the SBA as one ABI version has both sides use it.
type signalProtocol interface {
	signal(i, e uint32)             // the device's write, from any goroutine
	scan(found func(i uint32)) bool // the driver's look, from one goroutine
}

// sbaV1 is the protocol of ABI v1: the device ORs the DMBE bit into a mask
// word and the DMB bit into a bits word; the driver claims by swapping the
// bits word, then each set index's mask, with zero.
type sbaV1 struct {
	bits [abi.MaxDMBs / 64]atomic.Uint64
	mask [abi.MaxDMBs]atomic.Uint32
}

func (s *sbaV1) signal(i, e uint32) {
	s.mask[i].Or(1 << e)
	s.bits[i/64].Or(1 << (i % 64))
}

// swap is XCHG as single-threaded TCG executes it: a load and a store, with
// room between them for another thread's write.
func swapLikeTCG[T uint32 | uint64](load func() T, store func(T)) T {
	v := load()
	runtime.Gosched()
	store(0)
	return v
}

func (s *sbaV1) scan(found func(i uint32)) bool {
	any := false
	for w := range s.bits {
		v := swapLikeTCG(s.bits[w].Load, s.bits[w].Store)
		for v != 0 {
			b := uint32(bits.TrailingZeros64(v))
			v &^= 1 << b
			i := uint32(64*w) + b
			swapLikeTCG(s.mask[i].Load, s.mask[i].Store)
			found(i)
			any = true
		}
	}
	return any
}

// sbaV2 is ABI v2 as the code has it: the device side is abi.SBA.Signal, the
// driver side the driver's own signalReader.
type sbaV2 struct {
	sba     abi.SBA
	r       signalReader
	targets [abi.MaxDMBs]*testTarget
	found   func(i uint32)
}

type testTarget struct {
	s     *sbaV2
	i     uint32
	seen  dmbSignals
	dmbes uint32
}

func (t *testTarget) copies() *dmbSignals { return &t.seen }
func (t *testTarget) signalled(dmbes uint32) {
	t.dmbes |= dmbes
	t.s.found(t.i)
}

func newSBAV2(t *testing.T) *sbaV2 {
	mem := make([]uint64, abi.SBASize/8)
	sba, err := abi.NewSBA(unsafe.Slice((*byte)(unsafe.Pointer(&mem[0])), abi.SBASize))
	if err != nil {
		t.Fatal(err)
	}
	s := &sbaV2{sba: sba, r: signalReader{sba: sba, n: abi.MaxDMBs}}
	for i := range s.targets {
		s.targets[i] = &testTarget{s: s, i: uint32(i)}
	}
	return s
}

func (s *sbaV2) signal(i, e uint32) { s.sba.Signal(i, e) }

func (s *sbaV2) scan(found func(i uint32)) bool {
	s.found = found
	return s.r.scan(func(i uint32) signalTarget { return s.targets[i] })
}

// pingPong runs pingers device goroutines of rounds signals each and
// returns how many signals were lost (it stops at the first loss) and how
// many were acknowledged.
func pingPong(p signalProtocol, pingers, rounds int) (lost, acked int64) {
	acks := make([]chan struct{}, pingers)
	for i := range acks {
		acks[i] = make(chan struct{}, 1)
	}
	var sent atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < pingers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				p.signal(uint32(i), uint32(r%abi.MaxDMBEs))
				sent.Add(1) // after the write: sent counts completed writes
				select {
				case <-acks[i]:
				case <-done:
					return
				}
			}
		}()
	}
	total := int64(pingers * rounds)
	for acked < total {
		s0 := sent.Load()
		if p.scan(func(i uint32) { acked++; acks[i] <- struct{}{} }) {
			continue
		}
		// Nothing found, yet a write that completed before this scan
		// was never acknowledged: nothing will ever signal it again.
		if acked < s0 {
			lost = s0 - acked
			break
		}
		runtime.Gosched()
	}
	close(done)
	wg.Wait()
	return lost, acked
}

// TestSignalsLostV1 reproduces the stall without a VM: with claims made
// non-atomic, ABI v1 loses a signal. A loss needs a device write to land
// between a claim's load and store; each run of 128,000 signals usually has
// one, and the test tries up to 20 runs before it calls the reproduction
// broken.
func TestSignalsLostV1(t *testing.T) {
	var total int64
	for run := 0; run < 20; run++ {
		lost, acked := pingPong(&sbaV1{}, 64, 2000)
		total += acked
		if lost > 0 {
			t.Logf("ABI v1: %d signal(s) lost after %d acknowledged (run %d)", lost, total, run+1)
			return
		}
	}
	t.Fatalf("ABI v1 with TCG-like claims lost no signal in %d: the reproduction no longer reproduces", total)
}

// TestSignalsKeptV2 runs the same ping-pong on ABI v2: no signal is lost,
// and every DMBE signalled is reported.
func TestSignalsKeptV2(t *testing.T) {
	const pingers, rounds = 64, 2000
	s := newSBAV2(t)
	lost, acked := pingPong(s, pingers, rounds)
	if lost != 0 || acked != pingers*rounds {
		t.Fatalf("ABI v2: %d lost, %d of %d acknowledged", lost, acked, pingers*rounds)
	}
	for i := 0; i < pingers; i++ {
		if got := s.targets[i].dmbes; got != ^uint32(0) {
			t.Errorf("DMB %d: DMBEs %#x reported, want all 32", i, got)
		}
		if seq := s.sba.Seq(uint32(i)); seq != rounds {
			t.Errorf("DMB %d: seq %d, want %d", i, seq, rounds)
		}
	}
	if sum := s.sba.Sum(); sum != pingers*rounds {
		t.Errorf("sum %d, want %d", sum, pingers*rounds)
	}
}
