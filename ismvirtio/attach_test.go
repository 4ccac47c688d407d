package ismvirtio

import (
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/vhostuser"
	fe "github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

func (g *guest) registerAttach(size, rgid uint64, idx uint32) (token, off uint64) {
	g.t.Helper()
	r := g.do(abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: size, GID: rgid, Index: idx}, nil)
	if r.Status != abi.StatusOK || r.Value == 0 {
		g.t.Fatalf("%s: attach-mode REGISTER_DMB: %v token %#x", g.name, r.Status, r.Value)
	}
	return r.Value, uint64(r.Index) * abi.ShmPage
}

func (g *guest) attach(token uint64) abi.Response {
	g.t.Helper()
	return g.do(abi.Request{Op: abi.OpAttachDMB, Token: token}, nil)
}

func (g *guest) detach(token uint64) abi.Status {
	g.t.Helper()
	return g.do(abi.Request{Op: abi.OpDetachDMB, Token: token}, nil).Status
}

// wantShmem waits for the next back-end request of g's front-end and checks
// it against want (Seals and NeedReply are checked by the caller).
func (g *guest) wantShmem(want fe.ShmemRequest) fe.ShmemRequest {
	g.t.Helper()
	r, err := g.fe.WaitShmem()
	if err != nil {
		g.t.Fatalf("%s: %v (want %+v)", g.name, err, want)
	}
	got := r
	got.Seals, got.NeedReply = want.Seals, want.NeedReply
	if got != want {
		g.t.Fatalf("%s: back-end request %+v, want %+v", g.name, r, want)
	}
	return r
}

func mapReq(off, n uint64) fe.ShmemRequest {
	return fe.ShmemRequest{Request: vhostuser.BackendReqShmemMap, ShmOffset: off, Len: n, Flags: 1, HadFD: true}
}

func unmapReq(off, n uint64) fe.ShmemRequest {
	return fe.ShmemRequest{Request: vhostuser.BackendReqShmemUnmap, ShmOffset: off, Len: n}
}

// noMoreShmem checks that g's front-end gets no back-end request for a while.
func (g *guest) noMoreShmem(why string) {
	g.t.Helper()
	time.Sleep(100 * time.Millisecond)
	if r, ok := g.fe.PollShmem(); ok {
		g.t.Fatalf("%s: unexpected back-end request %+v %s", g.name, r, why)
	}
}

// TestAttachShmemMessages: what the front-end receives for REGISTER (attach
// mode), ATTACH and DETACH: SHMEM_MAP with the sealed memfd at the offset
// the response names, read-write, the page-rounded length; the two mappings
// are one memory; a copy-only MOVE lands in it; DETACH unmaps only the
// attacher's side, and a second DETACH is refused.
func TestAttachShmemMessages(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	if a.cfg.Modes != abi.ModeCopy|abi.ModeAttach || a.cfg.ShmSize != DefaultShmSize || len(a.fe.ShmemSizes) != 1 || a.fe.ShmemSizes[0] != DefaultShmSize {
		t.Fatalf("config %+v, shmem sizes %v", a.cfg, a.fe.ShmemSizes)
	}
	if n := len(a.fe.ShmemRequests()) + len(b.fe.ShmemRequests()); n != 0 {
		t.Fatalf("%d back-end requests before any DMB", n)
	}
	sba := a.setSBA()
	token, offA := a.registerAttach(5000, gidB, 9)
	r := a.wantShmem(mapReq(offA, 8192))
	if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL; r.Seals&want != want || !r.NeedReply {
		t.Fatalf("MAP fd seals %#x need-reply %v", r.Seals, r.NeedReply)
	}
	resp := b.attach(token)
	if resp.Status != abi.StatusOK || resp.Index != 5000 {
		t.Fatalf("ATTACH: %+v", resp)
	}
	b.wantShmem(mapReq(resp.Value, 8192))

	own, peer := a.fe.Shmem(offA), b.fe.Shmem(resp.Value)
	copy(peer[4096:], "cursor")
	if string(own[4096:4102]) != "cursor" {
		t.Fatal("the owner's and the attacher's BAR mappings are not one memory")
	}
	if st := b.move(token, 4990, []byte("0123456789"), true); st != abi.StatusOK {
		t.Fatalf("MOVE into an attach-mode DMB: %v", st)
	}
	if string(own[4990:5000]) != "0123456789" || sbaSeq(sba, 9) != 1 {
		t.Fatal("MOVE did not land in the memfd or did not signal")
	}
	if st := b.move(token, 4991, []byte("0123456789"), false); st != abi.StatusRange {
		t.Fatalf("MOVE past the DMB's length (inside its last page): %v", st)
	}

	if st := b.detach(token); st != abi.StatusOK {
		t.Fatalf("DETACH: %v", st)
	}
	b.wantShmem(unmapReq(resp.Value, 8192))
	if st := b.detach(token); st != abi.StatusNoEntry {
		t.Fatalf("double DETACH: %v", st)
	}
	a.noMoreShmem("after the peer's DETACH")
	if b.fe.ShmemMapped() != 0 || a.fe.ShmemMapped() != 1 {
		t.Fatal("front-end mappings after DETACH")
	}
	st := s.fabric.Stats()
	if st.Maps != 2 || st.Unmaps != 1 || st.AttachDMBs != 1 || st.Attached != 0 || st.MappedBytes != 8192 || st.Refused[abi.StatusNoEntry] != 1 {
		t.Fatalf("fabric stats %+v", st)
	}
}

