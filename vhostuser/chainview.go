package vhostuser

import (
	"errors"
	"io"
)

// Reader and Writer are the way a Backend reads a chain's device-readable
// part and writes its device-writable part, as rust-vmm's virtio-queue
// Reader and Writer are: streams over the chain's buffers, in chain order,
// across descriptor and memory-region boundaries, that never touch memory
// outside the chain's descriptors.
//
// Both are bound to the memory table (Memory) the chain was walked with,
// which their Memory method returns; their bytes are that table's mapping
// and are valid exactly as long as the table is:
//
//   - inside HandleQueue or Guest.WithMemoryLock, where the chain was
//     taken (Queue.Next, Queue.Retake): the device's lock keeps the table
//     current, and mapped, until it is released;
//   - beyond the lock only with a reference to that table: the device's
//     AcquireMemory, called under the same lock, returns it (compare with
//     Memory), and the views stay valid until that reference's Release.
//
// They are small values (a Chain's Reader and Writer methods make them
// without allocating) and share the chain's segment list, so they are
// invalid too once the Chain is reused (Next, Retake). Copying a view gives
// an independent cursor over the same bytes. Not safe for concurrent use.

// ErrViewRange is returned for a split or a skip at a negative count, or a
// split past the end of the view.
var ErrViewRange = errors.New("vhost-user: count outside the chain view")

// Reader is the device-readable part of a chain (see above).
type Reader struct {
	mem *Memory
	cur cursor
}

// Writer is the device-writable part of a chain (see above).
type Writer struct {
	mem *Memory
	cur cursor
}

// Reader returns a view of c's whole device-readable part. On a hot path
// keep a Reader and Reset it instead: a view returned by value is copied
// with wide moves right after its fields were stored, which the CPU cannot
// forward (some 25 ns per view in a microbenchmark, more than the rest of
// a request's reading and writing).
func (c *Chain) Reader() Reader {
	var r Reader
	r.Reset(c)
	return r
}

// Writer returns a view of c's whole device-writable part (see Reader for
// the hot path).
func (c *Chain) Writer() Writer {
	var w Writer
	w.Reset(c)
	return w
}

// Reset makes r a view of c's whole device-readable part.
func (r *Reader) Reset(c *Chain) {
	r.mem = c.mem
	r.cur.reset(c.readable, c.readLen)
}

// Reset makes w a view of c's whole device-writable part.
func (w *Writer) Reset(c *Chain) {
	w.mem = c.mem
	w.cur.reset(c.writable, c.writeLen)
}

// Memory is the table c was walked with (nil when c holds no chain).
func (c *Chain) Memory() *Memory { return c.mem }

// cursor is a position in a view over a list of segments: cur is the rest
// of the current segment, segs the segments after it, and after the bytes
// of the view in them (they may go on past the view's end, after a split).
// done counts the bytes this view has consumed. The hot path (a header read
// from its own segment, a response written into its own) is one copy from
// or into cur.
type cursor struct {
	cur   []byte // no capacity beyond the view: a split head cannot reach its rest
	segs  [][]byte
	after int
	done  int
}

// reset makes c a cursor over the first n bytes of segs (their total, for a
// whole part of a chain), with the first segment loaded. Field by field, so
// that the loads that follow are forwarded from these stores.
func (c *cursor) reset(segs [][]byte, n uint64) {
	c.done = 0
	c.after = int(n)
	c.cur = nil
	if len(segs) > 0 && len(segs[0]) <= c.after {
		c.cur = segs[0]
		segs = segs[1:]
		c.after -= len(c.cur)
	}
	c.segs = segs
}

func (c *cursor) len() int { return len(c.cur) + c.after }

// run returns the next contiguous bytes of the view: cur, or when it is
// spent the next segment, cut to the view. It is empty only at the end of
// the view (a view whose segments end early is cut to them, so that no
// caller loops or reads past them).
func (c *cursor) run() []byte {
	for len(c.cur) == 0 {
		if c.after == 0 || len(c.segs) == 0 {
			c.after = 0
			return nil
		}
		s := c.segs[0]
		c.segs = c.segs[1:]
		if len(s) > c.after {
			s = s[:c.after:c.after]
		}
		c.after -= len(s)
		c.cur = s
	}
	return c.cur
}

// advance consumes k bytes of the run just returned (0 <= k <= its length).
func (c *cursor) advance(k int) {
	c.cur = c.cur[k:]
	c.done += k
}

func (c *cursor) skip(n int) (int, error) {
	if n < 0 {
		return 0, ErrViewRange
	}
	k := 0
	for k < n {
		s := c.run()
		if len(s) == 0 {
			return k, io.EOF
		}
		m := min(len(s), n-k)
		c.advance(m)
		k += m
	}
	return k, nil
}

// split cuts the view after its next n bytes and returns a cursor over the
// rest, which has consumed nothing yet.
func (c *cursor) split(n int) (cursor, error) {
	if n < 0 || n > c.len() {
		return cursor{}, ErrViewRange
	}
	rest := *c
	rest.skip(n)
	rest.done = 0
	if n <= len(c.cur) {
		c.cur, c.after = c.cur[:n:n], 0
	} else {
		c.after = n - len(c.cur)
	}
	return rest, nil
}

// Memory is the table the view's bytes belong to.
func (r *Reader) Memory() *Memory { return r.mem }

// Len is the number of bytes left to read.
func (r *Reader) Len() int { return r.cur.len() }

// Consumed is the number of bytes read or skipped through this view.
func (r *Reader) Consumed() int { return r.cur.done }

