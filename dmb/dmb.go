// Package dmb keeps the bookkeeping of DMBs (Direct Memory Buffers) that does
// not depend on the device model: token allocation, overflow-safe range
// checks, the token table and the per-device DMB index set; for attach mode,
// memfd-backed DMB buffers (Buffer) and the allocator of offsets in a
// device's shared-memory region (RegionAllocator).
package dmb

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"math/bits"

	"github.com/ism-backend/ism-backend/abi"
)

// CheckRange reports whether [offset, offset+n) lies within a buffer of size
// bytes, without computing offset+n (a guest picks offset and n, and their
// sum may wrap). It returns abi.StatusRange if not.
func CheckRange(offset, n, size uint64) error {
	if offset > size || n > size-offset {
		return abi.StatusRange
	}
	return nil
}

// AddOverflows reports whether base+n wraps around 2^64: a guest-physical
// range that wraps is outside any guest's RAM.
func AddOverflows(base, n uint64) bool {
	_, carry := bits.Add64(base, n, 0)
	return carry != 0
}

// maxTokenTries bounds the collision retries. With 64-bit random tokens a
// single collision is already improbable; many in a row mean the random
// source is broken, and handing out a predictable token would be worse than
// failing the registration.
const maxTokenTries = 16

// ErrTokenSpace is returned when no fresh token could be drawn.
var ErrTokenSpace = errors.New("dmb: no unused token found (random source broken?)")

// NewToken draws a random 64-bit token from crypto/rand that is not 0 and for
// which inUse returns false. Tokens are unpredictable so that a guest cannot
// guess another guest's token (the rgid check still applies on MOVE).
func NewToken(inUse func(uint64) bool) (uint64, error) {
	return newToken(rand.Read, inUse)
}

func newToken(read func([]byte) (int, error), inUse func(uint64) bool) (uint64, error) {
	var b [8]byte
	for range maxTokenTries {
		if _, err := read(b[:]); err != nil {
			return 0, err
		}
		t := binary.LittleEndian.Uint64(b[:])
		if t != 0 && (inUse == nil || !inUse(t)) {
			return t, nil
		}
	}
	return 0, ErrTokenSpace
}
