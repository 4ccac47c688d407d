package smcd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// TestCDCLayout checks Encode against struct smcd_cdc_msg on a little-endian
// host: type at 0, res1[7], prod {wrap u16, count u32, flags 0, 0} at 8,
// cons {wrap, count, prod_flags, conn_state_flags} at 16, res3[8].
func TestCDCLayout(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("golden bytes are for a little-endian host")
	}
	m := CDC{Prod: Cursor{0x0102, 0x03040506}, Cons: Cursor{0x1112, 0x13141516},
		ProdFlags: FlagWriteBlocked, ConnState: FlagDoneWriting | FlagClosed}
	b := make([]byte, CDCLen)
	m.Encode(b)
	want := unhex(t, `fe 00000000000000
		0201 06050403 00 00
		1211 16151413 80 c0
		0000000000000000`)
	if !bytes.Equal(b, want) {
		t.Fatalf("\n got %x\nwant %x", b, want)
	}
	mem := alignedBytes(64)
	copy(mem, b)
	got, err := LoadCDC(mem)
	if err != nil || got != m {
		t.Fatalf("LoadCDC: %+v %v", got, err)
	}
	if got, err := LoadCDC(alignedBytes(64)); err != nil || got != (CDC{}) {
		t.Fatalf("zero header: %+v %v", got, err)
	}
	mem[0] = 0x42
	if _, err := LoadCDC(mem); !errors.Is(err, ErrCDC) {
		t.Fatalf("bad type accepted: %v", err)
	}
}

func TestCursorArithmetic(t *testing.T) {
	const size = 1000
	c := CursorAdd(size, Cursor{0, 990}, 20)
	if c != (Cursor{1, 10}) {
		t.Fatalf("add across the ring end: %+v", c)
	}
	if c := CursorAdd(size, Cursor{0xFFFF, 999}, 1); c != (Cursor{0, 0}) {
		t.Fatalf("wrap counter overflow: %+v", c)
	}
	if d := CursorDiff(size, Cursor{0, 990}, Cursor{1, 10}); d != 20 {
		t.Fatalf("diff across wrap %d", d)
	}
	if d := CursorDiff(size, Cursor{0xFFFF, 990}, Cursor{0, 10}); d != 20 {
		t.Fatalf("diff across wrap-counter overflow %d", d)
	}
	if d := CursorDiff(size, Cursor{3, 500}, Cursor{3, 400}); d != 0 {
		t.Fatalf("diff of a cursor behind %d", d)
	}
	if d := CursorComp(size, Cursor{3, 500}, Cursor{3, 400}); d != -100 {
		t.Fatalf("comp behind %d", d)
	}
	if d := CursorComp(size, Cursor{2, 900}, Cursor{3, 100}); d != 200 {
		t.Fatalf("comp ahead %d", d)
	}
	for _, pos := range []uint64{0, 999, 1000, 65535*1000 + 999, 65536 * 1000, 1 << 40} {
		c := CursorOf(size, pos)
		if c.Count >= size || uint64(c.Wrap) != (pos/size)%65536 {
			t.Fatalf("CursorOf(%d) = %+v", pos, c)
		}
	}
}

func TestAdvanceCursor(t *testing.T) {
	const size = 1000
	prev := uint64(65535*size + 900) // just before the wrap counter overflows
	cases := []struct {
		c     Cursor
		limit uint64
		want  uint64
		err   error
	}{
		{Cursor{0xFFFF, 900}, prev + 1000, prev, nil},        // no change
		{Cursor{0xFFFF, 950}, prev + 1000, prev + 50, nil},   // forward
		{Cursor{0, 100}, prev + 1000, prev + 200, nil},       // across wrap and u16 overflow
		{Cursor{0, 900}, prev + 1000, prev + 1000, nil},      // a full ring
		{Cursor{0, 901}, prev + 1000, prev, ErrCursorBeyond}, // one past a full ring
		{Cursor{0, 100}, prev + 199, prev, ErrCursorBeyond},  // past the limit
		{Cursor{0xFFFF, 899}, prev + 1000, prev, ErrCursorBackward},
		{Cursor{0xFFFE, 950}, prev + 1000, prev, ErrCursorBeyond}, // a wrap behind looks 65535 wraps ahead
		{Cursor{0xFFFF, 1000}, prev + 1000, prev, ErrCursorRange},
		{Cursor{0xFFFF, 0xFFFFFFFF}, prev + 1000, prev, ErrCursorRange},
		{Cursor{5, 0}, prev + 1000, prev, ErrCursorBeyond},
	}
	for _, c := range cases {
		got, err := AdvanceCursor(size, prev, c.c, c.limit)
		if got != c.want || !errors.Is(err, c.err) {
			t.Errorf("%+v limit +%d: got +%d %v, want +%d %v", c.c, c.limit-prev, got-prev, err, c.want-prev, c.err)
		}
		if err != nil && !errors.Is(err, ErrCDC) {
			t.Errorf("%v does not wrap ErrCDC", err)
		}
	}
}

// forge writes a CDC header into victim's DMB from the hostile peer's
// device, which is the DMB's rgid and so may write anything there.
func forge(t *testing.T, hostile ISM, victim *Conn, hdr []byte) {
	t.Helper()
	buf, _ := hostile.AllocBuffer(CDCLen)
	copy(buf.Bytes(), hdr)
	if err := hostile.Move(victim.dmb.Token(), 0, true, 0, buf, 0, CDCLen); err != nil {
		t.Fatal(err)
	}
}

func cdcBytes(m CDC) []byte {
	b := make([]byte, CDCLen)
	m.Encode(b)
	return b
}

