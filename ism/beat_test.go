package ism

import (
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

// Beat writes the heartbeat only while the device has an SBA and is
// connected, and counts with its own copy: a driver scribbling over the
// word does not change the next value.
func TestBeat(t *testing.T) {
	f := NewFabric(abi.DefaultCHID, nil)
	g := newGuest(t, f, "a", 0xa1)
	if g.dev.Beat() {
		t.Fatal("Beat before SET_SBA")
	}
	if err := g.dev.SetSBA(sbaGPA, false); err != nil {
		t.Fatal(err)
	}
	sba, err := abi.NewSBA(g.at(t, sbaGPA, abi.SBASize))
	if err != nil {
		t.Fatal(err)
	}
	for i := uint32(1); i <= 3; i++ {
		if !g.dev.Beat() || sba.Heartbeat() != i {
			t.Fatalf("beat %d: heartbeat %d", i, sba.Heartbeat())
		}
	}
	sba.Beat(1000) // the driver writing what it must only read
	if g.dev.Beat(); sba.Heartbeat() != 4 {
		t.Fatalf("after the guest wrote 1000: heartbeat %d, want 4", sba.Heartbeat())
	}
	if sba.Sum() != 0 {
		t.Fatalf("signal sum %d after beats", sba.Sum())
	}
	g.dev.Disconnect()
	if g.dev.Beat() || sba.Heartbeat() != 4 {
		t.Fatalf("Beat after Disconnect: heartbeat %d", sba.Heartbeat())
	}
}
