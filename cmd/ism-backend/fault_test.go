package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
)

func TestParseFaultArgs(t *testing.T) {
	idx := func(i int64) *int64 { return &i }
	for _, c := range []struct {
		args []string
		want faultRequest
	}{
		{[]string{"list"}, faultRequest{Verb: "list"}},
		{[]string{"clear"}, faultRequest{Verb: "clear"}},
		{[]string{"clear", "3"}, faultRequest{Verb: "clear", ID: 3}},
		{[]string{"drop-signals", "to=a", "every=3"}, faultRequest{Verb: "drop-signals", VM: "a", Every: 3}},
		{[]string{"delay-signals", "from=0xb", "delay=20ms"}, faultRequest{Verb: "delay-signals", VM: "0xb", From: true, Delay: "20ms"}},
		{[]string{"fail-moves", "to=a", "dmb=1234abcd", "status=busy", "count=2"}, faultRequest{Verb: "fail-moves", VM: "a", DMB: "1234abcd", Status: "busy", Count: 2}},
		{[]string{"revoke-dmb", "vm=a", "index=5"}, faultRequest{Verb: "revoke-dmb", VM: "a", Index: idx(5)}},
		{[]string{"throttle", "vm=a", "rate=100"}, faultRequest{Verb: "throttle", VM: "a", Rate: 100}},
	} {
		got, err := parseFaultArgs(c.args)
		if err != nil {
			t.Errorf("%q: %v", c.args, err)
			continue
		}
		gj, _ := json.Marshal(got)
		wj, _ := json.Marshal(c.want)
		if !bytes.Equal(gj, wj) {
			t.Errorf("%q: %s, want %s", c.args, gj, wj)
		}
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "which fault"},
		{[]string{"drop-signals", "to=a", "every"}, "KEY=VALUE"},
		{[]string{"drop-signals", "to=a", "every="}, "KEY=VALUE"},
		{[]string{"drop-signals", "to=a", "every=x"}, "want a number"},
		{[]string{"drop-signals", "to=a", "every=-1"}, "want a number"},
		{[]string{"drop-signals", "to=a", "to=b"}, "twice"},
		{[]string{"drop-signals", "to=a", "from=b"}, "one of"},
		{[]string{"drop-signals", "to=a", "colour=red"}, "unknown key"},
	} {
		_, err := parseFaultArgs(c.args)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%q: %v, want a one-line error about %q", c.args, err, c.want)
		}
	}
}

