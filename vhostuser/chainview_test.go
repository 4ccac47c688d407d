package vhostuser

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"unsafe"
)

// viewLayout is a chain built by hand over one backing buffer: each segment
// is followed by a guard byte that no view may touch, so that a write or a
// read outside the chain's descriptors shows.
type viewLayout struct {
	back  []byte   // segments and guards
	segs  [][]byte // into back
	flat  []int    // flat[i]: index in back of the chain's i-th byte
	guard byte
}

const viewGuard = 0xA5

func newViewLayout(lens ...int) *viewLayout {
	l := &viewLayout{guard: viewGuard}
	total := 0
	for _, n := range lens {
		total += n + 1
	}
	l.back = make([]byte, total)
	for i := range l.back {
		l.back[i] = viewGuard
	}
	at := 0
	for _, n := range lens {
		s := l.back[at : at+n : at+n]
		for i := range s {
			s[i] = byte(len(l.flat) + i + 1)
		}
		for i := range n {
			l.flat = append(l.flat, at+i)
		}
		l.segs = append(l.segs, s)
		at += n + 1
	}
	return l
}

// contents is the chain's bytes, flat.
func (l *viewLayout) contents() []byte {
	out := make([]byte, len(l.flat))
	for i, j := range l.flat {
		out[i] = l.back[j]
	}
	return out
}

// guardsIntact reports whether every byte outside the segments still holds
// the guard.
func (l *viewLayout) guardsIntact() bool {
	in := make([]bool, len(l.back))
	for _, j := range l.flat {
		in[j] = true
	}
	for j, b := range l.back {
		if !in[j] && b != l.guard {
			return false
		}
	}
	return true
}

// readChain and writeChain make a Chain whose readable (writable) part is
// l's segments.
func (l *viewLayout) readChain() *Chain {
	return &Chain{readable: l.segs, readLen: uint64(len(l.flat))}
}

func (l *viewLayout) writeChain() *Chain {
	return &Chain{writable: l.segs, writeLen: uint64(len(l.flat))}
}

func TestReaderShortChain(t *testing.T) {
	l := newViewLayout(5)
	r := l.readChain().Reader()
	if r.Len() != 5 || r.Consumed() != 0 {
		t.Fatalf("fresh reader: len %d consumed %d", r.Len(), r.Consumed())
	}
	p := make([]byte, 3)
	if n, err := r.Read(p); n != 3 || err != nil || !bytes.Equal(p, []byte{1, 2, 3}) {
		t.Fatalf("Read 3: %d %v % x", n, err, p)
	}
	if n, err := r.Read(nil); n != 0 || err != nil {
		t.Fatalf("empty Read before the end: %d %v", n, err)
	}
	p = make([]byte, 10)
	if n, err := r.Read(p); n != 2 || err != nil || !bytes.Equal(p[:2], []byte{4, 5}) {
		t.Fatalf("over-long Read: %d %v % x", n, err, p[:2])
	}
	if n, err := r.Read(p); n != 0 || err != io.EOF {
		t.Fatalf("Read at the end: %d %v, want 0 EOF", n, err)
	}
	if r.Len() != 0 || r.Consumed() != 5 {
		t.Fatalf("spent reader: len %d consumed %d", r.Len(), r.Consumed())
	}
	// A chain without a readable part reads as empty.
	var c Chain
	r = c.Reader()
	if n, err := r.Read(p); n != 0 || err != io.EOF || r.Len() != 0 {
		t.Fatalf("empty chain: %d %v len %d", n, err, r.Len())
	}
}

