package vhostuser

import "testing"

// benchRing drives one request per iteration the way the ISM request queue
// sees it: the driver publishes a chain (64-byte request readable, 16-byte
// response writable), the device takes it with Next, copies the request
// out, writes the response and Pushes; the driver reaps the used entry.
// Notify runs once per batch of 64 (no eventfd: its syscall is not the
// library's cost).
func benchRing(b *testing.B, indirect bool) {
	mem := testMemory(b, 0, 0x40000)
	r := newTestRing(b, mem, 256)
	r.q.eventIdx = true
	const req, resp, table = 0x1000, 0x2000, 0x3000
	if indirect {
		putDesc(b, mem, table, 0, req, 64, descFNext, 1)
		putDesc(b, mem, table, 1, resp, 16, descFWrite, 0)
		r.PutDesc(0, table, 32, descFIndirect, 0)
	} else {
		r.PutDesc(0, req, 64, descFNext, 1)
		r.PutDesc(1, resp, 16, descFWrite, 0)
	}
	var c Chain
	var hdr [64]byte
	var out [16]byte
	var rd Reader
	var wr Writer
	b.ReportAllocs()
	b.SetBytes(64)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// driver: publish head 0 (same chain reused)
		r.Publish(0)
		// device
		ok, err := r.q.Next(&c)
		if !ok || err != nil {
			b.Fatal(ok, err)
		}
		rd.Reset(&c)
		wr.Reset(&c)
		rd.Read(hdr[:])
		out[0] = hdr[0]
		wr.Write(out[:])
		r.q.Push(&c, 16)
		if r.AvailIdx()&63 == 0 {
			r.q.Next(&c) // empty: sets avail_event, as at the end of a batch
			r.q.Notify()
		}
		// driver: reap
		if r.UsedIdx() != r.AvailIdx() {
			b.Fatal("not used")
		}
	}
}

func BenchmarkNextPush(b *testing.B)         { benchRing(b, false) }
func BenchmarkNextPushIndirect(b *testing.B) { benchRing(b, true) }
