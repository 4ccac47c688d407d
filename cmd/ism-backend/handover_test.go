package main

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/handover"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// validState is a state as an old process writes it: VM a with a started
// device and a copy-mode DMB for b, VM b idle.
const validState = `{"Handover":2,"StatsSeq":7,"VMs":[` +
	`{"Name":"a","Listener":0,"Conn":{"Conn":1,"BackendReq":-1,"OfferedFeatures":1,"AckedFeatures":1,"Started":true,"Queues":[]},` +
	`"Events":{"Device":[{"Type":1,"GID":11}],"Software":[]}},` +
	`{"Name":"b","Listener":3}],` +
	`"Fabric":{"CHID":65280,"Names":[{"Name":"a"},{"Name":"b","LastGID":11,"LastModes":1,"Signals":-1}],` +
	`"Devices":[{"Name":"a","GID":10,"Modes":1,"SBASet":true,"SBAGPA":4096,"Beats":9,` +
	`"DMBs":[{"Token":5,"RGID":11,"GPA":8192,"Size":4096,"Index":0,"BufFD":-1}]}]}}`

func TestDecodeState(t *testing.T) {
	st, err := decodeState(stateVersion, []byte(validState))
	if err != nil {
		t.Fatal(err)
	}
	if st.StatsSeq != 7 || len(st.VMs) != 2 || st.VMs[0].Conn == nil || st.VMs[1].Conn != nil || len(st.Fabric.Devices) != 1 {
		t.Fatalf("decoded %+v", st)
	}
	// The fabric part imports (no fds: copy mode only).
	f := ism.NewFabric(abi.DefaultCHID, quietLog())
	im, err := f.Import(st.Fabric, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p := im.Pending(); len(p) != 1 || p[0] != "a" {
		t.Fatalf("pending %v", p)
	}
	for name, c := range map[string]struct {
		version uint32
		state   string
		want    string
	}{
		"unknown version":  {stateVersion + 1, validState, "this binary reads version"},
		"truncated":        {stateVersion, validState[:len(validState)/2], "state"},
		"unknown field":    {stateVersion, strings.Replace(validState, `"StatsSeq"`, `"Later"`, 1), "unknown field"},
		"trailing data":    {stateVersion, validState + `{}`, "after the state"},
		"no fabric":        {stateVersion, `{"VMs":[]}`, "no fabric"},
		"bad VM name":      {stateVersion, strings.Replace(validState, `"Name":"b","Listener"`, `"Name":"../b","Listener"`, 1), "VM name"},
		"VM twice":         {stateVersion, strings.Replace(validState, `"Name":"b","Listener"`, `"Name":"a","Listener"`, 1), "VM name"},
		"events unstarted": {stateVersion, strings.Replace(validState, `"Started":true`, `"Started":false`, 1), "events"},
	} {
		if _, err := decodeState(c.version, []byte(c.state)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", name, err, c.want)
		}
	}
}

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetLevel(logrus.PanicLevel)
	return logrus.NewEntry(l)
}

// FuzzDecodeState: whatever a hostile or broken old process sends, the new
// one gets an error or a state, never a panic; and a state that decodes
// imports into a fabric or is refused, never a panic. (The vhostuser part
// needs real fds; its checks have their own tests.)
func FuzzDecodeState(f *testing.F) {
	f.Add(uint32(stateVersion), []byte(validState))
	f.Fuzz(func(t *testing.T, version uint32, b []byte) {
		st, err := decodeState(version, b)
		if err != nil {
			return
		}
		fab := ism.NewFabric(st.Fabric.CHID, quietLog())
		if im, err := fab.Import(st.Fabric, nil); err == nil {
			if len(im.Pending()) != len(st.Fabric.Devices) {
				t.Fatalf("%d devices pending, %d imported", len(im.Pending()), len(st.Fabric.Devices))
			}
		}
	})
}

// testGuest plays one VM against a backend run by run(): QEMU (the
// vhostusertest front-end) and a driver that issues one request at a time.
type testGuest struct {
	t                        *testing.T
	f                        *vhostusertest.Frontend
	mem                      *vhostusertest.GuestMemory
	hdrGPA, dataGPA, respGPA uint64
	hdr, data, resp          []byte
}

