package ism

import (
	"slices"
	"testing"
	"time"
)

// TestDMBsListing: every live DMB once, with its owner, rgid, size, index,
// mode and attachers; a dead one is gone; DeviceStats says since when a
// device is connected.
func TestDMBsListing(t *testing.T) {
	f := newFabric()
	start := time.Now()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	copyTok := register(t, a.dev, dmbGPA, 4096, 0xB, 7)
	attTok, _ := registerAttach(t, a, 8192, 0xB, 3)
	attach(t, b, attTok, 0)
	gone := register(t, b.dev, dmbGPA, 4096, 0xA, 1)
	if err := b.dev.UnregisterDMB(gone); err != nil {
		t.Fatal(err)
	}
	got := f.DMBs()
	want := []DMBInfo{
		{Token: attTok, Owner: "a", OwnerGID: 0xA, RGID: 0xB, Size: 8192, Index: 3, Attach: true, AttachedBy: []uint64{0xB}},
		{Token: copyTok, Owner: "a", OwnerGID: 0xA, RGID: 0xB, Size: 4096, Index: 7},
	}
	if !slices.EqualFunc(got, want, func(x, y DMBInfo) bool {
		return x.Token == y.Token && x.Owner == y.Owner && x.OwnerGID == y.OwnerGID && x.RGID == y.RGID &&
			x.Size == y.Size && x.Index == y.Index && x.Attach == y.Attach && slices.Equal(x.AttachedBy, y.AttachedBy)
	}) {
		t.Fatalf("DMBs()\n got %+v\nwant %+v", got, want)
	}
	for _, d := range f.DeviceStats() {
		if !d.Connected || d.Since.Before(start) || d.Since.After(time.Now()) {
			t.Errorf("%s: connected %v since %v (test started %v)", d.Name, d.Connected, d.Since, start)
		}
	}
	b.dev.Disconnect()
	for _, d := range f.DeviceStats() {
		if d.Name == "b" && (d.Connected || !d.Since.IsZero()) {
			t.Errorf("b after its disconnect: connected %v since %v", d.Connected, d.Since)
		}
	}
	if got := f.DMBs(); len(got) != 2 || len(got[0].AttachedBy) != 0 {
		t.Fatalf("after b's disconnect: %+v", got)
	}
}