// TestViewsReset: a view Reset to another chain forgets the old one: its
// position, its count and its table.
func TestViewsReset(t *testing.T) {
	l1, l2 := newViewLayout(2, 2), newViewLayout(3)
	c1, c2 := l1.readChain(), l2.writeChain()
	c1.writable, c1.writeLen = l1.segs, uint64(len(l1.flat))
	c1.mem = &Memory{}
	var r Reader
	var w Writer
	r.Reset(c1)
	w.Reset(c1)
	r.Skip(3)
	w.Write([]byte{7, 7, 7})
	r.Reset(c2) // c2 has no readable part
	w.Reset(c2)
	if r.Len() != 0 || r.Consumed() != 0 || r.Memory() != nil {
		t.Fatalf("reader after Reset: len %d consumed %d", r.Len(), r.Consumed())
	}
	if n, err := w.Write([]byte{1, 2, 3, 4}); n != 3 || err != io.ErrShortWrite || w.Written() != 3 || w.Memory() != nil {
		t.Fatalf("writer after Reset: %d %v written %d", n, err, w.Written())
	}
	if !bytes.Equal(l2.contents(), []byte{1, 2, 3}) || !l2.guardsIntact() {
		t.Fatalf("second chain % x", l2.contents())
	}
}

func TestWriterShortChain(t *testing.T) {
	l := newViewLayout(4)
	w := l.writeChain().Writer()
	if n, err := w.Write([]byte{9, 8, 7}); n != 3 || err != nil {
		t.Fatalf("Write 3: %d %v", n, err)
	}
	if n, err := w.Write([]byte{6, 5, 4}); n != 1 || err != io.ErrShortWrite {
		t.Fatalf("over-long Write: %d %v, want 1 ErrShortWrite", n, err)
	}
	if n, err := w.Write([]byte{3}); n != 0 || err != io.ErrShortWrite {
		t.Fatalf("Write to a full view: %d %v", n, err)
	}
	if n, err := w.Write(nil); n != 0 || err != nil {
		t.Fatalf("empty Write to a full view: %d %v", n, err)
	}
	if got := l.contents(); !bytes.Equal(got, []byte{9, 8, 7, 6}) || !l.guardsIntact() {
		t.Fatalf("contents % x, guards intact %v", got, l.guardsIntact())
	}
	if w.Len() != 0 || w.Written() != 4 {
		t.Fatalf("full writer: len %d written %d", w.Len(), w.Written())
	}
	var c Chain
	w = c.Writer()
	if n, err := w.Write([]byte{1}); n != 0 || err != io.ErrShortWrite {
		t.Fatalf("empty chain: %d %v", n, err)
	}
}

func TestViewsStraddleSegments(t *testing.T) {
	l := newViewLayout(3, 1, 4, 2) // 10 bytes in four segments
	r := l.readChain().Reader()
	p := make([]byte, 5)
	if n, err := r.Read(p); n != 5 || err != nil || !bytes.Equal(p, []byte{1, 2, 3, 4, 5}) {
		t.Fatalf("Read across three segments: %d %v % x", n, err, p)
	}
	if n, err := r.Read(p); n != 5 || err != nil || !bytes.Equal(p, []byte{6, 7, 8, 9, 10}) {
		t.Fatalf("Read of the rest: %d %v % x", n, err, p)
	}
	if _, err := r.Read(p); err != io.EOF {
		t.Fatalf("Read at the end: %v", err)
	}

	w := l.writeChain().Writer()
	if n, err := w.Write([]byte{0x10, 0x11}); n != 2 || err != nil {
		t.Fatal(n, err)
	}
	if n, err := w.Write([]byte{0x12, 0x13, 0x14, 0x15, 0x16, 0x17}); n != 6 || err != nil {
		t.Fatal(n, err)
	}
	if n, err := w.Write([]byte{0x18, 0x19, 0x1a}); n != 2 || err != io.ErrShortWrite {
		t.Fatalf("Write over the end: %d %v", n, err)
	}
	want := []byte{0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19}
	if got := l.contents(); !bytes.Equal(got, want) || !l.guardsIntact() {
		t.Fatalf("contents % x (want % x), guards intact %v", got, want, l.guardsIntact())
	}
}

