package ratelog

import (
	"bytes"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
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

func TestEntry(t *testing.T) {
	var out bytes.Buffer
	log := logrus.New()
	log.SetOutput(&out)
	log.SetLevel(logrus.InfoLevel)
	e := logrus.NewEntry(log)
	var l Limiter
	t0 := time.Unix(1000, 0)
	// Disabled lines take no token.
	for range 3 * Burst {
		if l.Entry(t0, e, logrus.DebugLevel) != nil {
			t.Fatal("entry for a disabled level")
		}
	}
	for i := range Burst {
		le := l.Entry(t0, e, logrus.WarnLevel)
		if le == nil {
			t.Fatalf("line %d of the burst left out", i)
		}
		if _, ok := le.Data["suppressed"]; ok {
			t.Fatalf("line %d says lines were suppressed", i)
		}
	}
	for range 7 {
		if l.Entry(t0, e, logrus.WarnLevel) != nil {
			t.Fatal("line past the burst let through")
		}
	}
	le := l.Entry(t0.Add(Every), e, logrus.WarnLevel)
	if le == nil || le.Data["suppressed"] != uint64(7) {
		t.Fatalf("after one period: %v, want an entry with suppressed=7", le)
	}
}
