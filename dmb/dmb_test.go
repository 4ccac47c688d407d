package dmb

import (
	"encoding/binary"
	"errors"
	"math"
	"sync"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

func TestCheckRange(t *testing.T) {
	const max = math.MaxUint64
	for _, c := range []struct {
		off, n, size uint64
		ok           bool
	}{
		{0, 0, 0, true},
		{0, 1, 0, false},
		{0, 10, 10, true},
		{10, 0, 10, true},
		{11, 0, 10, false},
		{9, 1, 10, true},
		{9, 2, 10, false},
		{1, max, 10, false}, // off+n wraps to 0
		{max, 1, 10, false}, // wraps to 0
		{max, 2, 1 << 20, false},
		{2, max - 1, 1 << 20, false},
		{max, 0, max, true},
		{0, max, max, true},
		{1, max, max, false},
	} {
		err := CheckRange(c.off, c.n, c.size)
		if (err == nil) != c.ok {
			t.Errorf("CheckRange(%#x, %#x, %#x) = %v, want ok=%v", c.off, c.n, c.size, err, c.ok)
		}
		if err != nil && err != abi.StatusRange {
			t.Errorf("CheckRange error %v, want StatusRange", err)
		}
	}
}

func TestAddOverflows(t *testing.T) {
	if AddOverflows(math.MaxUint64-9, 9) || !AddOverflows(math.MaxUint64-9, 10) || AddOverflows(0, math.MaxUint64) {
		t.Fatal("AddOverflows wrong at the edge")
	}
}

// seq is a fake random source that hands out the given 64-bit values.
func seq(vals ...uint64) func([]byte) (int, error) {
	return func(b []byte) (int, error) {
		if len(vals) == 0 {
			return 0, errors.New("exhausted")
		}
		binary.LittleEndian.PutUint64(b, vals[0])
		vals = vals[1:]
		return len(b), nil
	}
}

func TestNewTokenSkipsZeroAndLive(t *testing.T) {
	live := map[uint64]bool{7: true, 9: true}
	tok, err := newToken(seq(0, 7, 0, 9, 42), func(v uint64) bool { return live[v] })
	if err != nil || tok != 42 {
		t.Fatalf("token %d, %v; want 42", tok, err)
	}
}

func TestNewTokenGivesUp(t *testing.T) {
	zeros := make([]uint64, maxTokenTries+1)
	if _, err := newToken(seq(zeros...), nil); !errors.Is(err, ErrTokenSpace) {
		t.Fatalf("err %v, want ErrTokenSpace", err)
	}
	if _, err := newToken(seq(), nil); err == nil {
		t.Fatal("read error not passed on")
	}
}

func TestNewTokenRandom(t *testing.T) {
	seen := map[uint64]bool{}
	for range 10000 {
		tok, err := NewToken(func(v uint64) bool { return seen[v] })
		if err != nil || tok == 0 || seen[tok] {
			t.Fatalf("token %#x err %v", tok, err)
		}
		seen[tok] = true
	}
}

func TestTable(t *testing.T) {
	var tb Table[int]
	toks := map[uint64]int{}
	for i := range 100 {
		tok, err := tb.Add(i, 100)
		if err != nil {
			t.Fatal(err)
		}
		if _, dup := toks[tok]; dup || tok == 0 {
			t.Fatalf("token %#x reused or 0", tok)
		}
		toks[tok] = i
	}
	if _, err := tb.Add(100, 100); err != abi.StatusNoSpace {
		t.Fatalf("over limit: %v", err)
	}
	for tok, i := range toks {
		if v, ok := tb.Get(tok); !ok || v != i {
			t.Fatalf("Get(%#x) = %d, %v", tok, v, ok)
		}
	}
	n := 0
	tb.Range(func(uint64, int) bool { n++; return n < 10 })
	if n != 10 {
		t.Fatalf("Range did not stop: %d", n)
	}
	for tok := range toks {
		if !tb.Delete(tok) || tb.Delete(tok) {
			t.Fatal("Delete")
		}
		if _, ok := tb.Get(tok); ok {
			t.Fatal("deleted token still live")
		}
	}
	if tb.Len() != 0 {
		t.Fatal("table not empty")
	}
}

func TestIndexSet(t *testing.T) {
	var s IndexSet
	if s.Claim(abi.MaxDMBs) != abi.StatusRange || s.Has(abi.MaxDMBs) {
		t.Fatal("index past the SBA accepted")
	}
	for _, i := range []uint32{0, 63, 64, abi.MaxDMBs - 1} {
		if err := s.Claim(i); err != nil {
			t.Fatal(err)
		}
		if s.Claim(i) != abi.StatusBusy || !s.Has(i) {
			t.Fatalf("index %d claimed twice", i)
		}
	}
	s.Release(63)
	if s.Has(63) || !s.Has(64) || s.Claim(63) != nil {
		t.Fatal("Release")
	}
	s.Clear()
	if s.Has(0) || s.Has(abi.MaxDMBs-1) {
		t.Fatal("Clear")
	}
}

// The MOVE path looks a token up once per request from every guest queue at
// once; these compare the RWMutex map (Table) with sync.Map under that load.
const benchTokens = 4096

func BenchmarkLookupTable(b *testing.B) {
	var tb Table[*int]
	toks := make([]uint64, benchTokens)
	for i := range toks {
		toks[i], _ = tb.Add(new(int), 0)
	}
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, ok := tb.Get(toks[i%benchTokens]); !ok {
				b.Fatal("miss")
			}
			i++
		}
	})
}

func BenchmarkLookupSyncMap(b *testing.B) {
	var m sync.Map
	toks := make([]uint64, benchTokens)
	for i := range toks {
		toks[i], _ = NewToken(nil)
		m.Store(toks[i], new(int))
	}
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, ok := m.Load(toks[i%benchTokens]); !ok {
				b.Fatal("miss")
			}
			i++
		}
	})
}