func TestViewsSkip(t *testing.T) {
	l := newViewLayout(2, 3)
	r := l.readChain().Reader()
	if n, err := r.Skip(3); n != 3 || err != nil || r.Len() != 2 || r.Consumed() != 3 {
		t.Fatalf("Skip 3: %d %v len %d consumed %d", n, err, r.Len(), r.Consumed())
	}
	var b [1]byte
	if n, _ := r.Read(b[:]); n != 1 || b[0] != 4 {
		t.Fatalf("Read after Skip: %d % x", n, b)
	}
	if n, err := r.Skip(-1); n != 0 || !errors.Is(err, ErrViewRange) || r.Len() != 1 {
		t.Fatalf("negative Skip: %d %v", n, err)
	}
	if n, err := r.Skip(10); n != 1 || err != io.EOF || r.Len() != 0 {
		t.Fatalf("Skip past the end: %d %v len %d", n, err, r.Len())
	}
	if n, err := r.Skip(0); n != 0 || err != nil {
		t.Fatalf("Skip 0 at the end: %d %v", n, err)
	}
	if n, err := r.Skip(1); n != 0 || err != io.EOF {
		t.Fatalf("Skip at the end: %d %v", n, err)
	}

	w := l.writeChain().Writer()
	if n, err := w.Skip(4); n != 4 || err != nil || w.Written() != 4 {
		t.Fatalf("Writer Skip: %d %v written %d", n, err, w.Written())
	}
	if n, err := w.Write([]byte{0x77, 0x78}); n != 1 || err != io.ErrShortWrite {
		t.Fatalf("Write after Skip: %d %v", n, err)
	}
	if n, err := w.Skip(1); n != 0 || err != io.EOF {
		t.Fatalf("Writer Skip past the end: %d %v", n, err)
	}
	if got := l.contents(); !bytes.Equal(got, []byte{1, 2, 3, 4, 0x77}) || !l.guardsIntact() {
		t.Fatalf("contents % x", got)
	}
}

func TestViewsSplitAt(t *testing.T) {
	l := newViewLayout(3, 4)
	r := l.readChain().Reader()
	r.Skip(1)
	if _, err := r.SplitAt(7); !errors.Is(err, ErrViewRange) || r.Len() != 6 {
		t.Fatalf("split past the end: %v, len %d", err, r.Len())
	}
	if _, err := r.SplitAt(-1); !errors.Is(err, ErrViewRange) || r.Len() != 6 {
		t.Fatalf("split at -1: %v, len %d", err, r.Len())
	}
	rest, err := r.SplitAt(3) // inside the second segment
	if err != nil || r.Len() != 3 || rest.Len() != 3 || rest.Consumed() != 0 || r.Consumed() != 1 {
		t.Fatalf("split: %v, lens %d %d, consumed %d %d", err, r.Len(), rest.Len(), r.Consumed(), rest.Consumed())
	}
	head, _ := io.ReadAll(&r)
	tail, _ := io.ReadAll(&rest)
	if !bytes.Equal(head, []byte{2, 3, 4}) || !bytes.Equal(tail, []byte{5, 6, 7}) {
		t.Fatalf("halves % x and % x", head, tail)
	}
	// At the ends: an empty head or an empty rest.
	r = l.readChain().Reader()
	if rest, err := r.SplitAt(0); err != nil || r.Len() != 0 || rest.Len() != 7 {
		t.Fatalf("split at 0: %v %d %d", err, r.Len(), rest.Len())
	}
	r = l.readChain().Reader()
	if rest, err := r.SplitAt(7); err != nil || r.Len() != 7 || rest.Len() != 0 {
		t.Fatalf("split at len: %v %d %d", err, r.Len(), rest.Len())
	}

	// A Writer's head stops at the split, whatever is written to it.
	w := l.writeChain().Writer()
	wrest, err := w.SplitAt(2)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := w.Write([]byte{0xe0, 0xe1, 0xe2}); n != 2 || err != io.ErrShortWrite {
		t.Fatalf("Write over the split: %d %v", n, err)
	}
	if n, err := wrest.Write([]byte{0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6}); n != 5 || err != io.ErrShortWrite {
		t.Fatalf("Write to the rest: %d %v", n, err)
	}
	want := []byte{0xe0, 0xe1, 0xf0, 0xf1, 0xf2, 0xf3, 0xf4}
	if got := l.contents(); !bytes.Equal(got, want) || !l.guardsIntact() {
		t.Fatalf("contents % x, want % x", got, want)
	}
}

