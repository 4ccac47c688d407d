package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// vmCmd runs `ism-backend add-vm|remove-vm -socket-dir dir arg` and returns
// what it printed.
func vmCmd(dir, command, arg string) (string, error) {
	var out bytes.Buffer
	err := runVMCommand(command, []string{"-socket-dir", dir, arg}, &out, io.Discard)
	return out.String(), err
}

// statusOf asks the backend serving dir for its status.
func statusOf(t *testing.T, dir string) *statusJSON {
	t.Helper()
	a, err := askControl(dir, "status", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return a.Status
}

func deviceOf(s *statusJSON, name string) (deviceJSON, bool) {
	for _, d := range s.Devices {
		if d.VM == name {
			return d, true
		}
	}
	return deviceJSON{}, false
}

func vmStatsOf(s *statusJSON, name string) (vmStatsJSON, bool) {
	for _, v := range s.VMs {
		if v.Name == name {
			return v, true
		}
	}
	return vmStatsJSON{}, false
}

// waitEvent posts one event buffer on g's event queue and returns the
// event the backend writes into it.
func (g *testGuest) waitEvent() abi.Event {
	g.t.Helper()
	gpa, buf, err := g.mem.Alloc(abi.EventSize, 8)
	if err != nil {
		g.t.Fatal(err)
	}
	q := g.f.Queues[abi.EventQueue]
	head := q.AddChain([]vhostusertest.Buf{{GPA: gpa, Len: abi.EventSize, Write: true}})
	q.Publish(head)
	if err := q.Kick(); err != nil {
		g.t.Fatal(err)
	}
	u, err := q.WaitUsed()
	if err != nil || u.ID != head {
		g.t.Fatalf("event queue: used %+v, %v", u, err)
	}
	ev, err := abi.DecodeEvent(buf)
	if err != nil {
		g.t.Fatal(err)
	}
	return ev
}

// TestAddRemoveVM: a VM added at runtime gets its socket (mode as at the
// start), is listed by status at once, joins the fabric and exchanges data
// with a VM of -vm; removed while connected, its connection is closed, its
// DMB freed, its socket file gone, and its peer gets the GID-gone event.
// Bad requests get one-line errors and change nothing.
func TestAddRemoveVM(t *testing.T) {
	dir := t.TempDir()
	cancel, done := startRun(t, []string{"-socket-dir", dir, "-vm", "a=0xa", "-vm", "b=0xb", "-modes", "copy", "-log-level", "error"})
	defer cancel()
	waitFile(t, filepath.Join(dir, controlName), done)
	a := newTestGuest(t, filepath.Join(dir, "a.sock"))

	out, err := vmCmd(dir, "add-vm", "c=0xc")
	if err != nil {
		t.Fatal(err)
	}
	csock := filepath.Join(dir, "c.sock")
	if want := fmt.Sprintf("added VM c (GID 0x000000000000000c), socket %s\n", csock); out != want {
		t.Errorf("add-vm printed %q, want %q", out, want)
	}
	if mode, _ := statSocket(t, csock); mode != defaultSocketMode {
		t.Errorf("c.sock mode %o, want %o", mode, defaultSocketMode)
	}
	s := statusOf(t, dir)
	if d, ok := deviceOf(s, "c"); !ok || d.GID != gidString(0xc) || d.Connected || d.Modes != "copy" {
		t.Fatalf("status after add-vm: %+v", s.Devices)
	}

	// Refused, each with one line, none changing anything.
	for _, c := range []struct{ command, arg, want string }{
		{"add-vm", "c=0xd", "served already"},
		{"add-vm", "a", "served already"},
		{"add-vm", "d=0xa", "is VM a's"},
		{"add-vm", "d=0", "GID 0 is reserved"},
		{"add-vm", "d=zz", "not a 64-bit number"},
		{"add-vm", "../d", "name must be"},
		{"add-vm", "d/e", "name must be"},
		{"add-vm", ".hidden", "name must be"},
		{"remove-vm", "x", "no VM x"},
		{"remove-vm", "../a", "not a VM name"},
	} {
		_, err := vmCmd(dir, c.command, c.arg)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s %s: %v, want one line with %q", c.command, c.arg, err, c.want)
		}
	}
	// The backend checks too: the CLI is only one client.
	for _, req := range []controlRequest{{Command: "add-vm", VM: "../d"}, {Command: "add-vm", VM: "c"}, {Command: "remove-vm", VM: "a/b"}} {
		if _, err := askControlRequest(dir, req, 30*time.Second); err == nil || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want a one-line error", req, err)
		}
	}
	for _, args := range [][]string{{}, {"c", "d"}, {"-bogus", "c"}} {
		if err := runVMCommand("add-vm", append([]string{"-socket-dir", dir}, args...), io.Discard, io.Discard); err == nil {
			t.Errorf("add-vm %q: accepted", args)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "d.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused add-vm left d.sock: %v", err)
	}
	if s := statusOf(t, dir); len(s.Devices) != 3 {
		t.Fatalf("devices after the refusals: %+v", s.Devices)
	}

	// c joins the fabric: a DMB each way, data from c to a.
	c := newTestGuest(t, csock)
	dmbGPA, dmb, err := a.mem.Alloc(4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	r := a.do(abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0xc, Index: 1}, nil)
	if r.Status != abi.StatusOK {
		t.Fatal("a: REGISTER_DMB:", r.Status)
	}
	aTok := r.Value
	cGPA, _, err := c.mem.Alloc(4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if r := c.do(abi.Request{Op: abi.OpRegisterDMB, Addr: cGPA, Len: 4096, GID: 0xa, Index: 2}, nil); r.Status != abi.StatusOK {
		t.Fatal("c: REGISTER_DMB:", r.Status)
	}
	if r := c.do(abi.Request{Op: abi.OpMove, Token: aTok, Len: 5}, []byte("hello")); r.Status != abi.StatusOK {
		t.Fatal("c: MOVE:", r.Status)
	}
	if string(dmb[:5]) != "hello" {
		t.Fatalf("a's DMB %q", dmb[:5])
	}
	s = statusOf(t, dir)
	if d, _ := deviceOf(s, "c"); !d.Connected || len(s.DMBs) != 2 {
		t.Fatalf("status with c connected: %+v %+v", s.Devices, s.DMBs)
	}
	aBefore, _ := vmStatsOf(s, "a")

	out, err = vmCmd(dir, "remove-vm", "c")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out, "removed VM c (GID 0x000000000000000c)") {
		t.Errorf("remove-vm printed %q", out)
	}
	if !c.f.WaitClosed() {
		t.Error("c's connection still open after remove-vm")
	}
	if _, err := os.Stat(csock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("c.sock after remove-vm: %v", err)
	}
	// At once, when remove-vm has answered: c's device and its DMB are
	// gone, a's DMB for c stays, and a was told.
	s = statusOf(t, dir)
	if _, ok := deviceOf(s, "c"); ok || len(s.Devices) != 2 {
		t.Errorf("devices after remove-vm: %+v", s.Devices)
	}
	if len(s.DMBs) != 1 || s.DMBs[0].Owner != "a" {
		t.Errorf("DMBs after remove-vm: %+v", s.DMBs)
	}
	if aAfter, _ := vmStatsOf(s, "a"); aAfter.Stats.Events != aBefore.Stats.Events+1 {
		t.Errorf("a's events %d before remove-vm, %d after, want one more", aBefore.Stats.Events, aAfter.Stats.Events)
	}
	if ev := a.waitEvent(); ev.Type != abi.EventGID || ev.GID != 0xc {
		t.Errorf("a's event %+v, want the GID-gone of 0xc", ev)
	}
	if r := a.do(abi.Request{Op: abi.OpQueryRGID, GID: 0xc}, nil); r.Status == abi.StatusOK {
		t.Error("QUERY_RGID of the removed VM's GID succeeded")
	}
	if _, err := vmCmd(dir, "remove-vm", "c"); err == nil {
		t.Error("c removed twice")
	}

	// Added again, under its name and another GID: a new socket, served.
	if _, err := vmCmd(dir, "add-vm", "c=0xd"); err != nil {
		t.Fatal(err)
	}
	c2 := newTestGuest(t, csock)
	if r := c2.do(abi.Request{Op: abi.OpQueryRGID, GID: 0xa}, nil); r.Status != abi.StatusOK {
		t.Fatal("c again: QUERY_RGID:", r.Status)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Every socket file the run made is gone, the added VM's too.
	for _, p := range []string{"a.sock", "b.sock", "c.sock", controlName} {
		if _, err := os.Stat(filepath.Join(dir, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after the run: %v", p, err)
		}
	}
}

// TestHandoverCarriesVMChanges: VMs added and removed at runtime stay so
// across two upgrades, though the new processes get the old -vm: the added
// VM's connection, DMB and socket move, the removed VM's socket does not
// come back, and the new process can remove the added VM.
func TestHandoverCarriesVMChanges(t *testing.T) {
	dir := t.TempDir()
	base := []string{"-socket-dir", dir, "-vm", "a=0xa", "-vm", "b=0xb", "-modes", "copy", "-log-level", "error"}
	hsock := filepath.Join(dir, "ism-backend.handover")
	cancel, done := startRun(t, base)
	waitFile(t, filepath.Join(dir, controlName), done)
	a := newTestGuest(t, filepath.Join(dir, "a.sock"))
	if _, err := vmCmd(dir, "add-vm", "c=0xc"); err != nil {
		t.Fatal(err)
	}
	if _, err := vmCmd(dir, "remove-vm", "b"); err != nil {
		t.Fatal(err)
	}
	c := newTestGuest(t, filepath.Join(dir, "c.sock"))
	dmbGPA, dmb, err := a.mem.Alloc(4096, 4096)
	if err != nil {
		t.Fatal(err)
	}
	r := a.do(abi.Request{Op: abi.OpRegisterDMB, Addr: dmbGPA, Len: 4096, GID: 0xc, Index: 0}, nil)
	if r.Status != abi.StatusOK {
		t.Fatal("REGISTER_DMB:", r.Status)
	}
	tok := r.Value
	for i, word := range []string{"one", "two"} {
		cancelNew, doneNew := startRun(t, append(append([]string(nil), base...), "-takeover", hsock))
		if err := <-done; err != nil {
			t.Fatalf("upgrade %d: the old run ended with %v", i+1, err)
		}
		cancel, done = cancelNew, doneNew
		if r := c.do(abi.Request{Op: abi.OpMove, Token: tok, Offset: uint64(3 * i), Len: 3}, []byte(word)); r.Status != abi.StatusOK {
			t.Fatalf("upgrade %d: MOVE from the added VM: %v", i+1, r.Status)
		}
		s := statusOf(t, dir)
		if len(s.Devices) != 2 || s.Devices[0].VM != "a" || s.Devices[1].VM != "c" || !s.Devices[1].Connected ||
			s.Devices[1].GID != gidString(0xc) || len(s.DMBs) != 1 {
			t.Fatalf("upgrade %d: status %+v %+v", i+1, s.Devices, s.DMBs)
		}
		if _, err := os.Stat(filepath.Join(dir, "b.sock")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("upgrade %d: the removed VM's socket: %v", i+1, err)
		}
	}
	if string(dmb[:6]) != "onetwo" {
		t.Fatalf("DMB %q", dmb[:6])
	}
	if _, err := vmCmd(dir, "remove-vm", "c"); err != nil {
		t.Fatal(err)
	}
	if !c.f.WaitClosed() {
		t.Error("c's connection still open after remove-vm in the new process")
	}
	if ev := a.waitEvent(); ev.Type != abi.EventGID || ev.GID != 0xc {
		t.Errorf("a's event %+v, want the GID-gone of 0xc", ev)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestServedAfterTakeover: the VM list a new process serves, and the
// conflicts between its -vm and the VMs added to the old process.
func TestServedAfterTakeover(t *testing.T) {
	flags := []vmSpec{{"a", 1}, {"b", 2}}
	got, err := servedAfterTakeover(flags, []vmSpec{{"c", 3}, {"b", 4}}, []string{"b"})
	if err != nil || fmt.Sprint(got) != "[{a 1} {c 3} {b 4}]" {
		t.Errorf("got %v, %v", got, err)
	}
	got, err = servedAfterTakeover(flags, []vmSpec{{"a", 1}}, nil)
	if err != nil || fmt.Sprint(got) != "[{a 1} {b 2}]" {
		t.Errorf("an added VM the flags give too: %v, %v", got, err)
	}
	for _, added := range [][]vmSpec{{{"a", 5}}, {{"c", 2}}} {
		if _, err := servedAfterTakeover(flags, added, nil); err == nil {
			t.Errorf("added %v beside %v: accepted", added, flags)
		}
	}
	st := strings.Replace(validState, `"StatsSeq":7`, `"StatsSeq":7,"Added":[{"Name":"c","GID":3}],"Removed":["d"]`, 1)
	if s, err := decodeState(stateVersion, []byte(st)); err != nil || len(s.Added) != 1 || s.Removed[0] != "d" {
		t.Errorf("state with changes: %+v, %v", s, err)
	}
	for name, bad := range map[string]string{
		"added bad name": `"Added":[{"Name":"../c","GID":3}]`,
		"added GID 0":    `"Added":[{"Name":"c","GID":0}]`,
		"added twice":    `"Added":[{"Name":"c","GID":3},{"Name":"c","GID":4}]`,
		"added same GID": `"Added":[{"Name":"c","GID":3},{"Name":"d","GID":3}]`,
		"removed bad":    `"Removed":["a/b"]`,
	} {
		st := strings.Replace(validState, `"StatsSeq":7`, `"StatsSeq":7,`+bad, 1)
		if _, err := decodeState(stateVersion, []byte(st)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestVMControlRaces: VMs added and removed over and over while front-ends
// connect to them, status is asked and the backend is upgraded twice: no
// panic, no deadlock, and once every run has ended no descriptor and no
// goroutine is left.
func TestVMControlRaces(t *testing.T) {
	dir := t.TempDir()
	base := []string{"-socket-dir", dir, "-vm", "a=0xa", "-modes", "copy", "-log-level", "error", "-handover-timeout", "5m"}
	hsock := filepath.Join(dir, "ism-backend.handover")
	// A run first, ended at once: what the process starts once for good
	// (os/signal's loop) is in the counts before.
	cancel, done := startRun(t, base)
	waitFile(t, filepath.Join(dir, controlName), done)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	fds0, goroutines0 := openFDs(t), runtime.NumGoroutine()

	cancel, done = startRun(t, base)
	waitFile(t, filepath.Join(dir, controlName), done)
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	// What the goroutines got through since the last upgrade.
	var mu sync.Mutex
	var added, removed, connected map[string]bool
	answered := false
	reset := func() {
		mu.Lock()
		added, removed, connected = map[string]bool{}, map[string]bool{}, map[string]bool{}
		mu.Unlock()
	}
	reset()
	note := func(m *map[string]bool, name string) {
		mu.Lock()
		(*m)[name] = true
		mu.Unlock()
	}
	const names = 4
	for i := range names {
		name := fmt.Sprintf("x%d", i)
		wg.Add(2)
		go func() { // add and remove
			defer wg.Done()
			for ctx.Err() == nil {
				if _, err := vmCmd(dir, "add-vm", name); err == nil {
					note(&added, name)
				}
				if _, err := vmCmd(dir, "remove-vm", name); err == nil {
					note(&removed, name)
				}
			}
		}()
		go func() { // connect, start the device, go
			defer wg.Done()
			for ctx.Err() == nil {
				mem, err := vhostusertest.NewGuestMemory(0, 1<<20)
				if err != nil {
					t.Error(err)
					return
				}
				f, err := vhostusertest.Dial(filepath.Join(dir, name+".sock"), mem)
				if err != nil {
					mem.Close()
					runtime.Gosched()
					continue
				}
				if f.Handshake(vhostusertest.HandshakeOptions{}) == nil && f.Start(vhostusertest.StartOptions{}) == nil {
					note(&connected, name)
				}
				f.Close()
				mem.Close()
			}
		}()
	}
	wg.Add(1)
	go func() { // status
		defer wg.Done()
		for ctx.Err() == nil {
			if _, err := askControl(dir, "status", 30*time.Second); err == nil {
				mu.Lock()
				answered = true
				mu.Unlock()
			}
		}
	}()
	// Two upgrades while all that runs, each once every name was added
	// and removed and a front-end got through to one.
	ready := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(added) == names && len(removed) == names && len(connected) > 0 && answered
	}
	deadline := time.Now().Add(5 * time.Minute)
	for i := range 2 {
		for !ready() {
			if time.Now().After(deadline) {
				mu.Lock()
				t.Fatalf("upgrade %d: added %v, removed %v, connected %v", i+1, added, removed, connected)
			}
			select {
			case err := <-done:
				t.Fatalf("the run ended: %v", err)
			case <-time.After(10 * time.Millisecond):
			}
		}
		reset()
		cancelNew, doneNew := startRun(t, append(append([]string(nil), base...), "-takeover", hsock))
		if err := <-done; err != nil {
			t.Fatalf("upgrade %d: the old run ended with %v", i+1, err)
		}
		cancel, done = cancelNew, doneNew
	}
	stop()
	wg.Wait()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The last run removed whatever socket it served.
	left, _ := filepath.Glob(filepath.Join(dir, "*.sock"))
	if len(left) != 0 {
		t.Errorf("socket files left: %v", left)
	}
	// Goroutines end a moment after the run returns (a connection's
	// reader, a timer): wait for the counts to come back.
	for {
		fds, gs := openFDs(t), runtime.NumGoroutine()
		if fds <= fds0 && gs <= goroutines0 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d fds (%d before), %d goroutines (%d before)\n%s", fds, fds0, gs, goroutines0, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}