// TestAttachRefusedThroughQueue: refusals of attach-mode requests arrive as
// statuses on the ring, in order with the other requests.
func TestAttachRefusedThroughQueue(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB, "c": gidC})
	a, b, c := s.connect("a"), s.connect("b"), s.connect("c")
	token, _ := a.registerAttach(4096, gidB, 0)
	for _, tc := range []struct {
		g    *guest
		tok  uint64
		want abi.Status
	}{
		{c, token, abi.StatusPermission},  // not the rgid
		{a, token, abi.StatusPermission},  // the owner is not the rgid either
		{b, token ^ 1, abi.StatusNoEntry}, // a guessed token
		{b, token, abi.StatusOK},
		{b, token, abi.StatusBusy},
	} {
		if r := tc.g.attach(tc.tok); r.Status != tc.want {
			t.Fatalf("%s ATTACH %#x: %v, want %v", tc.g.name, tc.tok, r.Status, tc.want)
		}
	}
	if st := c.detach(token); st != abi.StatusPermission {
		t.Fatalf("DETACH by a non-rgid: %v", st)
	}
	if r := a.do(abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Addr: 0x1000, Len: 4096, GID: gidB}, nil); r.Status != abi.StatusInvalid {
		t.Fatalf("attach-mode REGISTER with an address: %v", r.Status)
	}
	// An ATTACH chain with data after the header is refused synchronously.
	if r := b.do(abi.Request{Op: abi.OpAttachDMB, Token: token}, []byte("x")); r.Status != abi.StatusInvalid {
		t.Fatalf("ATTACH with data: %v", r.Status)
	}
	if n := len(c.fe.ShmemRequests()); n != 0 {
		t.Fatalf("refused requests sent %d back-end requests", n)
	}
}

// TestAttachUnregisterUnmapsPeer: UNREGISTER of an attached DMB unmaps it
// in the owner's and the attacher's region, and the attacher gets EventDMB.
func TestAttachUnregisterUnmapsPeer(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	_, evBuf := b.postEventBuffer()
	token, offA := a.registerAttach(4096, gidB, 0)
	a.wantShmem(mapReq(offA, 4096))
	offB := b.attach(token).Value
	b.wantShmem(mapReq(offB, 4096))

	if r := a.do(abi.Request{Op: abi.OpUnregisterDMB, Token: token}, nil); r.Status != abi.StatusOK {
		t.Fatalf("UNREGISTER: %v", r.Status)
	}
	a.wantShmem(unmapReq(offA, 4096))
	b.wantShmem(unmapReq(offB, 4096))
	if ev := b.waitEvent(evBuf); ev != (abi.Event{Type: abi.EventDMB, Token: token, GID: gidA}) {
		t.Fatalf("attacher's event %+v", ev)
	}
	if st := b.detach(token); st != abi.StatusNoEntry {
		t.Fatalf("DETACH after UNREGISTER: %v", st)
	}
}

