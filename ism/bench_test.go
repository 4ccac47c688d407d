package ism

import (
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/abi"
)

// benchSetup: A owns a 1 MiB DMB that B writes.
func benchSetup(b *testing.B) (a, s *guest, tok uint64) {
	f := newFabric()
	a = newGuest(b, f, "a", 0xA)
	s = newGuest(b, f, "b", 0xB)
	setSBA(b, a.dev, sbaGPA, true)
	tok = register(b, a.dev, dmbGPA, 1<<20, 0xB, 1)
	return a, s, tok
}

func benchMove(b *testing.B, n int, signal bool) {
	_, s, tok := benchSetup(b)
	src := make([]byte, n)
	for i := range src {
		src[i] = byte(i)
	}
	data := [][]byte{src}
	slots := (1 << 20) / n
	b.SetBytes(int64(n))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if err := s.dev.Move(tok, 0, uint64(i%slots*n), signal, data); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

// BenchmarkMove64K and BenchmarkMemmove64K copy the same sizes to the same
// offsets of the same kind of memory: their ratio is the device model's cost.
func BenchmarkMove64K(b *testing.B)         { benchMove(b, 64<<10, true) }
func BenchmarkMove64KNoSignal(b *testing.B) { benchMove(b, 64<<10, false) }
func BenchmarkMove64B(b *testing.B)         { benchMove(b, 64, true) }
func BenchmarkMove64BNoSignal(b *testing.B) { benchMove(b, 64, false) }

func benchMemmove(b *testing.B, n int) {
	a, _, _ := benchSetup(b)
	dst := a.at(b, dmbGPA, 1<<20)
	src := make([]byte, n)
	for i := range src {
		src[i] = byte(i)
	}
	slots := (1 << 20) / n
	b.SetBytes(int64(n))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		copy(dst[i%slots*n:], src)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

func BenchmarkMemmove64K(b *testing.B) { benchMemmove(b, 64<<10) }
func BenchmarkMemmove64B(b *testing.B) { benchMemmove(b, 64) }

// BenchmarkHandleMove64B goes through Handle, as the transport does.
func BenchmarkHandleMove64B(b *testing.B) {
	_, s, tok := benchSetup(b)
	data := [][]byte{make([]byte, 64)}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if r := s.dev.Handle(move(tok, 0, uint64(i%1024*64), 64, true), data); r.Status != abi.StatusOK {
			b.Fatal(r.Status)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

// BenchmarkMove64BParallel: several senders into one owner's DMBs at once,
// which is where the token table and the owner's lock are shared; with
// signal they also count up the owner's SBA group and sum counters.
func BenchmarkMove64BParallel(b *testing.B)         { benchMoveParallel(b, true) }
func BenchmarkMove64BParallelNoSignal(b *testing.B) { benchMoveParallel(b, false) }

func benchMoveParallel(b *testing.B, signal bool) {
	f := newFabric()
	a := newGuest(b, f, "a", 0xA)
	setSBA(b, a.dev, sbaGPA, true)
	const senders = 8
	toks := make([]uint64, senders)
	devs := make([]*Device, senders)
	for i := range senders {
		devs[i] = newGuest(b, f, "s", uint64(0x100+i)).dev
		toks[i] = register(b, a.dev, dmbGPA+uint64(i)*65536, 65536, devs[i].GID(), uint32(i))
	}
	next := make(chan int, senders)
	for i := range senders {
		next <- i
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := <-next % senders // each goroutine its own sender and DMB: no overlapping writes
		data := [][]byte{make([]byte, 64)}
		for n := 0; pb.Next(); n++ {
			if err := devs[i].Move(toks[i], 0, uint64(n%1024*64), signal, data); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

// benchMoveVsMemmove alternates batches of Moves (the device model alone: no
// transport) and plain copies of the same bytes to the same offsets, so that
// load from other processes hits both alike. ns/op and MB/s are the Moves';
// memmove-ns/op is the copies' and x_memmove is copy time / Move time
// (1 = the Move costs nothing over its copy).
func benchMoveVsMemmove(b *testing.B, n, batch int) {
	a, s, tok := benchSetup(b)
	slots := (1 << 20) / n
	dst := a.at(b, dmbGPA, 1<<20)
	src := make([]byte, n)
	for i := range src {
		src[i] = byte(i)
	}
	data := [][]byte{src}
	var tMove, tCopy time.Duration
	moves := func(i, k int) {
		t0 := time.Now()
		for j := range k {
			if err := s.dev.Move(tok, 0, uint64((i+j)%slots*n), true, data); err != nil {
				b.Fatal(err)
			}
		}
		tMove += time.Since(t0)
	}
	copies := func(i, k int) {
		b.StopTimer()
		t0 := time.Now()
		for j := range k {
			copy(dst[(i+j)%slots*n:], src)
		}
		tCopy += time.Since(t0)
		b.StartTimer()
	}
	b.SetBytes(int64(n))
	b.ReportAllocs()
	b.ResetTimer()
	for i, r := 0, 0; i < b.N; r++ {
		k := min(batch, b.N-i)
		// Alternate which goes first, so neither always finds the
		// other's cache lines.
		if r%2 == 0 {
			moves(i, k)
			copies(i, k)
		} else {
			copies(i, k)
			moves(i, k)
		}
		i += k
	}
	b.StopTimer()
	b.ReportMetric(float64(tCopy.Nanoseconds())/float64(b.N), "memmove-ns/op")
	b.ReportMetric(float64(tCopy)/float64(tMove), "x_memmove")
	b.ReportMetric(float64(b.N)/tMove.Seconds()/1e6, "Mops/s")
}

// Batches of about a quarter of a millisecond.
func BenchmarkMove64KVsMemmove(b *testing.B) { benchMoveVsMemmove(b, 64<<10, 256) }
func BenchmarkMove64BVsMemmove(b *testing.B) { benchMoveVsMemmove(b, 64, 16384) }
