package guestdriver

import (
	"errors"
	"testing"
	"time"
)

// A request the device never answers fails with ErrBackendGone once the
// heartbeat has stood still for BackendDeadAfter, and so does every later
// one, at once.
func TestBackendGone(t *testing.T) {
	d, f := newFake(t, 16, nil)
	d.reqMu.Lock()
	d.deadAfter = 50 * time.Millisecond
	d.reqMu.Unlock()
	f.serveLock.Lock() // the backend stops: nothing is served, nothing beats
	defer f.serveLock.Unlock()
	_, err := d.RegisterDMB(4096, d.GID())
	if !errors.Is(err, ErrBackendGone) || !errors.Is(err, ErrBroken) {
		t.Fatalf("pending request: %v, want ErrBackendGone", err)
	}
	if err := d.QueryRGID(d.GID()); !errors.Is(err, ErrBackendGone) {
		t.Fatalf("next request: %v, want ErrBackendGone", err)
	}
}

// The clock restarts whenever the heartbeat is seen to change; it declares
// the backend gone only after deadAfter without a change.
func TestCheckBeat(t *testing.T) {
	d, _ := newFake(t, 16, nil)
	d.reqMu.Lock()
	defer d.reqMu.Unlock()
	d.deadAfter = time.Second
	t0 := time.Unix(1000, 0)
	sba := d.signals.sba
	sba.Beat(1)
	d.checkBeatLocked(t0)
	sba.Beat(2)
	d.checkBeatLocked(t0.Add(900 * time.Millisecond))
	d.checkBeatLocked(t0.Add(1800 * time.Millisecond)) // 0.9 s since the change
	if err := d.usable(); err != nil {
		t.Fatalf("declared gone with a beating backend: %v", err)
	}
	d.checkBeatLocked(t0.Add(1901 * time.Millisecond)) // 1.001 s since the change
	if err := d.usable(); !errors.Is(err, ErrBackendGone) {
		t.Fatalf("after a still heartbeat: %v, want ErrBackendGone", err)
	}
}
