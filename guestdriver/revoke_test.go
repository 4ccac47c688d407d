package guestdriver

import (
	"errors"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

// TestRevokedDMBFreed: after the device revoked our DMB (EventDMB, code
// revoked, our GID) its UNREGISTER gets NOENTRY, and the driver frees it
// as unregistered; a NOENTRY for a DMB that was not revoked stays an error.
func TestRevokedDMBFreed(t *testing.T) {
	d, f := newFake(t, 8, nil)
	m, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	other, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	live := d.live.Load()
	f.serveLock.Lock()
	delete(f.dmbs, m.Token())
	delete(f.dmbs, other.Token()) // gone without a word: not a revoke
	f.events = append(f.events, abi.Event{Type: abi.EventDMB, Code: abi.DMBRevoked, Token: m.Token(), GID: d.GID()})
	f.serveLock.Unlock()
	if ev := <-d.Events(); ev.Type != abi.EventDMB || ev.Code != abi.DMBRevoked || ev.Token != m.Token() {
		t.Fatalf("event %+v", ev)
	}
	if !d.Revoked(m.Token()) || d.Revoked(other.Token()) {
		t.Errorf("Revoked: %v for the revoked DMB, %v for the other", d.Revoked(m.Token()), d.Revoked(other.Token()))
	}
	if err := d.UnregisterDMB(m); err != nil {
		t.Fatalf("unregister of a revoked DMB: %v", err)
	}
	if d.live.Load() != live-1 || d.dmbs[m.Index()].Load() != nil {
		t.Errorf("the revoked DMB was not freed: live %d (was %d)", d.live.Load(), live)
	}
	if err := d.UnregisterDMB(other); !errors.Is(err, abi.StatusNoEntry) {
		t.Errorf("unregister of a DMB the device lost without a revoke: %v, want NOENTRY", err)
	}
}
