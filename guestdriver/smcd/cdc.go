package smcd

// CDC for SMC-D: the 32-byte header at offset 0 of the receiver's DMB (Linux
// struct smcd_cdc_msg): type 0xFE at 0, producer cursor at 8, consumer
// cursor at 16, each union smcd_cdc_cursor {wrap u16, count u32, prod_flags,
// conn_state_flags}, in host byte order and read/written as one atomic
// 8-byte value. For SMC-D both flag bytes travel in the consumer slot.
//
// Cursors from a peer are untrusted: a peer sharing memory can write
// anything. AdvanceCursor turns a wire cursor into an absolute stream
// position only if it is in range and moves forward within what the ring
// allows, so a forged cursor can neither index outside the ring nor make us
// send into space the peer has not freed.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"
)

const (
	// CDCLen is sizeof(struct smcd_cdc_msg); the data ring follows it.
	CDCLen = 32
	// CDCType is SMC_CDC_MSG_TYPE.
	CDCType = 0xFE

	cdcProdOff = 8
	cdcConsOff = 16
)

// Producer flags (struct smc_cdc_producer_flags, as the byte reads).
const (
	FlagWriteBlocked   uint8 = 0x80
	FlagUrgPending     uint8 = 0x40
	FlagUrgPresent     uint8 = 0x20
	FlagCursorUpdateRq uint8 = 0x10
)

// Connection state flags (struct smc_cdc_conn_state_flags).
const (
	FlagDoneWriting uint8 = 0x80
	FlagClosed      uint8 = 0x40
	FlagAbort       uint8 = 0x20
)

// Cursor is a position in a ring: wrap counts the times count went round.
type Cursor struct {
	Wrap  uint16
	Count uint32
}

// CDC is the decoded SMC-D CDC header.
type CDC struct {
	Prod      Cursor
	Cons      Cursor
	ProdFlags uint8
	ConnState uint8
}

// cursor word layout: the packed struct in host byte order.
func cursorWord(c Cursor, pflags, cflags uint8) uint64 {
	var b [8]byte
	binary.NativeEndian.PutUint16(b[0:], c.Wrap)
	binary.NativeEndian.PutUint32(b[2:], c.Count)
	b[6], b[7] = pflags, cflags
	return binary.NativeEndian.Uint64(b[:])
}

func splitCursorWord(w uint64) (c Cursor, pflags, cflags uint8) {
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], w)
	return Cursor{binary.NativeEndian.Uint16(b[0:]), binary.NativeEndian.Uint32(b[2:])}, b[6], b[7]
}

// Encode writes the header into b[:CDCLen] as smcd_cdc_msg_send does: type,
// reserved zeros, producer cursor without flags, consumer cursor carrying
// both flag bytes, reserved zeros.
func (m *CDC) Encode(b []byte) {
	_ = b[CDCLen-1]
	clear(b[:CDCLen])
	b[0] = CDCType
	binary.NativeEndian.PutUint64(b[cdcProdOff:], cursorWord(m.Prod, 0, 0))
	binary.NativeEndian.PutUint64(b[cdcConsOff:], cursorWord(m.Cons, m.ProdFlags, m.ConnState))
}

// ErrCDC is wrapped by every error about a peer's CDC header.
var ErrCDC = errors.New("smcd: invalid CDC from peer")

// LoadCDC reads the CDC header at the start of a DMB. The consumer word (with
// the flags) is loaded before the producer word: a sender stores them in
// the other order, so a "done writing" or "closed" flag seen here comes with
// a producer cursor at least as new as the one sent with it. A header that
// is all zero (nothing written yet) is returned as the zero CDC.
func LoadCDC(dmb []byte) (CDC, error) {
	if len(dmb) < CDCLen || uintptr(unsafe.Pointer(&dmb[0]))%8 != 0 {
		return CDC{}, fmt.Errorf("smcd: DMB of %d bytes is too short or unaligned", len(dmb))
	}
	cons := atomic.LoadUint64((*uint64)(unsafe.Pointer(&dmb[cdcConsOff])))
	prod := atomic.LoadUint64((*uint64)(unsafe.Pointer(&dmb[cdcProdOff])))
	typ := atomic.LoadUint64((*uint64)(unsafe.Pointer(&dmb[0])))
	var m CDC
	m.Cons, m.ProdFlags, m.ConnState = splitCursorWord(cons)
	m.Prod, _, _ = splitCursorWord(prod)
	var tb [8]byte
	binary.NativeEndian.PutUint64(tb[:], typ)
	if tb[0] != CDCType && (tb[0] != 0 || cons != 0 || prod != 0) {
		return CDC{}, fmt.Errorf("%w: type %#x", ErrCDC, tb[0])
	}
	return m, nil
}

// CursorOf returns the wire cursor of absolute position pos in a ring of
// size bytes.
func CursorOf(size uint32, pos uint64) Cursor {
	return Cursor{Wrap: uint16(pos / uint64(size)), Count: uint32(pos % uint64(size))}
}

// CursorAdd advances c by n bytes in a ring of size bytes (smc_curs_add, for
// any n).
func CursorAdd(size uint32, c Cursor, n uint32) Cursor {
	total := uint64(c.Count) + uint64(n)
	return Cursor{Wrap: c.Wrap + uint16(total/uint64(size)), Count: uint32(total % uint64(size))}
}

// CursorDiff returns how far new is ahead of old, where old <= new and the
// distance is at most size (smc_curs_diff); 0 if new is behind old.
func CursorDiff(size uint32, old, new Cursor) int {
	if old.Wrap != new.Wrap {
		return max(0, int(size)-int(old.Count)+int(new.Count))
	}
	return max(0, int(new.Count)-int(old.Count))
}

// CursorComp is CursorDiff with a sign: negative if old is ahead of new
// (smc_curs_comp).
func CursorComp(size uint32, old, new Cursor) int {
	if old.Wrap > new.Wrap || (old.Wrap == new.Wrap && old.Count > new.Count) {
		return -CursorDiff(size, new, old)
	}
	return CursorDiff(size, old, new)
}

// Cursor validation errors (each wraps ErrCDC).
var (
	ErrCursorRange    = fmt.Errorf("%w: cursor count beyond the ring", ErrCDC)
	ErrCursorBackward = fmt.Errorf("%w: cursor moved backwards", ErrCDC)
	ErrCursorBeyond   = fmt.Errorf("%w: cursor moved past what the ring allows", ErrCDC)
)

// AdvanceCursor validates a cursor c read from a peer against the last
// accepted absolute position prev and the furthest position the protocol
// allows, limit (prev <= limit <= prev + size), and returns c as an
// absolute position. The difference is computed modulo 2^16 wraps, so a
// cursor one wrap behind looks 65535 wraps ahead and is rejected by limit.
func AdvanceCursor(size uint32, prev uint64, c Cursor, limit uint64) (uint64, error) {
	if c.Count >= size {
		return prev, ErrCursorRange
	}
	p := CursorOf(size, prev)
	d := int64(uint16(c.Wrap-p.Wrap))*int64(size) + int64(c.Count) - int64(p.Count)
	if d < 0 {
		return prev, ErrCursorBackward
	}
	if uint64(d) > limit-prev {
		return prev, ErrCursorBeyond
	}
	return prev + uint64(d), nil
}