func newTestGuest(t *testing.T, socket string) *testGuest {
	t.Helper()
	mem, err := vhostusertest.NewGuestMemory(0, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mem.Close)
	f, err := vhostusertest.Dial(socket, mem)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(vhostusertest.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	g := &testGuest{t: t, f: f, mem: mem}
	if g.hdrGPA, g.hdr, err = mem.Alloc(abi.RequestSize, 8); err != nil {
		t.Fatal(err)
	}
	if g.dataGPA, g.data, err = mem.Alloc(4096, 8); err != nil {
		t.Fatal(err)
	}
	if g.respGPA, g.resp, err = mem.Alloc(abi.ResponseSize, 8); err != nil {
		t.Fatal(err)
	}
	return g
}

func (g *testGuest) do(r abi.Request, data []byte) abi.Response {
	g.t.Helper()
	r.Encode(g.hdr)
	bufs := []vhostusertest.Buf{{GPA: g.hdrGPA, Len: abi.RequestSize}}
	if len(data) > 0 {
		copy(g.data, data)
		bufs = append(bufs, vhostusertest.Buf{GPA: g.dataGPA, Len: uint32(len(data))})
	}
	bufs = append(bufs, vhostusertest.Buf{GPA: g.respGPA, Len: abi.ResponseSize, Write: true})
	q := g.f.Queues[abi.RequestQueue]
	head := q.AddChain(bufs)
	q.Publish(head)
	if err := q.Kick(); err != nil {
		g.t.Fatal(err)
	}
	u, err := q.WaitUsed()
	if err != nil || u.ID != head || u.Len != abi.ResponseSize {
		g.t.Fatalf("request %v: used %+v, %v", r.Op, u, err)
	}
	resp, _ := abi.DecodeResponse(g.resp)
	return resp
}

// waitFile waits until path exists (the backend made its socket).
func waitFile(t *testing.T, path string, done <-chan error) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		select {
		case err := <-done:
			t.Fatalf("the backend ended before making %s: %v", path, err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func startRun(t *testing.T, args []string) (context.CancelFunc, chan error) {
	t.Helper()
	opts, err := parseFlags(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, opts) }()
	return cancel, done
}

// Two upgrades in a row, each a whole backend (run) in this process, over
// the real handover socket: the guests' DMB, token, SBA and counters go
// on, the old run ends without an error, and the socket files stay.
func TestTakeover(t *testing.T) {
	dir := t.TempDir()
	base := []string{"-socket-dir", dir, "-vm", "a=0xa", "-vm", "b=0xb", "-modes", "copy", "-log-level", "error",
		"-stats-file", filepath.Join(dir, "stats.json")}
	hsock := filepath.Join(dir, "ism-backend.handover")
	cancel, done := startRun(t, base)
	for _, p := range []string{"a.sock", "b.sock", "ism-backend.handover"} {
		waitFile(t, filepath.Join(dir, p), done)
	}
	a, b := newTestGuest(t, filepath.Join(dir, "a.sock")), newTestGuest(t, filepath.Join(dir, "b.sock"))
	sbaGPA, sba, err := a.mem.Alloc(abi.SBASize, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if r := a.do(abi.Request{Op: abi.OpSetSBA, Addr: sbaGPA}, nil); r.Status != abi.StatusOK {
		t.Fatal("SET_SBA:", r.Status)
	}
	dmbGPA, dmb, err := a.mem.Alloc(4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	r := a.do(abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0xb, Index: 2}, nil)
	if r.Status != abi.StatusOK {
		t.Fatal("REGISTER_DMB:", r.Status)
	}
	tok := r.Value
	move := func(off uint64, s string) {
		t.Helper()
		if r := b.do(abi.Request{Op: abi.OpMove, Token: tok, Offset: off, Len: uint64(len(s)), Flags: abi.FlagSignal}, []byte(s)); r.Status != abi.StatusOK {
			t.Fatal("MOVE:", r.Status)
		}
	}
	move(0, "zero")
	for i, word := range []string{"one", "two"} {
		cancelNew, doneNew := startRun(t, append(append([]string(nil), base...), "-takeover", hsock))
		if err := <-done; err != nil {
			t.Fatalf("upgrade %d: the old run ended with %v", i+1, err)
		}
		cancel, done = cancelNew, doneNew
		move(uint64(4+3*i), word)
		for _, p := range []string{"a.sock", "b.sock", "ism-backend.handover", controlName} {
			if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
				t.Fatalf("upgrade %d: %v", i+1, err)
			}
		}
		// The control socket came along: the new process answers, with
		// the DMB it took over and the MOVEs the old one counted.
		ans, err := askControl(dir, "status", 10*time.Second)
		if err != nil {
			t.Fatalf("upgrade %d: status: %v", i+1, err)
		}
		if len(ans.Status.DMBs) != 1 || ans.Status.DMBs[0].TokenPrefix != tokenPrefix(tok) || ans.Status.Total.Moves != uint64(2+i) {
			t.Fatalf("upgrade %d: status %+v", i+1, ans.Status)
		}
	}
	if string(dmb[:10]) != "zeroonetwo" || binary.LittleEndian.Uint32(sba[abi.SBASeqOffset+4*2:]) != 3 {
		t.Fatalf("DMB %q, SBA seq %d", dmb[:10], binary.LittleEndian.Uint32(sba[abi.SBASeqOffset+4*2:]))
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal("the last run:", err)
	}
}

// A takeover that fails rolls back: a new process that would drop a VM
// ends with an error, and one that cannot rebuild a VM's device (another
// GID for it) too; the old one serves on, its guests untouched.
func TestTakeoverFailureRollsBack(t *testing.T) {
	dir := t.TempDir()
	base := []string{"-socket-dir", dir, "-vm", "a=0xa", "-vm", "b=0xb", "-modes", "copy", "-log-level", "error"}
	hsock := filepath.Join(dir, "ism-backend.handover")
	cancel, done := startRun(t, base)
	for _, p := range []string{"a.sock", "b.sock", "ism-backend.handover"} {
		waitFile(t, filepath.Join(dir, p), done)
	}
	a, b := newTestGuest(t, filepath.Join(dir, "a.sock")), newTestGuest(t, filepath.Join(dir, "b.sock"))
	dmbGPA, dmb, err := a.mem.Alloc(4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	r := a.do(abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0xb, Index: 1}, nil)
	if r.Status != abi.StatusOK {
		t.Fatal("REGISTER_DMB:", r.Status)
	}
	for i, args := range [][]string{
		{"-socket-dir", dir, "-vm", "a=0xa", "-modes", "copy", "-log-level", "error", "-takeover", hsock},                 // drops b
		{"-socket-dir", dir, "-vm", "a=0xa", "-vm", "b=0xc", "-modes", "copy", "-log-level", "error", "-takeover", hsock}, // b's GID differs
	} {
		_, newDone := startRun(t, args)
		err := <-newDone
		if err == nil || !strings.Contains(err.Error(), "takeover") || strings.Contains(err.Error(), "\n") {
			t.Fatalf("failed takeover %d: %v, want a one-line takeover error", i, err)
		}
		t.Logf("takeover %d: %v", i, err)
		select {
		case err := <-done:
			t.Fatalf("the old run ended after failed takeover %d: %v", i, err)
		default:
		}
		s := []byte{'x', byte('0' + i)}
		if r := b.do(abi.Request{Op: abi.OpMove, Token: r.Value, Offset: uint64(2 * i), Len: 2}, s); r.Status != abi.StatusOK {
			t.Fatalf("MOVE after failed takeover %d: %v", i, r.Status)
		}
	}
	if string(dmb[:4]) != "x0x1" {
		t.Fatalf("DMB %q", dmb[:4])
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestInheritTCPListener: a TCP listener handed over as an fd (the
// -metrics-addr listener) accepts on the same address in its new owner; a
// unix socket's fd is refused.
func TestInheritTCPListener(t *testing.T) {
	old, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	fd, err := handover.ListenerFD(old.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	ln, err := inheritTCPListener(fd)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ln.Addr().String() != old.Addr().String() {
		t.Fatalf("inherited %v, handed %v", ln.Addr(), old.Addr())
	}
	old.Close() // the old process lets go: the new owner still accepts
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	u, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "u.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	ufd, err := handover.ListenerFD(u)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(ufd)
	if l, err := inheritTCPListener(ufd); err == nil {
		l.Close()
		t.Fatal("a unix socket's fd was taken for a TCP listener")
	}
}
