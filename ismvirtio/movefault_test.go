package ismvirtio

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
	fe "github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// allocInLastRegion returns n bytes of g's last memory region (its own
// memory file), past whatever the guest allocated so far.
func allocInLastRegion(t *testing.T, g *guest, n uint64) uint64 {
	t.Helper()
	last := g.mem.Regions[len(g.mem.Regions)-1]
	for {
		gpa, _, err := g.mem.Alloc(n, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if gpa >= last.GPA {
			return gpa
		}
	}
}

// TestMoveFaultAttribution: a MOVE's data reaches ism as the request
// chain's own segments (Reader.AppendSegments), and ism tells whose memory
// a fault in the copy was in by them. Through the whole request path: a
// fault in the owner's RAM (its front-end shrank the file under the DMB) is
// StatusFault for that MOVE and the sender stays connected; a fault in the
// sender's own data (its front-end shrank the file under it) closes the
// sender's connection, and the owner goes on.
func TestMoveFaultAttribution(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	tokLow, _ := a.register(4096, gidB, 0) // in A's first region
	dmbGPA := allocInLastRegion(t, a, 4096)
	r := a.do(abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: gidB, Index: 1}, nil)
	if r.Status != abi.StatusOK {
		t.Fatalf("REGISTER_DMB in A's last region: %v", r.Status)
	}
	tokHigh := r.Value
	if st := b.move(tokHigh, 0, []byte("before"), false); st != abi.StatusOK {
		t.Fatalf("MOVE before the shrink: %v", st)
	}

	// The owner's fault.
	if err := unix.Ftruncate(a.mem.Regions[len(a.mem.Regions)-1].FD, 0); err != nil {
		t.Fatal(err)
	}
	if st := b.move(tokHigh, 0, []byte("after"), false); st != abi.StatusFault {
		t.Fatalf("MOVE into the owner's shrunk RAM: %v, want %v", st, abi.StatusFault)
	}
	if st := b.move(tokLow, 0, []byte("still served"), false); st != abi.StatusOK {
		t.Fatalf("sender after the owner's fault: %v", st)
	}

	// The sender's fault: header and response in B's first region, the
	// data in its last one, whose file is then shrunk.
	dataGPA := allocInLastRegion(t, b, 64)
	if err := unix.Ftruncate(b.mem.Regions[len(b.mem.Regions)-1].FD, 0); err != nil {
		t.Fatal(err)
	}
	(&abi.Request{Op: abi.OpMove, Token: tokLow, Len: 64}).Encode(b.hdr)
	head := b.req.AddChain([]fe.Buf{
		{GPA: b.hdrGPA, Len: abi.RequestSize},
		{GPA: dataGPA, Len: 64},
		{GPA: b.respGPA, Len: abi.ResponseSize, Write: true},
	})
	b.req.Publish(head)
	if err := b.req.Kick(); err != nil {
		t.Fatal(err)
	}
	if !b.fe.WaitClosed() {
		t.Fatal("sender's connection not closed after the fault in its own data")
	}
	if st := a.do(abi.Request{Op: abi.OpQueryRGID, GID: gidA}, nil).Status; st != abi.StatusOK {
		t.Fatalf("owner after the sender's fault: %v", st)
	}
}
