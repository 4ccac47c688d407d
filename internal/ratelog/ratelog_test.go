package ratelog

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	var l Limiter
	t0 := time.Unix(1000, 0)
	for i := range Burst {
		if ok, _ := l.Allow(t0); !ok {
			t.Fatalf("line %d of the burst refused", i)
		}
	}
	for range 5 {
		if ok, _ := l.Allow(t0.Add(Every / 2)); ok {
			t.Fatal("line past the burst allowed")
		}
	}
	ok, suppressed := l.Allow(t0.Add(Every))
	if !ok || suppressed != 5 {
		t.Fatalf("after one period: ok=%v suppressed=%d, want true 5", ok, suppressed)
	}
	if ok, _ := l.Allow(t0.Add(Every)); ok {
		t.Fatal("one period gave more than one line")
	}
	// A long quiet time refills the burst, not more.
	t1 := t0.Add(time.Hour)
	n := 0
	for range 3 * Burst {
		if ok, _ := l.Allow(t1); ok {
			n++
		}
	}
	if n != Burst {
		t.Fatalf("after an hour %d lines, want %d", n, Burst)
	}
}