// shortWriter takes at most max bytes per Write, without an error: Go's io
// contracts make the caller turn that into io.ErrShortWrite.
type shortWriter struct {
	buf bytes.Buffer
	max int
}

func (w *shortWriter) Write(p []byte) (int, error) {
	if len(p) > w.max {
		p = p[:w.max]
	}
	return w.buf.Write(p)
}

func TestReaderWriteTo(t *testing.T) {
	l := newViewLayout(2, 0, 5, 1)
	r := l.readChain().Reader()
	r.Skip(1)
	var buf bytes.Buffer
	if n, err := r.WriteTo(&buf); n != 7 || err != nil || !bytes.Equal(buf.Bytes(), l.contents()[1:]) {
		t.Fatalf("WriteTo: %d %v % x", n, err, buf.Bytes())
	}
	if n, err := r.WriteTo(&buf); n != 0 || err != nil {
		t.Fatalf("WriteTo at the end: %d %v", n, err)
	}
	// The first run (2 bytes) fits the short writer, the third (5) does
	// not: WriteTo stops there with what was taken.
	r = l.readChain().Reader()
	sw := &shortWriter{max: 3}
	if n, err := r.WriteTo(sw); n != 5 || err != io.ErrShortWrite || r.Len() != 3 || !bytes.Equal(sw.buf.Bytes(), []byte{1, 2, 3, 4, 5}) {
		t.Fatalf("WriteTo a short writer: %d %v, left %d, % x", n, err, r.Len(), sw.buf.Bytes())
	}
}

// emptyReader returns no data and no error for ever.
type emptyReader struct{}

func (emptyReader) Read([]byte) (int, error) { return 0, nil }

func TestWriterReadFrom(t *testing.T) {
	l := newViewLayout(2, 3)
	w := l.writeChain().Writer()
	if n, err := w.ReadFrom(bytes.NewReader([]byte{0x31, 0x32, 0x33})); n != 3 || err != nil || w.Len() != 2 {
		t.Fatalf("ReadFrom a shorter source: %d %v len %d", n, err, w.Len())
	}
	if n, err := w.ReadFrom(bytes.NewReader([]byte{0x34, 0x35})); n != 2 || err != nil {
		t.Fatalf("ReadFrom filling the view exactly: %d %v", n, err)
	}
	if got := l.contents(); !bytes.Equal(got, []byte{0x31, 0x32, 0x33, 0x34, 0x35}) || !l.guardsIntact() {
		t.Fatalf("contents % x", got)
	}
	w = l.writeChain().Writer()
	if n, err := w.ReadFrom(bytes.NewReader(make([]byte, 6))); n != 5 || err != io.ErrShortWrite {
		t.Fatalf("ReadFrom a longer source: %d %v", n, err)
	}
	w = l.writeChain().Writer()
	if n, err := w.ReadFrom(emptyReader{}); n != 0 || err != io.ErrNoProgress {
		t.Fatalf("ReadFrom a source that never gives data: %d %v", n, err)
	}
	// io.Copy between two views uses them both, across segments.
	src := newViewLayout(1, 4)
	dst := newViewLayout(3, 2)
	r, w := src.readChain().Reader(), dst.writeChain().Writer()
	if n, err := io.Copy(&w, &r); n != 5 || err != nil || !bytes.Equal(dst.contents(), src.contents()) || !dst.guardsIntact() {
		t.Fatalf("io.Copy: %d %v % x", n, err, dst.contents())
	}
}

