package ismvirtio

import (
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/abi"
)

// The device advertises its heartbeat and, once the driver has set the SBA,
// counts it up in the SBA's heartbeat word, touching no signal counter.
func TestHeartbeat(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA})
	a := s.connect("a")
	if a.cfg.HeartbeatMS != uint16(DefaultHeartbeat/time.Millisecond) {
		t.Fatalf("config heartbeat %d ms, want %v", a.cfg.HeartbeatMS, DefaultHeartbeat)
	}
	view, err := abi.NewSBA(a.setSBA())
	if err != nil {
		t.Fatal(err)
	}
	// Waits for a state (three beats); the deadline only bounds a failure.
	deadline := time.Now().Add(time.Minute)
	for view.Heartbeat() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("heartbeat %d after a minute", view.Heartbeat())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if view.Sum() != 0 {
		t.Fatalf("signal sum %d: the heartbeat touched a signal counter", view.Sum())
	}
}

func TestHeartbeatOption(t *testing.T) {
	for _, c := range []struct {
		in   time.Duration
		want time.Duration
		ok   bool
	}{{0, DefaultHeartbeat, true}, {-5, -1, true}, {time.Second, time.Second, true}, {time.Microsecond, 0, false}, {2 * time.Minute, 0, false}} {
		o := Options{Heartbeat: c.in}
		err := o.Check()
		if (err == nil) != c.ok || (c.ok && o.Heartbeat != c.want) {
			t.Errorf("Heartbeat %v: got %v, %v", c.in, o.Heartbeat, err)
		}
	}
}