// TestAttachPeerDisconnects: an owner whose front-end goes away takes its
// DMB out of the attacher's region (UNMAP), and the attacher gets EventDMB
// and EventGID.
func TestAttachPeerDisconnects(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	_, ev1 := b.postEventBuffer()
	_, ev2 := b.postEventBuffer()
	token, _ := a.registerAttach(4096, gidB, 0)
	offB := b.attach(token).Value
	b.wantShmem(mapReq(offB, 4096))

	a.fe.Close()
	b.wantShmem(unmapReq(offB, 4096))
	if e := b.waitEvent(ev1); e != (abi.Event{Type: abi.EventDMB, Token: token, GID: gidA}) {
		t.Fatalf("first event %+v", e)
	}
	if e := b.waitEvent(ev2); e.Type != abi.EventGID || e.GID != gidA {
		t.Fatalf("second event %+v", e)
	}
	if st := s.fabric.Stats(); st.Attached != 0 || st.MappedBytes != 0 || st.AttachDMBs != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestAttachNoMapWhileStopped: the front-end never sees a back-end request
// while its device is stopped. A reset loses the device's DMBs and
// attachments (they are not restored): its peers' mappings go (UNMAP,
// event), it gets no UNMAP itself (QEMU dropped its mappings), and after
// the next start it maps only what it registers anew.
func TestAttachNoMapWhileStopped(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	_, evBuf := b.postEventBuffer()
	token, offA := a.registerAttach(4096, gidB, 0)
	a.wantShmem(mapReq(offA, 4096))
	offB := b.attach(token).Value
	b.wantShmem(mapReq(offB, 4096))
	back, _ := b.registerAttach(4096, gidA, 0)
	b.wantShmem(mapReq(offB+4096, 4096))
	a.wantShmem(mapReq(a.attach(back).Value, 4096))

	if err := a.fe.SetStatus(0); err != nil {
		t.Fatal(err)
	}
	a.fe.DropShmem()
	b.wantShmem(unmapReq(offB, 4096))
	if e := b.waitEvent(evBuf); e.Type != abi.EventDMB || e.Token != token {
		t.Fatalf("event %+v", e)
	}
	a.noMoreShmem("after the reset")
	// b's own DMB lost its attacher without an unmap for a.
	if r := b.do(abi.Request{Op: abi.OpUnregisterDMB, Token: back}, nil); r.Status != abi.StatusOK {
		t.Fatal(r.Status)
	}
	b.wantShmem(unmapReq(offB+4096, 4096))
	a.noMoreShmem("after the peer's UNREGISTER")

	// Start again: nothing comes back by itself; a new DMB maps anew.
	a.req.Reset()
	a.ev.Reset()
	if err := a.fe.Start(fe.StartOptions{QueueSize: 256}); err != nil {
		t.Fatal(err)
	}
	a.noMoreShmem("after the restart")
	if r := b.attach(token); r.Status != abi.StatusNoEntry {
		t.Fatalf("ATTACH of the reset owner's DMB: %v", r.Status)
	}
	_, off := a.registerAttach(4096, gidB, 0)
	a.wantShmem(mapReq(off, 4096))
}

// TestAttachStopDuringMap: the device stops while a SHMEM_MAP waits for its
// reply (QEMU's SET_MEM_TABLE arrives then too): the request is not
// completed into the old rings, the DMB does not exist, and no back-end
// request follows.
func TestAttachStopDuringMap(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA})
	a := s.connect("a")
	stopped := make(chan error, 1)
	a.fe.SetBeforeShmemReply(func(f *fe.Frontend, r fe.ShmemRequest) error {
		f.SetBeforeShmemReply(nil)
		if err := f.SetMemTable(); err != nil { // what QEMU does here
			stopped <- err
			return nil
		}
		stopped <- f.SetStatus(0)
		return nil
	})
	r := abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: 4096, GID: gidA}
	r.Encode(a.hdr)
	a.req.Publish(a.req.AddChain([]fe.Buf{{GPA: a.hdrGPA, Len: abi.RequestSize}, {GPA: a.respGPA, Len: abi.ResponseSize, Write: true}}))
	if err := a.req.Kick(); err != nil {
		t.Fatal(err)
	}
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	a.wantShmem(mapReq(0, 4096))
	a.noMoreShmem("after the stop")
	if _, ok := a.req.PollUsed(); ok {
		t.Fatal("a request of the stopped device was completed")
	}
	if st := s.fabric.Stats(); st.AttachDMBs != 0 || st.DMBs != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestDetachAnswersAfterUnmap: DETACH_DMB and UNREGISTER_DMB are answered
// only once the front-end has unmapped the caller's mappings, so that a
// driver resetting right after never meets an unmap in flight (QEMU 11.1.3
// crashed on that). The front-end holds its UNMAP reply for a while: an
// answer that arrives meanwhile was sent before the unmap was done.
func TestDetachAnswersAfterUnmap(t *testing.T) {
	s := newFabricServer(t, map[string]uint64{"a": gidA, "b": gidB})
	a, b := s.connect("a"), s.connect("b")
	tokA, _ := a.registerAttach(4096, gidB, 1)
	a.wantShmem(mapReq(0, 4096))
	if r := b.attach(tokA); r.Status != abi.StatusOK {
		t.Fatalf("ATTACH: %v", r.Status)
	}
	b.wantShmem(mapReq(0, 4096))

	for _, tc := range []struct {
		g   *guest
		req abi.Request
	}{
		{b, abi.Request{Op: abi.OpDetachDMB, Token: tokA}},
		{a, abi.Request{Op: abi.OpUnregisterDMB, Token: tokA}},
	} {
		// One flag per request: the previous request's goroutine must not
		// be able to set this one's.
		var answered atomic.Bool
		early := make(chan bool, 2)
		tc.g.fe.SetBeforeShmemReply(func(f *fe.Frontend, r fe.ShmemRequest) error {
			if r.Request == vhostuser.BackendReqShmemUnmap {
				deadline := time.Now().Add(200 * time.Millisecond)
				for time.Now().Before(deadline) && !answered.Load() {
					time.Sleep(time.Millisecond)
				}
				early <- answered.Load()
			}
			return nil
		})
		done := make(chan abi.Status, 1)
		go func() {
			st := tc.g.do(tc.req, nil).Status
			answered.Store(true)
			done <- st
		}()
		if st := <-done; st != abi.StatusOK {
			t.Fatalf("%v: %v", tc.req.Op, st)
		}
		if <-early {
			t.Fatalf("%v answered before the front-end had unmapped", tc.req.Op)
		}
		if n := tc.g.fe.ShmemMapped(); n != 0 {
			t.Fatalf("%v answered with %d mappings left", tc.req.Op, n)
		}
	}
}