// Read implements io.Reader: it fills p as far as the view allows, across
// segments; at the end of the view it returns 0, io.EOF.
func (r *Reader) Read(p []byte) (int, error) {
	n := copy(p, r.cur.cur) // mostly all of p: a header in its own segment
	r.cur.advance(n)
	for n < len(p) {
		s := r.cur.run()
		if len(s) == 0 {
			break
		}
		k := copy(p[n:], s)
		r.cur.advance(k)
		n += k
	}
	if n == 0 && r.cur.len() == 0 {
		return 0, io.EOF
	}
	return n, nil
}

// Skip consumes the next n bytes without reading them (a request header
// already decoded, say). It returns how many it skipped: fewer than n only
// at the end of the view, with io.EOF.
func (r *Reader) Skip(n int) (int, error) { return r.cur.skip(n) }

// SplitAt cuts r after its next n bytes and returns a Reader over the bytes
// after them: r then ends where the returned Reader begins. n must be
// between 0 and Len; otherwise r is unchanged and the error is ErrViewRange.
func (r *Reader) SplitAt(n int) (Reader, error) {
	rest, err := r.cur.split(n)
	return Reader{mem: r.mem, cur: rest}, err
}

// WriteTo implements io.WriterTo: it writes the rest of the view to w, one
// Write per contiguous run, so nothing is copied twice.
func (r *Reader) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for {
		s := r.cur.run()
		if len(s) == 0 {
			return n, nil
		}
		k, err := w.Write(s)
		if k < 0 || k > len(s) {
			return n, errors.New("vhost-user: invalid Write count")
		}
		r.cur.advance(k)
		n += int64(k)
		if err != nil {
			return n, err
		}
		if k < len(s) {
			return n, io.ErrShortWrite
		}
	}
}

// AppendSegments appends to dst the host slices holding the rest of the
// view, in order, without consuming them. It is the one raw access to a
// chain, for a consumer that copies straight out of guest memory into its
// destination and must know where the bytes are: ism's MOVE copies each
// segment once into the owner's DMB and tells a fault in these slices (the
// sender's) from one in the owner's RAM by their addresses. The slices are
// valid only while r is (see Reader): never keep them past the device's
// lock or the reference to r.Memory that made them valid.
func (r *Reader) AppendSegments(dst [][]byte) [][]byte {
	if len(r.cur.cur) > 0 {
		dst = append(dst, r.cur.cur)
	}
	after := r.cur.after
	for _, s := range r.cur.segs {
		if after == 0 {
			break
		}
		if len(s) > after {
			s = s[:after:after]
		}
		if len(s) > 0 {
			dst = append(dst, s)
		}
		after -= len(s)
	}
	return dst
}

// Memory is the table the view's bytes belong to.
func (w *Writer) Memory() *Memory { return w.mem }

// Len is the number of bytes left to write.
func (w *Writer) Len() int { return w.cur.len() }

// Written is the number of bytes written or skipped through this view: the
// used length to push, for a Writer over the whole writable part.
func (w *Writer) Written() int { return w.cur.done }

// Write implements io.Writer: it writes p as far as the view allows,
// across segments. When p does not fit it writes what fits and returns
// io.ErrShortWrite.
func (w *Writer) Write(p []byte) (int, error) {
	n := copy(w.cur.cur, p) // mostly all of p: a response in its own segment
	w.cur.advance(n)
	for n < len(p) {
		s := w.cur.run()
		if len(s) == 0 {
			return n, io.ErrShortWrite
		}
		k := copy(s, p[n:])
		w.cur.advance(k)
		n += k
	}
	return n, nil
}

// Skip leaves the next n bytes as they are, as if written. It returns how
// many it skipped: fewer than n only at the end of the view, with io.EOF.
func (w *Writer) Skip(n int) (int, error) { return w.cur.skip(n) }

// SplitAt cuts w after its next n bytes and returns a Writer over the bytes
// after them: w then ends where the returned Writer begins. n must be
// between 0 and Len; otherwise w is unchanged and the error is ErrViewRange.
func (w *Writer) SplitAt(n int) (Writer, error) {
	rest, err := w.cur.split(n)
	return Writer{mem: w.mem, cur: rest}, err
}

// maxEmptyReads bounds the reads without data or error ReadFrom accepts in a
// row (as bufio does) before it gives up with io.ErrNoProgress.
const maxEmptyReads = 100

// ReadFrom implements io.ReaderFrom: it reads from src straight into the
// view's runs until src ends (io.EOF, not returned) or fails. If the view
// fills before src ends it returns io.ErrShortWrite, as Write would; to
// tell, it reads one byte more from src, which is then lost.
func (w *Writer) ReadFrom(src io.Reader) (int64, error) {
	var n int64
	empty := 0
	for {
		s := w.cur.run()
		if len(s) == 0 {
			break
		}
		k, err := src.Read(s)
		if k < 0 || k > len(s) {
			return n, errors.New("vhost-user: invalid Read count")
		}
		w.cur.advance(k)
		n += int64(k)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		if k > 0 {
			empty = 0
		} else if empty++; empty >= maxEmptyReads {
			return n, io.ErrNoProgress
		}
	}
	var probe [1]byte
	for range maxEmptyReads {
		k, err := src.Read(probe[:])
		switch {
		case k > 0:
			return n, io.ErrShortWrite
		case err == io.EOF:
			return n, nil
		case err != nil:
			return n, err
		}
	}
	return n, io.ErrNoProgress
}
