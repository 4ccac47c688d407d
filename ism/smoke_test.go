package ism

import (
	"bytes"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
)

func TestSmokeMove(t *testing.T) {
	f := newFabric()
	a := newGuest(t, f, "a", 0xA)
	b := newGuest(t, f, "b", 0xB)
	setSBA(t, a.dev, sbaGPA, true)
	tok := register(t, a.dev, dmbGPA, 1<<20, b.dev.GID(), 77)
	data := []byte("hello, DMB")
	do(t, b.dev, move(tok, 5, 100, len(data), true), [][]byte{data[:3], data[3:]}, abi.StatusOK)
	if got := a.at(t, dmbGPA+100, uint64(len(data))); !bytes.Equal(got, data) {
		t.Fatalf("DMB holds %q", got)
	}
	if a.sbaDMBE(t, sbaGPA, 77, 5) != 1 || a.sbaSeq(t, sbaGPA, 77) != 1 {
		t.Fatal("SBA not set")
	}
	if n, _ := a.n.snapshot(); n != 1 {
		t.Fatalf("%d interrupts", n)
	}
}
