package ismvirtio

import (
	"os"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/vhostuser"
	"github.com/ism-backend/ism-backend/virtq"
)

// The MOVE benchmarks measure the host side of a MOVE through the whole
// vhost-user path (ring, kick, descriptor walk, GPA translation, ism, the
// copy, used ring, call) and, in the same run, a plain memmove of the same
// bytes between the same pages, alternating batches of each so that load
// from other processes hits both alike. ns/op and MB/s are the MOVEs';
// memmove-ns/op is the memmove's and x_memmove is memmove time / MOVE time
// (1 = the MOVE costs no more than the copy it does).
//
// The test frontend plays a guest that keeps up to window requests in
// flight and sleeps while the device works: it refills when half the
// window has completed and waits for that on the call eventfd (EVENT_IDX
// used_event), parked in the netpoller as a vCPU waiting for an interrupt is
// descheduled. It kicks only when avail_event asks for it. A frontend that
// polls the used ring instead (runtime.Gosched in a loop) measures itself:
// on 2 CPUs it took more than half the CPU time, mostly in the scheduler's
// locks, and kept the backend's goroutine from being woken by its kick for
// up to milliseconds.

const (
	benchHeaders = 256     // distinct requests (header + DMB offset)
	benchDMBSize = 1 << 20 // A's DMB; the offsets cycle through it
	// Requests in flight: enough that the frontend, woken late on a loaded
	// machine, refills the ring before the device has drained it (the
	// device then asks for no kick: kicks/op stays near one per round).
	benchWindow = 4096
)

type moveBench struct {
	bm     *testing.B
	s      *fabricServer
	b      *guest
	call   *os.File
	size   int
	window int

	out     [benchHeaders][2]virtq.Seg // header, data
	in      [1]virtq.Seg               // response: shared, checked once at the end
	offsets [benchHeaders]int
	heads   []uint16
	dst     []byte // A's DMB, mapped by the test: the pages the backend writes
	src     []byte // B's data buffer, which every MOVE reads

	nextMove, nextCopy int // position in the request cycle
	kicks, calls       int
}

// newMoveBench sets up B sending to A; extra VMs (by name, with GIDs from
// gidC on) are served by the same backend.
func newMoveBench(bm *testing.B, size, window int, extra ...string) *moveBench {
	// Three descriptors per request.
	qsize := 256
	for qsize < 3*window {
		qsize *= 2
	}
	if qsize > vhostuser.MaxQueueSize {
		bm.Fatalf("window %d does not fit a ring", window)
	}
	vms := map[string]uint64{"a": gidA, "b": gidB}
	for i, name := range extra {
		vms[name] = gidC + uint64(i)
	}
	s := newFabricServer(bm, vms)
	a, b := s.connect("a"), s.connectQueueSize("b", uint16(qsize))
	a.setSBA()
	token, dst := a.register(benchDMBSize, gidB, 0)
	m := &moveBench{bm: bm, s: s, b: b, size: size, window: window,
		heads: make([]uint16, window), dst: dst, src: b.data[:size]}
	for i := range m.src {
		m.src[i] = byte(i)
	}
	hdrGPA, hdrs, err := b.mem.Alloc(benchHeaders*abi.RequestSize, 8)
	if err != nil {
		bm.Fatal(err)
	}
	for i := range benchHeaders {
		m.offsets[i] = i % (benchDMBSize / size) * size
		r := abi.Request{Op: abi.OpMove, Token: token, Offset: uint64(m.offsets[i]), Len: uint64(size), Flags: abi.FlagSignal}
		r.Encode(hdrs[i*abi.RequestSize:])
		m.out[i] = [2]virtq.Seg{{Addr: hdrGPA + uint64(i*abi.RequestSize), Len: abi.RequestSize}, {Addr: b.dataGPA, Len: uint32(size)}}
	}
	m.in[0] = virtq.Seg{Addr: b.respGPA, Len: abi.ResponseSize}
	if m.call, err = b.req.CallFile(); err != nil {
		bm.Fatal(err)
	}
	bm.Cleanup(func() { m.call.Close() })
	return m
}

