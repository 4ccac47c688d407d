package dmb

import (
	"sync"

	"github.com/ism-backend/ism-backend/abi"
)

// Table maps live tokens to DMBs. Lookup is on the MOVE path of every guest
// at once, so it is a map under a sync.RWMutex: readers share the lock and
// the map is only written by REGISTER, UNREGISTER and disconnects
// (BenchmarkLookup* compares it with sync.Map).
type Table[V any] struct {
	mu sync.RWMutex
	m  map[uint64]V
}

// Add stores v under a new token and returns the token. If the table already
// holds limit entries (limit > 0) it returns abi.StatusNoSpace.
func (t *Table[V]) Add(v V, limit int) (uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if limit > 0 && len(t.m) >= limit {
		return 0, abi.StatusNoSpace
	}
	if t.m == nil {
		t.m = make(map[uint64]V)
	}
	tok, err := NewToken(func(tok uint64) bool { _, ok := t.m[tok]; return ok })
	if err != nil {
		return 0, err
	}
	t.m[tok] = v
	return tok, nil
}

// Get returns the DMB of a live token.
func (t *Table[V]) Get(token uint64) (V, bool) {
	t.mu.RLock()
	v, ok := t.m[token]
	t.mu.RUnlock()
	return v, ok
}

// Delete removes a token; it reports whether the token was live.
func (t *Table[V]) Delete(token uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.m[token]
	delete(t.m, token)
	return ok
}

// Len is the number of live tokens.
func (t *Table[V]) Len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.m)
}

// Range calls fn for each live token until fn returns false. fn runs under
// the table's read lock: it must not call back into the table.
func (t *Table[V]) Range(fn func(token uint64, v V) bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for tok, v := range t.m {
		if !fn(tok, v) {
			return
		}
	}
}

// IndexSet is the set of DMB indices (their places in the SBA) one device uses.
// It is not safe for concurrent use; the device's lock guards it.
type IndexSet struct {
	w [(abi.MaxDMBs + 63) / 64]uint64
}

// Claim marks index i used. It returns abi.StatusRange if i is not a valid
// DMB index and abi.StatusBusy if it is already in use.
func (s *IndexSet) Claim(i uint32) error {
	if i >= abi.MaxDMBs {
		return abi.StatusRange
	}
	bit := uint64(1) << (i % 64)
	if s.w[i/64]&bit != 0 {
		return abi.StatusBusy
	}
	s.w[i/64] |= bit
	return nil
}

// Release marks index i free.
func (s *IndexSet) Release(i uint32) {
	if i < abi.MaxDMBs {
		s.w[i/64] &^= uint64(1) << (i % 64)
	}
}

// Has reports whether index i is in use.
func (s *IndexSet) Has(i uint32) bool {
	return i < abi.MaxDMBs && s.w[i/64]&(uint64(1)<<(i%64)) != 0
}

// Clear releases every index.
func (s *IndexSet) Clear() { s.w = [len(s.w)]uint64{} }

// Insert stores v under a token chosen elsewhere (a table rebuilt after a
// handover). It refuses token 0 and a token in use (abi.StatusBusy), and
// more than limit entries (limit > 0) with abi.StatusNoSpace.
func (t *Table[V]) Insert(token uint64, v V, limit int) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if token == 0 {
		return abi.StatusInvalid
	}
	if limit > 0 && len(t.m) >= limit {
		return abi.StatusNoSpace
	}
	if t.m == nil {
		t.m = make(map[uint64]V)
	}
	if _, ok := t.m[token]; ok {
		return abi.StatusBusy
	}
	t.m[token] = v
	return nil
}