// faultBackend serves a control socket over a fabric with a (owning a DMB
// at index 5 for b) and b connected, c configured only.
func faultBackend(t *testing.T) (dir string, f *ism.Fabric, a, b *ism.Device, tok uint64, logs *bytes.Buffer) {
	log := logrus.New()
	logs = &bytes.Buffer{}
	log.SetOutput(logs)
	f = ism.NewFabric(abi.DefaultCHID, logrus.NewEntry(log))
	connect := func(name string, gid uint64) *ism.Device {
		mem, err := ism.NewSliceMemory(ism.Region{GPA: 0, Data: make([]byte, 1<<20)})
		if err != nil {
			t.Fatal(err)
		}
		d, err := f.Connect(name, gid, mem, nopNotifier{})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	a, b = connect("a", 0xA), connect("b", 0xB)
	var err error
	if tok, err = a.RegisterDMB(0x10000, 4096, 0xB, 5); err != nil {
		t.Fatal(err)
	}
	opts, err := parseFlags([]string{"-vm", "a=0xa", "-vm", "b=0xb", "-vm", "c=0xc"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	dir = t.TempDir()
	ln, err := listenControl(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go serveControl(ctx, ln, f, opts, log)
	return dir, f, a, b, tok, logs
}

func fault(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	err := runFault(append([]string{"-socket-dir", dir}, args...), &out, io.Discard)
	return out.String(), err
}

// TestControlFault: faults set, listed, shown by status, injected and
// cleared through the socket; every bad field gets a one-line error; set
// and clear are logged with the peer's pid.
func TestControlFault(t *testing.T) {
	dir, f, a, b, tok, logs := faultBackend(t)
	out, err := fault(t, dir, "drop-signals", "to=a", "every=2")
	if err != nil || !strings.Contains(out, "fault 1 set") || !strings.Contains(out, "drop-signals to a every 2") {
		t.Fatalf("set: %q, %v", out, err)
	}
	if !strings.Contains(logs.String(), "FAULT INJECTION ON: drop-signals to a every 2") || !strings.Contains(logs.String(), fmt.Sprintf("pid %d", os.Getpid())) {
		t.Errorf("set not logged with the peer:\n%s", logs)
	}
	// By GID, and a DMB by its token prefix as status shows it.
	if _, err := fault(t, dir, "fail-moves", "to=0xa", "dmb="+tokenPrefix(tok), "status=no_space", "count=1"); err != nil {
		t.Fatal(err)
	}
	if err := b.Move(tok, 0, 0, true, nil); err != abi.StatusNoSpace {
		t.Errorf("MOVE under fail-moves: %v", err)
	}
	for range 2 {
		if err := b.Move(tok, 0, 0, false, [][]byte{{1}}); err != nil {
			t.Errorf("MOVE after the count: %v", err)
		}
	}
	out, err = fault(t, dir, "list")
	if err != nil || !strings.Contains(out, "fail-moves to a dmb "+fmt.Sprintf("%#x", tok>>32)+" count 1 status no_space  1") {
		t.Errorf("list: %q, %v", out, err)
	}
	var st bytes.Buffer
	if err := runStatus([]string{"-socket-dir", dir}, &st, io.Discard); err != nil || !strings.Contains(st.String(), "FAULT INJECTION ON (2)") {
		t.Errorf("status: %v\n%s", err, st.String())
	}

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"drop-signals", "to=zz", "every=1"}, `unknown VM "zz" (known: a, b, c)`},
		{[]string{"drop-signals", "to=0x99", "every=1"}, "unknown VM"},
		{[]string{"drop-signals", "every=1"}, "which VM"},
		{[]string{"drop-signals", "to=a", "every=0"}, "every 0 out of range"},
		{[]string{"drop-signals", "to=a", "every=100000000"}, "out of range"},
		{[]string{"delay-signals", "to=a", "delay=soon"}, "want a duration"},
		{[]string{"delay-signals", "to=a", "delay=3h"}, "out of range"},
		{[]string{"fail-moves", "to=a", "status=ok"}, `status "ok"`},
		{[]string{"fail-moves", "to=a", "status=11"}, `status "11"`},
		{[]string{"fail-moves", "to=a", "status=busy", "dmb=ffffffffffffffff"}, "owns no DMB"},
		{[]string{"fail-moves", "to=a", "status=busy", "dmb=xyz"}, "want a token in hex"},
		{[]string{"fail-moves", "to=a", "status=busy", "index=6"}, "no DMB at index 6"},
		{[]string{"fail-moves", "from=b", "status=busy", "index=5"}, "only for fail-moves toward"},
		{[]string{"throttle", "vm=a", "rate=0"}, "rate 0 out of range"},
		{[]string{"revoke-dmb", "vm=a"}, "which DMB"},
		{[]string{"revoke-dmb", "vm=a", "index=2000"}, "out of range"},
		{[]string{"revoke-dmb", "vm=a", "index=7"}, "no DMB at index 7"},
		{[]string{"revoke-dmb", "vm=c", "index=5"}, "not connected"},
		{[]string{"gid-gone", "vm=c"}, "not connected"},
		{[]string{"explode", "vm=a"}, "unknown fault kind"},
		{[]string{"clear", "99"}, "no fault 99"},
		{[]string{"drop-signals", "to=a", "every=2", "rate=5"}, "drop-signals takes no rate"},
		{[]string{"throttle", "from=a", "rate=5"}, "throttle takes vm= (or to=), not from="},
		{[]string{"gid-gone", "vm=a", "index=5"}, "gid-gone takes no index"},
		{[]string{"revoke-dmb", "vm=a", "index=5", "status=busy"}, "revoke-dmb takes no status"},
	} {
		_, err := fault(t, dir, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%q: %v, want a one-line error with %q", c.args, err, c.want)
		}
	}
	if l := f.Faults(); len(l) != 2 {
		t.Errorf("refused requests changed the faults: %+v", l)
	}
	// A request without the fault field.
	c, err := net.Dial("unix", filepath.Join(dir, controlName))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte(`{"command":"fault"}` + "\n"))
	var ans controlAnswer
	if err := json.NewDecoder(c).Decode(&ans); err != nil || !strings.Contains(ans.Error, `no "fault" field`) {
		t.Errorf("fault without a request: %+v, %v", ans, err)
	}
	c.Close()

	out, err = fault(t, dir, "gid-gone", "vm=a")
	if err != nil || !strings.Contains(out, "sent to 1 peer(s)") {
		t.Errorf("gid-gone: %q, %v", out, err)
	}
	out, err = fault(t, dir, "revoke-dmb", "vm=a", "index=5")
	if err != nil || !strings.Contains(out, "DMB "+tokenPrefix(tok)+" revoked") {
		t.Errorf("revoke: %q, %v", out, err)
	}
	if err := b.Move(tok, 0, 0, false, nil); err != abi.StatusNoEntry {
		t.Errorf("MOVE into the revoked DMB: %v", err)
	}
	if s := a.Stats(); s.Faults[ism.FaultRevokeDMB] != 1 || s.Faults[ism.FaultGIDGone] != 1 || s.Faults[ism.FaultFailMoves] != 1 {
		t.Errorf("a's fault counters %v", s.Faults)
	}
	out, err = fault(t, dir, "clear", "1")
	if err != nil || !strings.Contains(out, "fault 1 cleared") {
		t.Errorf("clear 1: %q, %v", out, err)
	}
	out, err = fault(t, dir, "clear")
	if err != nil || !strings.Contains(out, "fault 2 cleared") || !strings.Contains(out, "no fault set") {
		t.Errorf("clear: %q, %v", out, err)
	}
	if f.FaultsOn() || !strings.Contains(logs.String(), "fault injection off") {
		t.Errorf("after clear: on %v, log:\n%s", f.FaultsOn(), logs)
	}
	if _, err := fault(t, t.TempDir(), "list"); err == nil || !strings.Contains(err.Error(), "no backend answers") {
		t.Errorf("without a backend: %v", err)
	}
}