func TestReaderAppendSegments(t *testing.T) {
	l := newViewLayout(4, 3, 5)
	r := l.readChain().Reader()
	r.Skip(6)
	segs := r.AppendSegments(nil)
	if len(segs) != 2 || r.Len() != 6 || r.Consumed() != 6 {
		t.Fatalf("%d segments, len %d consumed %d", len(segs), r.Len(), r.Consumed())
	}
	// The slices are the chain's own memory, not copies.
	if &segs[0][0] != &l.segs[1][2] || &segs[1][0] != &l.segs[2][0] || len(segs[0]) != 1 || len(segs[1]) != 5 {
		t.Fatal("segments are not the chain's memory from the read position")
	}
	// A split view gives only its own bytes.
	rest, _ := r.SplitAt(3)
	if segs = r.AppendSegments(segs[:0]); len(segs) != 2 || len(segs[0]) != 1 || len(segs[1]) != 2 {
		t.Fatalf("head of a split: %d segments", len(segs))
	}
	if segs = rest.AppendSegments(segs[:0]); len(segs) != 1 || &segs[0][0] != &l.segs[2][2] || len(segs[0]) != 3 {
		t.Fatal("rest of a split: wrong segments")
	}
	// A head cut inside one segment reaches nothing past the cut.
	r = l.readChain().Reader()
	r.SplitAt(2)
	if segs = r.AppendSegments(segs[:0]); len(segs) != 1 || len(segs[0]) != 2 || cap(segs[0]) != 2 {
		t.Fatalf("head cut inside a segment: %d segments", len(segs))
	}
}

// TestChainViewsFromRing takes the views of a chain walked through a ring:
// they are bound to the table the chain was walked with, cover exactly its
// descriptors across a region boundary, and the request path through them
// allocates nothing.
func TestChainViewsFromRing(t *testing.T) {
	const sz = 0x20000
	mem := testMemory(t, 0, sz, sz)
	rg := newTestRing(t, mem, 8)
	// 48 readable bytes (a header) then 64 that cross into region 1, then
	// 16 writable.
	rg.PutDesc(0, 0x4000, 48, descFNext, 1)
	rg.PutDesc(1, sz-24, 64, descFNext, 2)
	rg.PutDesc(2, 0x5000, 16, descFWrite, 0)
	data := make([]byte, 64)
	for i := range data {
		data[i] = byte(0x40 + i)
	}
	mem.testWrite(t, sz-24, data)
	rg.Publish(0)
	var c Chain
	if ok, err := rg.q.Next(&c); !ok || err != nil {
		t.Fatal(ok, err)
	}
	r, w := c.Reader(), c.Writer()
	if c.Memory() != mem || r.Memory() != mem || w.Memory() != mem {
		t.Fatal("views not bound to the table the chain was walked with")
	}
	if r.Len() != 112 || w.Len() != 16 {
		t.Fatalf("lengths %d %d", r.Len(), w.Len())
	}
	var hdr [48]byte
	var segs [][]byte
	resp := []byte("sixteen byte rsp")
	allocs := testing.AllocsPerRun(100, func() {
		r, w := c.Reader(), c.Writer()
		r.Read(hdr[:])
		segs = r.AppendSegments(segs[:0])
		w.Write(resp)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per request", allocs)
	}
	var got []byte
	for _, s := range segs {
		if !inside(mem, s) {
			t.Fatal("segment outside guest RAM")
		}
		got = append(got, s...)
	}
	if len(segs) != 2 || !bytes.Equal(got, data) {
		t.Fatalf("%d data segments: % x", len(segs), got)
	}
	out, _ := mem.Bytes(0x5000, 17)
	if !bytes.Equal(out[:16], resp) || out[16] != 0 {
		t.Fatalf("response % x", out)
	}
	// A refused chain has no buffers and no table.
	rg.PutDesc(3, 2*sz, 8, 0, 0) // outside guest RAM
	rg.Publish(3)
	if ok, err := rg.q.Next(&c); ok || err == nil {
		t.Fatal("chain outside guest RAM taken")
	}
	r, w = c.Reader(), c.Writer()
	if c.Memory() != nil || r.Len() != 0 || w.Len() != 0 {
		t.Fatal("refused chain left views")
	}
}

// FuzzChainViews runs random operations on a Reader and a Writer over
// random segment layouts and checks them against a flat copy of the chain:
// what they read, write, skip, split and report, and that no byte outside
// the segments changes.
//
// Input: data[0] is the segment count (1..8), then one length byte per
// segment (0..31), then two bytes per operation (kind, argument).
func FuzzChainViews(f *testing.F) {
	f.Add([]byte{3, 5, 0, 7, 0, 3, 1, 2, 2, 9, 3, 20})
	f.Add([]byte{1, 16, 4, 0, 5, 16, 6, 2, 7, 40})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 1 {
			return
		}
		nsegs := 1 + int(data[0])%8
		data = data[1:]
		lens := make([]int, nsegs)
		for i := range lens {
			if len(data) > 0 {
				lens[i] = int(data[0]) % 32
				data = data[1:]
			}
		}
		if len(data) > 200 {
			data = data[:200]
		}
		checkReaderOps(t, newViewLayout(lens...), data)
		checkWriterOps(t, newViewLayout(lens...), data)
	})
}