// moves issues n MOVEs and returns when all have completed.
func (m *moveBench) moves(n int) {
	q := m.b.req
	var buf [8]byte
	issued, done := 0, 0
	for done < n {
		k := 0
		for issued-done < m.window && issued < n {
			h, err := q.Add(m.out[m.nextMove%benchHeaders][:], m.in[:])
			if err != nil {
				m.bm.Fatal(err)
			}
			m.heads[k] = h
			m.nextMove++
			k++
			issued++
		}
		if k > 0 {
			q.Publish(m.heads[:k]...)
			kicked, err := q.KickIfNeeded()
			if err != nil {
				m.bm.Fatal(err)
			}
			if kicked {
				m.kicks++
			}
		}
		for {
			u, ok := q.Take()
			if !ok {
				break
			}
			if u.Len != abi.ResponseSize {
				m.bm.Fatalf("used len %d", u.Len)
			}
			done++
		}
		// Sleep until at most half the window is in flight (the end of
		// the round: until all are done).
		target := issued - m.window/2
		if issued == n {
			target = n
		}
		if target > done && !q.ArmUsedEvent(q.LastUsed()+uint16(target-done)) {
			if _, err := m.call.Read(buf[:]); err != nil {
				m.bm.Fatal(err)
			}
			m.calls++
		}
	}
}

// copies does what n MOVEs do with copy(): the same bytes from the same
// source to the same DMB offsets, on the same (memfd) pages.
func (m *moveBench) copies(n int) {
	for range n {
		off := m.offsets[m.nextCopy%benchHeaders]
		m.nextCopy++
		copy(m.dst[off:off+m.size], m.src)
	}
}

func benchMoves(bm *testing.B, size, window int) {
	m := newMoveBench(bm, size, window)
	// Rounds of four windows: the ring fills and drains (a kick and a
	// call) once per round.
	round := 4 * window
	// Both sides touch every page once before the clock runs (the backend
	// and the test map the memory files separately: each faults its own).
	m.moves(benchHeaders)
	m.copies(benchHeaders)
	m.nextMove, m.nextCopy, m.kicks, m.calls = 0, 0, 0, 0
	var tMove, tCopy time.Duration
	bm.SetBytes(int64(size))
	bm.ReportAllocs()
	bm.ResetTimer()
	for done, r := 0, 0; done < bm.N; r++ {
		n := min(round, bm.N-done)
		// Alternate which goes first, so neither always finds the
		// other's cache lines or follows the other's wake-ups.
		if r%2 == 0 {
			t0 := time.Now()
			m.moves(n)
			tMove += time.Since(t0)
			bm.StopTimer()
			t0 = time.Now()
			m.copies(n)
			tCopy += time.Since(t0)
			bm.StartTimer()
		} else {
			bm.StopTimer()
			t0 := time.Now()
			m.copies(n)
			tCopy += time.Since(t0)
			bm.StartTimer()
			t0 = time.Now()
			m.moves(n)
			tMove += time.Since(t0)
		}
		done += n
	}
	bm.StopTimer()
	bm.ReportMetric(float64(tCopy.Nanoseconds())/float64(bm.N), "memmove-ns/op")
	bm.ReportMetric(float64(tCopy)/float64(tMove), "x_memmove")
	bm.ReportMetric(float64(bm.N)/tMove.Seconds()/1e6, "Mops/s")
	bm.ReportMetric(float64(m.kicks)/float64(bm.N), "kicks/op")
	bm.ReportMetric(float64(m.calls)/float64(bm.N), "calls/op")
	st := m.s.fabric.Stats()
	if st.RefusedTotal() != 0 || st.Moves < uint64(bm.N) {
		bm.Fatalf("benchmark MOVEs did not all succeed: %+v", st)
	}
	if r, _ := abi.DecodeResponse(m.b.resp); r.Status != abi.StatusOK {
		bm.Fatalf("last MOVE: %v", r.Status)
	}
}

// BenchmarkMove64K is 64 KiB MOVE throughput next to memmove's.
func BenchmarkMove64K(bm *testing.B) { benchMoves(bm, 64<<10, benchWindow) }

// BenchmarkMove64B is the small-message rate (Mops/s) next to memmove's.
func BenchmarkMove64B(bm *testing.B) { benchMoves(bm, 64, benchWindow) }

