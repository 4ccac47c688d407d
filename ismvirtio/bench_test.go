package ismvirtio

import (
	"runtime"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
	fe "github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// benchMoves measures MOVEs of size bytes from B into A's DMB through the
// whole path (ring, kick, descriptor walk, ism, copy, used ring). It drives
// the queue as a busy driver does: up to inflight requests outstanding,
// refilled as completions are polled, kicking only when the device's
// avail_event asks for it (EVENT_IDX).
func benchMoves(bm *testing.B, size int, inflight int) {
	s := newFabricServer(bm, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	a.setSBA()
	token, _ := a.register(1<<20, gidB, 0)

	// Every request reads the same header and writes the same response
	// buffer: the benchmark checks outcomes through the fabric's counters.
	r := abi.Request{Op: abi.OpMove, Token: token, Offset: 4096, Len: uint64(size), Flags: abi.FlagSignal}
	r.Encode(b.hdr)
	chain := []fe.Buf{
		{GPA: b.hdrGPA, Len: abi.RequestSize},
		{GPA: b.dataGPA, Len: uint32(size)},
		{GPA: b.respGPA, Len: abi.ResponseSize, Write: true},
	}
	b.req.SetAvailFlags(1) // VRING_AVAIL_F_NO_INTERRUPT: completions are polled
	var availIdx uint16
	kicks := 0
	bm.SetBytes(int64(size))
	bm.ResetTimer()
	for issued, done := 0, 0; done < bm.N; {
		old := availIdx
		for issued-done < inflight && issued < bm.N {
			b.req.Publish(b.req.AddChain(chain))
			availIdx++
			issued++
		}
		// virtio's vring_need_event: kick only if avail_event was passed.
		if availIdx != old && availIdx-b.req.AvailEvent()-1 < availIdx-old {
			kicks++
			if err := b.req.Kick(); err != nil {
				bm.Fatal(err)
			}
		}
		polled := false
		for {
			u, ok := b.req.PollUsed()
			if !ok {
				break
			}
			if u.Len != abi.ResponseSize {
				bm.Fatalf("used len %d", u.Len)
			}
			done++
			polled = true
		}
		if !polled {
			runtime.Gosched()
		}
	}
	bm.StopTimer()
	bm.ReportMetric(float64(kicks)/float64(bm.N), "kicks/op")
	st := s.fabric.Stats()
	if st.RefusedTotal() != 0 || st.Moves < uint64(bm.N) {
		bm.Fatalf("benchmark MOVEs did not all succeed: %+v", st)
	}
}

// BenchmarkMove64K is 64 KiB MOVE throughput; compare with BenchmarkMemmove64K.
func BenchmarkMove64K(bm *testing.B) { benchMoves(bm, 64<<10, 8) }

// BenchmarkMove64B is the small-message rate (ops/s = 1e9 / ns/op).
// Batch 64: three descriptors each fill 192 of the ring's 256.
func BenchmarkMove64B(bm *testing.B) { benchMoves(bm, 64, 64) }

// BenchmarkMemmove64K is the floor: one copy of 64 KiB between two
// memfd-backed guest memories, as the MOVE does, with nothing around it.
func BenchmarkMemmove64K(bm *testing.B) {
	src, err := fe.NewGuestMemory(0, 4<<20)
	if err != nil {
		bm.Fatal(err)
	}
	defer src.Close()
	dst, err := fe.NewGuestMemory(0, 4<<20)
	if err != nil {
		bm.Fatal(err)
	}
	defer dst.Close()
	_, from, _ := src.Alloc(guestDataSize, 4096)
	_, to, _ := dst.Alloc(1<<20, 4096)
	const size = 64 << 10
	bm.SetBytes(size)
	bm.ResetTimer()
	for i := 0; i < bm.N; i++ {
		off := (i * size) % (1<<20 - size + 1)
		copy(to[off:off+size], from[:size])
	}
}
