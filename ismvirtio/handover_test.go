package ismvirtio

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
)

// handOverServer moves every VM of s to a new Server and fabric in this
// process, as the new process of an upgrade rebuilds them: Freeze, export
// (vhostuser, fabric, waiting events), import under Hold, then the old
// side let go and the new one running. It returns the new fabric.
func handOverServer(t *testing.T, s *fabricServer, gids map[string]uint64) *ism.Fabric {
	t.Helper()
	fz, err := s.server.Freeze(context.Background())
	if err != nil {
		t.Fatal("freeze:", err)
	}
	vms, fds, err := fz.Export()
	if err != nil {
		t.Fatal("export:", err)
	}
	fst, ffds, err := s.fabric.Export()
	if err != nil {
		t.Fatal("fabric export:", err)
	}
	for i := range fst.Devices {
		for j := range fst.Devices[i].DMBs {
			if e := &fst.Devices[i].DMBs[j]; e.BufFD >= 0 {
				e.BufFD += len(fds)
			}
		}
	}
	fds = append(fds, ffds...)
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	events := map[string]EventsState{}
	for _, vm := range vms {
		if vm.Conn != nil && vm.Conn.Started {
			events[vm.Name] = s.server.Guest(vm.Name).Backend().(*Backend).ExportEvents()
		}
	}

	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	f2 := ism.NewFabric(abi.DefaultCHID, logrus.NewEntry(log))
	imp, err := f2.Import(fst, fds)
	if err != nil {
		t.Fatal("fabric import:", err)
	}
	srv2 := vhostuser.NewServer(logrus.NewEntry(log))
	srv2.Hold()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, len(vms))
	ready := make(chan error, len(vms))
	for _, vm := range vms {
		ln, err := vhostuser.ListenerOf(fds, vm.Listener)
		if err != nil {
			t.Fatal(err)
		}
		first := true
		go func() {
			defer func() { done <- struct{}{} }()
			srv2.ServeImported(ctx, vm.Name, ln, vm.Conn, fds, func(name string) (vhostuser.Backend, error) {
				b := New(f2, name, gids[name], log.WithField("vm", name))
				if ev, ok := events[name]; ok && first {
					b.SetImported(imp, ev)
				}
				first = false
				return b, nil
			}, func(err error) { ready <- err })
		}()
	}
	t.Cleanup(func() {
		cancel()
		for range vms {
			<-done
		}
	})
	for range vms {
		if err := <-ready; err != nil {
			t.Fatal("import:", err)
		}
	}
	if p := imp.Pending(); len(p) != 0 {
		t.Fatalf("devices not taken over: %v", p)
	}
	fz.Release()
	srv2.Unhold()
	return f2
}

// Two VMs with a DMB between them, a signalled MOVE counted and a SIGNAL
// waiting for a driver that posted no event buffer: after the handover the
// same token takes a MOVE into the same guest memory, the SBA counts on,
// the waiting event is delivered, and the heartbeat goes on from its count.
func TestHandoverKeepsDevices(t *testing.T) {
	gids := map[string]uint64{"a": 0xA, "b": 0xB}
	s := newFabricServer(t, gids)
	a, b := s.connect("a"), s.connect("b")
	sba := a.setSBA()
	tok, dmb := a.register(4096, 0xB, 3)
	if st := b.move(tok, 0, []byte("before"), true); st != abi.StatusOK {
		t.Fatal("MOVE:", st)
	}
	if r := b.do(abi.Request{Op: abi.OpSignal, GID: 0xA, Index: 77, Offset: 5}, nil); r.Status != abi.StatusOK {
		t.Fatal("SIGNAL:", r.Status)
	}
	// Two beats, so that a count restarted from zero would show.
	h0 := waitBeat(t, sba, 2, 0)

	handOverServer(t, s, gids)
	waitBeat(t, sba, h0+1, h0)

	if st := b.move(tok, 6, []byte("after"), true); st != abi.StatusOK {
		t.Fatal("MOVE after the handover:", st)
	}
	if string(dmb[:11]) != "beforeafter" {
		t.Fatalf("DMB holds %q", dmb[:11])
	}
	if sbaSeq(sba, 3) != 2 {
		t.Fatalf("SBA seq %d after the handover, want 2", sbaSeq(sba, 3))
	}
	_, buf := a.postEventBuffer()
	if ev := a.waitEvent(buf); ev.Type != abi.EventSWR || ev.GID != 0xB || ev.Code != 77 || ev.Info != 5 {
		t.Fatalf("event after the handover: %+v", ev)
	}
	// The device goes on with the driver's control path too: a reset
	// drops the DMB, and b hears of it.
	if err := a.fe.Stop(); err != nil {
		t.Fatal(err)
	}
	_, bbuf := b.postEventBuffer()
	if ev := b.waitEvent(bbuf); ev.Type != abi.EventGID || ev.GID != 0xA {
		t.Fatalf("b's event after a's reset: %+v", ev)
	}
}

// waitBeat waits until the SBA's heartbeat reaches at least want and
// returns it; a count below floor seen meanwhile fails the test.
func waitBeat(t *testing.T, sba []byte, want, floor uint32) uint32 {
	t.Helper()
	deadline := time.Now().Add(time.Minute) // DefaultHeartbeat beats twice a second
	for {
		h := binary.LittleEndian.Uint32(sba[abi.SBAHeartbeatOffset:])
		if h < floor {
			t.Fatalf("heartbeat %d, below %d seen before", h, floor)
		}
		if h >= want {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("heartbeat stuck at %d, want %d", h, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