// TestForgedCursors: a hostile peer writes cursors into our DMB. Each is
// rejected: the connection fails with ErrCDC, Read and Write return errors
// instead of reading outside what was produced or writing past what was
// freed, and the honest side of the pair is told with an abort.
func TestForgedCursors(t *testing.T) {
	ring := uint32(MinDMBSize - CDCLen)
	cases := []struct {
		name  string
		setup func(t *testing.T, cli, srv net.Conn) // legitimate traffic first
		hdr   func(cli *Conn) []byte
		want  error
	}{
		{"producer count beyond ring", nil, func(*Conn) []byte {
			return cdcBytes(CDC{Prod: Cursor{0, ring}})
		}, ErrCursorRange},
		{"producer past free space", nil, func(*Conn) []byte {
			return cdcBytes(CDC{Prod: Cursor{1, 1}})
		}, ErrCursorBeyond},
		{"producer backwards", func(t *testing.T, cli, srv net.Conn) {
			srv.Write(make([]byte, 100))
			io.ReadFull(cli, make([]byte, 100))
		}, func(*Conn) []byte {
			return cdcBytes(CDC{Prod: Cursor{0, 50}})
		}, ErrCursorBackward},
		{"consumer of unsent data", func(t *testing.T, cli, srv net.Conn) {
			cli.Write(make([]byte, 10))
			io.ReadFull(srv, make([]byte, 10))
		}, func(*Conn) []byte {
			return cdcBytes(CDC{Cons: Cursor{0, 11}})
		}, ErrCursorBeyond},
		{"consumer a full ring ahead", nil, func(*Conn) []byte {
			return cdcBytes(CDC{Cons: Cursor{1, 0}})
		}, ErrCursorBeyond},
		{"bad type", nil, func(*Conn) []byte {
			b := cdcBytes(CDC{})
			b[0] = 0x01
			return b
		}, ErrCDC},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := twoHosts()
			e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
			cli, srv := e.pair(t)
			mustSMC(t, cli, srv)
			if c.setup != nil {
				c.setup(t, cli, srv)
			}
			// Make the first Read wait for the forged CDC, not race it.
			readErr := make(chan error, 1)
			go func() { _, err := cli.Read(make([]byte, 1)); readErr <- err }()
			forge(t, e.srvDev, cli.(*Conn), c.hdr(cli.(*Conn)))
			select {
			case err := <-readErr:
				if !errors.Is(err, c.want) {
					t.Fatalf("read: %v, want %v", err, c.want)
				}
			case <-time.After(hangGuard):
				t.Fatal("forged CDC not noticed")
			}
			if _, err := cli.Write([]byte("x")); !errors.Is(err, ErrCDC) {
				t.Fatalf("write after forged CDC: %v", err)
			}
			// The honest server learns of the abort.
			if _, err := io.Copy(io.Discard, srv); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("server after abort: %v", err)
			}
		})
	}
}

// TestForgedConsumerCannotOverrun: a peer claiming to have consumed more
// than we sent must not open space in its ring: a Write that filled the
// ring stays blocked until the forged cursor is rejected, and nothing more
// is written.
func TestForgedConsumerCannotOverrun(t *testing.T) {
	e := twoHosts()
	e.srv.DMBSize, e.dial.DMBSize = MinDMBSize, MinDMBSize
	cli, srv := e.pair(t)
	mustSMC(t, cli, srv)
	c := cli.(*Conn)
	ring := int(c.psize)
	n, err := func() (int, error) {
		cli.SetWriteDeadline(time.Now().Add(20 * time.Millisecond))
		defer cli.SetWriteDeadline(time.Time{})
		return cli.Write(make([]byte, 2*ring))
	}()
	if n != ring || !isTimeout(err) {
		t.Fatalf("wrote %d, %v", n, err)
	}
	// Claim everything sent plus one more ring was consumed.
	forge(t, e.srvDev, c, cdcBytes(CDC{Cons: Cursor{2, 0}}))
	if _, err := cli.Write([]byte("more")); !errors.Is(err, ErrCursorBeyond) {
		t.Fatalf("write after forged consumer cursor: %v", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.txProd != uint64(ring) {
		t.Fatalf("produced %d, more than the ring %d", c.txProd, ring)
	}
}

// FuzzCDC: whatever a peer writes into the header, LoadCDC and
// AdvanceCursor never panic, and an accepted cursor lies in [prev, limit]
// and maps back to the wire cursor.
func FuzzCDC(f *testing.F) {
	f.Add(cdcBytes(CDC{Prod: Cursor{1, 5}, Cons: Cursor{0, 7}, ProdFlags: FlagWriteBlocked}), uint32(1000), uint64(990), uint32(500))
	f.Add(make([]byte, CDCLen), uint32(16352), uint64(0), uint32(16352))
	f.Fuzz(func(t *testing.T, hdr []byte, size uint32, prev uint64, room uint32) {
		if len(hdr) < CDCLen || size == 0 {
			return
		}
		mem := alignedBytes(CDCLen)
		copy(mem, hdr)
		m, err := LoadCDC(mem)
		if err != nil {
			return
		}
		limit := prev + uint64(min(room, size))
		if limit < prev {
			return
		}
		for _, c := range []Cursor{m.Prod, m.Cons} {
			pos, err := AdvanceCursor(size, prev, c, limit)
			if err != nil {
				if pos != prev {
					t.Fatalf("rejected cursor moved the position to %d", pos)
				}
				continue
			}
			if pos < prev || pos > limit || CursorOf(size, pos) != c {
				t.Fatalf("cursor %+v accepted as %d outside [%d, %d]", c, pos, prev, limit)
			}
		}
	})
}