// The churn benchmarks measure B's MOVEs into A while a third VM, C, sends
// control messages in a loop (RESET_DEVICE, SET_MEM_TABLE, REM_MEM_REG,
// ADD_MEM_REG: each one remaps C's memory), next to the same MOVEs with C
// quiet, alternating rounds of each. ns/op and MB/s are the MOVEs beside the
// churn; undisturbed-ns/op the quiet ones; x_undisturbed is churn time /
// quiet time (the target is at most 2: C's messages pause C, not A or B);
// ctlmsgs/s is C's message rate meanwhile. Both run on the test's 2 CPUs
// beside the frontends, so the churn also costs the MOVEs CPU time and
// mmap_lock. With pace > 0, C sends its four messages once per pace at
// most (the same churn whatever the backend's locking lets through);
// otherwise as fast as the backend answers.
func benchMovesBesideChurn(bm *testing.B, size int, pace time.Duration) {
	m := newMoveBench(bm, size, benchWindow, "c")
	c := m.s.connect("c")
	r1 := c.mem.Regions[1]
	churn := func(stop <-chan struct{}, done chan<- error, msgs *int) {
		next := time.Now()
		for {
			var wait <-chan time.Time
			if pace > 0 {
				next = next.Add(pace)
				wait = time.After(time.Until(next))
			}
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if _, err := c.fe.Request(vhostuser.ReqResetDevice, nil, nil, true); err != nil {
				done <- err
				return
			}
			if err := c.fe.SetMemTable(); err != nil {
				done <- err
				return
			}
			if err := c.fe.RemMemReg(r1); err != nil {
				done <- err
				return
			}
			if err := c.fe.AddMemReg(r1); err != nil {
				done <- err
				return
			}
			*msgs += 4
			if wait != nil {
				select {
				case <-stop:
					done <- nil
					return
				case <-wait:
				}
			}
		}
	}
	round := 4 * m.window
	m.moves(benchHeaders)
	m.nextMove, m.kicks, m.calls = 0, 0, 0
	var tQuiet, tChurn time.Duration
	msgs := 0
	disturbed := func(n int) {
		stop, done := make(chan struct{}), make(chan error, 1)
		go churn(stop, done, &msgs)
		t0 := time.Now()
		m.moves(n)
		tChurn += time.Since(t0)
		close(stop)
		if err := <-done; err != nil {
			bm.Fatal("churn:", err)
		}
	}
	quiet := func(n int) {
		bm.StopTimer()
		t0 := time.Now()
		m.moves(n)
		tQuiet += time.Since(t0)
		bm.StartTimer()
	}
	bm.SetBytes(int64(size))
	bm.ReportAllocs()
	bm.ResetTimer()
	for done, r := 0, 0; done < bm.N; r++ {
		n := min(round, bm.N-done)
		if r%2 == 0 {
			disturbed(n)
			quiet(n)
		} else {
			quiet(n)
			disturbed(n)
		}
		done += n
	}
	bm.StopTimer()
	bm.ReportMetric(float64(tQuiet.Nanoseconds())/float64(bm.N), "undisturbed-ns/op")
	bm.ReportMetric(float64(tChurn)/float64(tQuiet), "x_undisturbed")
	bm.ReportMetric(float64(msgs)/tChurn.Seconds(), "ctlmsgs/s")
	st := m.s.fabric.Stats()
	if st.RefusedTotal() != 0 || st.Moves < uint64(2*bm.N) {
		bm.Fatalf("benchmark MOVEs did not all succeed: %+v", st)
	}
}

// BenchmarkMove64KBesideChurn is 64 KiB MOVE throughput while another VM
// churns its control state, next to the undisturbed throughput.
func BenchmarkMove64KBesideChurn(bm *testing.B) { benchMovesBesideChurn(bm, 64<<10, 0) }

// BenchmarkMove64BBesideChurn is the small-message rate beside the churn.
func BenchmarkMove64BBesideChurn(bm *testing.B) { benchMovesBesideChurn(bm, 64, 0) }

// BenchmarkMove64KBesidePacedChurn is BenchmarkMove64KBesideChurn with C's
// churn held to 2000 messages/s, for a comparison at the same churn.
func BenchmarkMove64KBesidePacedChurn(bm *testing.B) {
	benchMovesBesideChurn(bm, 64<<10, 2*time.Millisecond)
}

// BenchmarkMove64BBesidePacedChurn is the small-message rate beside the
// paced churn.
func BenchmarkMove64BBesidePacedChurn(bm *testing.B) {
	benchMovesBesideChurn(bm, 64, 2*time.Millisecond)
}