// viewModel is where a view is in the flat chain: [pos, end), and what it
// has consumed.
type viewModel struct{ pos, end, done int }

func (m *viewModel) left() int { return m.end - m.pos }

// split applies SplitAt(n) to the model: keep the head, or become the rest.
func (m *viewModel) split(n int, rest bool) {
	if rest {
		m.pos += n
		m.done = 0
		return
	}
	m.end = m.pos + n
}

func checkReaderOps(t *testing.T, l *viewLayout, ops []byte) {
	flat := l.contents()
	r := l.readChain().Reader()
	m := viewModel{end: len(flat)}
	for i := 0; i+1 < len(ops); i += 2 {
		kind, arg := ops[i]%7, int(ops[i+1])
		switch kind {
		case 0: // Read
			p := make([]byte, arg%40)
			n, err := r.Read(p)
			switch {
			case m.left() == 0:
				if n != 0 || err != io.EOF {
					t.Fatalf("op %d: Read at the end: %d %v", i, n, err)
				}
			case n != min(len(p), m.left()) || err != nil:
				t.Fatalf("op %d: Read %d of %d left: %d %v", i, len(p), m.left(), n, err)
			}
			if !bytes.Equal(p[:n], flat[m.pos:m.pos+n]) {
				t.Fatalf("op %d: Read % x, want % x", i, p[:n], flat[m.pos:m.pos+n])
			}
			m.pos += n
			m.done += n
		case 1: // Skip
			k := arg%40 - 2 // a few negative counts too
			n, err := r.Skip(k)
			checkSkip(t, i, &m, k, n, err)
		case 2, 3: // SplitAt, keeping the head or the rest
			k := arg%40 - 2
			rest, err := r.SplitAt(k)
			if k < 0 || k > m.left() {
				if !errors.Is(err, ErrViewRange) {
					t.Fatalf("op %d: SplitAt(%d) with %d left: %v", i, k, m.left(), err)
				}
				break
			}
			if err != nil || r.Len() != k || rest.Len() != m.left()-k || rest.Consumed() != 0 {
				t.Fatalf("op %d: SplitAt(%d): %v, lens %d %d", i, k, err, r.Len(), rest.Len())
			}
			if kind == 3 {
				r = rest
			}
			m.split(k, kind == 3)
		case 4: // WriteTo
			var buf bytes.Buffer
			n, err := r.WriteTo(&buf)
			if err != nil || int(n) != m.left() || !bytes.Equal(buf.Bytes(), flat[m.pos:m.end]) {
				t.Fatalf("op %d: WriteTo: %d %v", i, n, err)
			}
			m.done += m.left()
			m.pos = m.end
		case 5: // AppendSegments: the rest, unconsumed, inside the chain
			var got []byte
			for _, s := range r.AppendSegments(nil) {
				if len(s) == 0 || cap(s) != len(s) || !insideLayout(l, s) {
					t.Fatalf("op %d: empty segment, or one that reaches outside the view", i)
				}
				got = append(got, s...)
			}
			if !bytes.Equal(got, flat[m.pos:m.end]) {
				t.Fatalf("op %d: AppendSegments gave % x, want % x", i, got, flat[m.pos:m.end])
			}
		case 6: // a copy is an independent cursor
			c := r
			c.Skip(arg)
		}
		if r.Len() != m.left() || r.Consumed() != m.done {
			t.Fatalf("op %d (kind %d): len %d consumed %d, want %d %d", i, kind, r.Len(), r.Consumed(), m.left(), m.done)
		}
	}
	if !bytes.Equal(l.contents(), flat) || !l.guardsIntact() {
		t.Fatal("a Reader changed memory")
	}
}

