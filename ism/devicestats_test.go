package ism

import (
	"bytes"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

// TestDeviceStats: after known requests, each guest's entry shows its own
// counters and gauges; the entries add up to the fabric's Stats; a guest's
// counters survive its disconnect and add up over reconnects under the same
// name, while its gauges go to 0.
func TestDeviceStats(t *testing.T) {
	f := newFabric()
	a := newAttachGuest(t, f, "a", 0xA, both)
	b := newAttachGuest(t, f, "b", 0xB, both)
	c := newGuest(t, f, "c", 0xC) // copy mode only
	setSBA(t, a.dev, sbaGPA, false)

	const n = 5000
	tokCopy := register(t, a.dev, dmbGPA, 64<<10, 0xB, 1)
	tokAtt, _ := registerAttach(t, a, 10000, 0xB, 2)
	attach(t, b, tokAtt, abi.StatusOK)
	do(t, b.dev, move(tokCopy, 0, 0, n, true), [][]byte{bytes.Repeat([]byte{7}, n)}, abi.StatusOK)
	do(t, b.dev, move(tokAtt, 0, 0, 0, true), nil, abi.StatusOK) // an attached sender's signal
	do(t, c.dev, move(tokCopy, 0, 0, 1, false), [][]byte{{1}}, abi.StatusPermission)

	ds := f.DeviceStats()
	if len(ds) != 3 || ds[0].Name != "a" || ds[1].Name != "b" || ds[2].Name != "c" {
		t.Fatalf("DeviceStats %+v: want a, b, c", ds)
	}
	sa, sb, sc := ds[0], ds[1], ds[2]
	if !sa.Connected || sa.GID != 0xA || sa.Modes != both || sc.Modes != abi.ModeCopy {
		t.Fatalf("a %+v c %+v", sa, sc)
	}
	if s := sa.Stats; s.Registered != 2 || s.DMBs != 2 || s.AttachDMBs != 1 || s.AttachBytes != 12288 || s.MappedBytes != 12288 || s.Maps != 1 ||
		s.Moves != 0 || s.MoveBytes != 0 || s.Attached != 0 {
		t.Errorf("owner a: %+v", s)
	}
	if s := sb.Stats; s.Moves != 2 || s.MoveBytes != n || s.Signals != 2 || s.Attached != 1 || s.MappedBytes != 12288 ||
		s.Maps != 1 || s.DMBs != 0 || s.Registered != 0 || s.RefusedTotal() != 0 {
		t.Errorf("sender b: %+v", s)
	}
	if s := sc.Stats; s.Refused[abi.StatusPermission] != 1 || s.RefusedTotal() != 1 || s.Moves != 0 {
		t.Errorf("forger c: %+v", s)
	}
	var sum Stats
	for _, d := range ds {
		sum.add(d.Stats)
		sum.DMBs += d.Stats.DMBs
		sum.AttachDMBs += d.Stats.AttachDMBs
		sum.AttachBytes += d.Stats.AttachBytes
		sum.Attached += d.Stats.Attached
		sum.MappedBytes += d.Stats.MappedBytes
	}
	sum.Devices = len(ds)
	if fs := f.Stats(); sum != fs {
		t.Errorf("DeviceStats add up to\n%+v\nFabric.Stats is\n%+v", sum, fs)
	}

	// b goes away: its counters stay under its name, its gauges are 0.
	b.dev.Disconnect()
	b.m.flush()
	sb = byName(t, f, "b")
	if s := sb.Stats; sb.Connected || s.MoveBytes != n || s.Moves != 2 || s.Maps != 1 || s.Attached != 0 || s.MappedBytes != 0 {
		t.Fatalf("b after disconnect: %+v", sb)
	}
	if sa = byName(t, f, "a"); !sa.Connected || sa.Stats.AttachDMBs != 1 {
		t.Fatalf("a after b's disconnect: %+v", sa)
	}

	// b comes back (copy mode only now) and moves more: the counters add up.
	b2 := newGuest(t, f, "b", 0xB)
	do(t, b2.dev, move(tokCopy, 0, 0, 100, false), [][]byte{make([]byte, 100)}, abi.StatusOK)
	sb = byName(t, f, "b")
	if s := sb.Stats; !sb.Connected || sb.Modes != abi.ModeCopy || s.MoveBytes != n+100 || s.Moves != 3 || s.Signals != 2 || s.Attached != 0 {
		t.Fatalf("b reconnected: %+v", sb)
	}
	// Again: the first disconnected device is folded, the list stays short.
	b2.dev.Disconnect()
	b3 := newGuest(t, f, "b", 0xB)
	if sb = byName(t, f, "b"); !sb.Connected || sb.Stats.MoveBytes != n+100 || sb.Stats.Moves != 3 || sb.Stats.Maps != 1 {
		t.Fatalf("b after a second reconnect: %+v", sb)
	}
	f.mu.RLock()
	kept := len(f.names["b"].devs)
	f.mu.RUnlock()
	if kept != 1 {
		t.Fatalf("%d devices kept for name b, want only the connected one", kept)
	}
	b3.dev.Disconnect()
}

func byName(t *testing.T, f *Fabric, name string) DeviceStats {
	t.Helper()
	for _, d := range f.DeviceStats() {
		if d.Name == name {
			return d
		}
	}
	t.Fatalf("no DeviceStats for %q", name)
	return DeviceStats{}
}

// TestDeviceStatsConcurrent: DeviceStats while a guest connects, moves and
// disconnects over and over (run with -race); its moves are never lost or
// counted twice.
func TestDeviceStatsConcurrent(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 0)
	const rounds = 200
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, d := range f.DeviceStats() {
				if d.Name == "b" && d.Stats.Moves > rounds {
					t.Errorf("b counted %d moves of at most %d", d.Stats.Moves, rounds)
				}
			}
		}
	}()
	for range rounds {
		b := newGuest(t, f, "b", 0xB)
		do(t, b.dev, move(tok, 0, 0, 10, false), [][]byte{make([]byte, 10)}, abi.StatusOK)
		b.dev.Disconnect()
	}
	close(stop)
	<-done
	if sb := byName(t, f, "b"); sb.Connected || sb.Stats.Moves != rounds || sb.Stats.MoveBytes != 10*rounds {
		t.Fatalf("b after %d reconnects: %+v", rounds, sb)
	}
}
