package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

// golden compares got with testdata/name (rewritten with -update).
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (go test -run %s -update rewrites it):\n got:\n%s\nwant:\n%s", path, t.Name(), got, want)
	}
}

// sampleStatus is a status with a connected and a gone VM, a copy-mode and
// an attach-mode DMB, and some counters.
func sampleStatus() *statusJSON {
	return &statusJSON{
		Time: "2026-12-02T06:00:00Z", CHID: "0xff00",
		Devices: []deviceJSON{
			{VM: "vm1", GID: "0x000000000000000a", Connected: true, Since: "2026-12-02T05:59:00Z", Modes: "copy,attach"},
			{VM: "vm2", GID: "0x000000000000000b", Connected: false, Modes: "copy"},
		},
		DMBs: []dmbJSON{
			{Owner: "vm1", OwnerGID: "0x000000000000000a", Index: 3, TokenPrefix: "1234abcd…", RGID: "0x000000000000000b", Size: 65536, Mode: "attach", AttachedBy: []string{"0x000000000000000b"}},
			{Owner: "vm1", OwnerGID: "0x000000000000000a", Index: 7, TokenPrefix: "00ff00ff…", RGID: "0x000000000000000a", Size: 1048576, Mode: "copy", AttachedBy: []string{}},
		},
		VMs: []vmStatsJSON{
			{Name: "vm1", GID: "0x000000000000000a", Modes: "copy,attach", Connected: true, Stats: statsJSON{DMBs: 2, Moves: 10, MoveBytes: 640, Signals: 4, Events: 2, Maps: 1, RefusedTotal: 1}},
			{Name: "vm2", GID: "0x000000000000000b", Modes: "copy", Stats: statsJSON{Moves: 5, MoveBytes: 5000, SWEvents: 1, SWEventsDropped: 2,
				Faults: map[string]uint64{"drop-signals": 3}}},
		},
		Faults: []faultJSON{{ID: 1, Fault: "drop-signals to vm2 every 3", Kind: "drop-signals", VM: "vm2",
			Since: "2026-12-02T05:59:30Z", By: "pid 4242 uid 0", Injected: 3}},
		Total: statsJSON{DMBs: 2, Moves: 15, MoveBytes: 5640, Signals: 4, SWEvents: 1, Events: 2, Maps: 1, RefusedTotal: 1, SWEventsDropped: 2},
	}
}

func TestWriteStatusGolden(t *testing.T) {
	var b bytes.Buffer
	if err := writeStatus(&b, sampleStatus()); err != nil {
		t.Fatal(err)
	}
	golden(t, "status.golden", b.Bytes())
	js, err := json.MarshalIndent(sampleStatus(), "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "status.json.golden", append(js, '\n'))
}

// TestControlStatus: the control socket answers status with the fabric as
// it is, shows token prefixes only, refuses what it does not know; the
// status command prints it.
func TestControlStatus(t *testing.T) {
	log := logrus.New()
	log.SetOutput(io.Discard)
	f := ism.NewFabric(abi.DefaultCHID, logrus.NewEntry(log))
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
	a := connect("a", 0xA)
	b := connect("b", 0xB)
	tok, err := a.RegisterDMB(0x10000, 4096, 0xB, 5)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Move(tok, 0, 0, false, [][]byte{make([]byte, 100)}); err != nil {
		t.Fatal(err)
	}
	opts, err := parseFlags([]string{"-vm", "a=0xa", "-vm", "b=0xb", "-vm", "c=0xc"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ln, err := listenControl(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, controlName)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v, mode %v", err, fi.Mode())
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go serveControl(ctx, ln, f, opts, log)

	ans, err := askControl(dir, "status", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s := ans.Status
	if len(s.Devices) != 3 || !s.Devices[0].Connected || s.Devices[0].Since == "" || s.Devices[2].Connected || s.Devices[2].Since != "" {
		t.Errorf("devices %+v", s.Devices)
	}
	if len(s.DMBs) != 1 {
		t.Fatalf("dmbs %+v", s.DMBs)
	}
	d := s.DMBs[0]
	if d.Owner != "a" || d.Index != 5 || d.RGID != "0x000000000000000b" || d.Size != 4096 || d.Mode != "copy" ||
		d.TokenPrefix != tokenPrefix(tok) || len(strings.TrimSuffix(d.TokenPrefix, "…")) != 8 {
		t.Errorf("dmb %+v (token %#x)", d, tok)
	}
	if s.VMs[1].Name != "b" || s.VMs[1].Stats.Moves != 1 || s.VMs[1].Stats.MoveBytes != 100 || s.Total.Moves != 1 {
		t.Errorf("counters %+v, total %+v", s.VMs, s.Total)
	}

	if _, err := askControl(dir, "reboot", 10*time.Second); err == nil || !strings.Contains(err.Error(), "unknown command") {
		t.Errorf("unknown command: %v", err)
	}
	c, err := net.Dial("unix", filepath.Join(dir, controlName))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("status\n"))
	var bad controlAnswer
	if err := json.NewDecoder(c).Decode(&bad); err != nil || bad.Error == "" || bad.Status != nil {
		t.Errorf("non-JSON request: %+v, %v", bad, err)
	}
	c.Close()

	var out bytes.Buffer
	if err := runStatus([]string{"-socket-dir", dir}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Devices (CHID 0xff00", tokenPrefix(tok), "(total)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
	if err := runStatus([]string{"-socket-dir", t.TempDir(), "-timeout", "1s"}, io.Discard, io.Discard); err == nil || strings.Contains(err.Error(), "\n") {
		t.Errorf("status without a backend: %v", err)
	}
}