func checkSkip(t *testing.T, op int, m *viewModel, k, n int, err error) {
	t.Helper()
	switch {
	case k < 0:
		if n != 0 || !errors.Is(err, ErrViewRange) {
			t.Fatalf("op %d: Skip(%d): %d %v", op, k, n, err)
		}
		return
	case k > m.left():
		if n != m.left() || err != io.EOF {
			t.Fatalf("op %d: Skip(%d) past the end (%d left): %d %v", op, k, m.left(), n, err)
		}
	default:
		if n != k || err != nil {
			t.Fatalf("op %d: Skip(%d): %d %v", op, k, n, err)
		}
	}
	m.pos += n
	m.done += n
}

func checkWriterOps(t *testing.T, l *viewLayout, ops []byte) {
	want := l.contents()
	w := l.writeChain().Writer()
	m := viewModel{end: len(want)}
	for i := 0; i+1 < len(ops); i += 2 {
		kind, arg := ops[i]%6, int(ops[i+1])
		fill := make([]byte, arg%40)
		for j := range fill {
			fill[j] = byte(0x80 + i + j)
		}
		switch kind {
		case 0: // Write
			n, err := w.Write(fill)
			wn := min(len(fill), m.left())
			if n != wn || (wn < len(fill)) != (err == io.ErrShortWrite) || (err != nil && err != io.ErrShortWrite) {
				t.Fatalf("op %d: Write %d with %d left: %d %v", i, len(fill), m.left(), n, err)
			}
			copy(want[m.pos:], fill[:n])
			m.pos += n
			m.done += n
		case 1: // Skip
			k := arg%40 - 2
			n, err := w.Skip(k)
			checkSkip(t, i, &m, k, n, err)
		case 2, 3: // SplitAt
			k := arg%40 - 2
			rest, err := w.SplitAt(k)
			if k < 0 || k > m.left() {
				if !errors.Is(err, ErrViewRange) {
					t.Fatalf("op %d: SplitAt(%d) with %d left: %v", i, k, m.left(), err)
				}
				break
			}
			if err != nil || w.Len() != k || rest.Len() != m.left()-k {
				t.Fatalf("op %d: SplitAt(%d): %v", i, k, err)
			}
			if kind == 3 {
				w = rest
			}
			m.split(k, kind == 3)
		case 4: // ReadFrom
			n, err := w.ReadFrom(bytes.NewReader(fill))
			wn := min(len(fill), m.left())
			if int(n) != wn || (wn < len(fill)) != (err == io.ErrShortWrite) || (err != nil && err != io.ErrShortWrite) {
				t.Fatalf("op %d: ReadFrom %d with %d left: %d %v", i, len(fill), m.left(), n, err)
			}
			copy(want[m.pos:], fill[:n])
			m.pos += wn
			m.done += wn
		case 5: // a copy is an independent cursor over the same bytes
			c := w
			n, _ := c.Write(fill)
			copy(want[m.pos:], fill[:n])
		}
		if w.Len() != m.left() || w.Written() != m.done {
			t.Fatalf("op %d (kind %d): len %d written %d, want %d %d", i, kind, w.Len(), w.Written(), m.left(), m.done)
		}
		if !bytes.Equal(l.contents(), want) || !l.guardsIntact() {
			t.Fatalf("op %d (kind %d): memory % x, want % x (guards intact %v)", i, kind, l.contents(), want, l.guardsIntact())
		}
	}
}

func insideLayout(l *viewLayout, s []byte) bool {
	p := uintptr(unsafe.Pointer(&s[0]))
	for _, seg := range l.segs {
		if len(seg) == 0 {
			continue
		}
		b := uintptr(unsafe.Pointer(&seg[0]))
		if p >= b && p+uintptr(len(s)) <= b+uintptr(len(seg)) {
			return true
		}
	}
	return false
}
