package smcd

import (
	"errors"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

// TestLoopbackEnforcement: the loopback device checks what the real device
// checks (docs/device-abi.md): rgid, live token, bounds, DMBE index, limits.
func TestLoopbackEnforcement(t *testing.T) {
	f := NewFabric(0xFF00)
	a, b, c := f.NewDevice(), f.NewDevice(), f.NewDevice()
	if a.GID() == b.GID() || a.CHID() != 0xFF00 {
		t.Fatal("GIDs must differ; CHID from the fabric")
	}
	m, err := a.RegisterDMB(4096, b.GID())
	if err != nil {
		t.Fatal(err)
	}
	src, _ := b.AllocBuffer(64)
	copy(src.Bytes(), "payload")
	check := func(name string, got error, want abi.Status) {
		t.Helper()
		if (want == abi.StatusOK) != (got == nil) || (got != nil && !errors.Is(got, want)) {
			t.Errorf("%s: got %v, want %v", name, got, want)
		}
	}
	check("rgid may write", b.Move(m.Token(), 3, true, 100, src, 0, 7), abi.StatusOK)
	if string(m.Bytes()[100:107]) != "payload" {
		t.Fatal("data not copied")
	}
	select {
	case <-m.Signalled():
	default:
		t.Fatal("signal not delivered")
	}
	if mask := m.(*loopDMB).DMBEMask(); mask != 1<<3 {
		t.Fatalf("DMBE mask %#x", mask)
	}
	check("other GID", c.Move(m.Token(), 0, false, 0, src, 0, 7), abi.StatusPermission)
	check("owner is not rgid", a.Move(m.Token(), 0, false, 0, src, 0, 7), abi.StatusPermission)
	check("end of DMB", b.Move(m.Token(), 0, false, 4096-7, src, 0, 7), abi.StatusOK)
	check("past DMB end", b.Move(m.Token(), 0, false, 4096-6, src, 0, 7), abi.StatusRange)
	check("offset overflow", b.Move(m.Token(), 0, false, 0xFFFFFFFF, src, 0, 7), abi.StatusRange)
	check("DMBE index", b.Move(m.Token(), 32, false, 0, src, 0, 7), abi.StatusRange)
	check("source bounds", b.Move(m.Token(), 0, false, 0, src, 60, 7), abi.StatusInvalid)
	check("unknown token", b.Move(m.Token()+1, 0, false, 0, src, 0, 7), abi.StatusNoEntry)
	check("query peer", a.QueryRGID(b.GID()), abi.StatusOK)
	check("query stranger", a.QueryRGID(NewLoopback().GID()), abi.StatusNoEntry)
	check("unregister by other", b.UnregisterDMB(m), abi.StatusPermission)
	check("unregister", a.UnregisterDMB(m), abi.StatusOK)
	check("dead token", b.Move(m.Token(), 0, false, 0, src, 0, 7), abi.StatusNoEntry)
	_, err = a.RegisterDMB(abi.MaxDMBSize+1, b.GID())
	check("DMB too large", err, abi.StatusRange)
	a.MaxDMBs = 1
	_, err = a.RegisterDMB(4096, b.GID())
	check("first within limit", err, abi.StatusOK)
	_, err = a.RegisterDMB(4096, b.GID())
	check("DMB limit", err, abi.StatusNoSpace)

	// A closed device's DMBs die and it leaves the fabric.
	m2, _ := c.RegisterDMB(4096, b.GID())
	c.Close()
	check("DMB of closed device", b.Move(m2.Token(), 0, false, 0, src, 0, 7), abi.StatusNoEntry)
	check("closed device unreachable", b.QueryRGID(c.GID()), abi.StatusNoEntry)
}
