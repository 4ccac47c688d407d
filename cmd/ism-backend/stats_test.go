package main

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	fe "github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// TestStatsJSONFields: every ism.Stats field lands under its own name.
func TestStatsJSONFields(t *testing.T) {
	s := ism.Stats{Devices: 99, DMBs: 1, Registered: 2, Moves: 3, MoveBytes: 4, Signals: 5, SWEvents: 6, Interrupts: 7,
		Events: 8, Maps: 9, Unmaps: 10, AttachDMBs: 11, Attached: 12, MappedBytes: 13, AttachBytes: 14,
		SignalsRefusedPeer: 15, SignalsRefusedRate: 16, SignalsRefusedQueue: 17, SWEventsDropped: 18,
		DeviceEventsDropped: 19, DMBLimitRefused: 20, AttachLimitRefused: 21, MappedLimitRefused: 22,
		BadChains: 23, QueuesBroken: 24}
	for st := range s.Refused {
		s.Refused[st] = uint64(100 + st)
	}
	b, err := json.Marshal(toStatsJSON(s))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"dmbs": 1, "registered": 2, "moves": 3, "move_bytes": 4, "signals": 5, "sw_events": 6,
		"interrupts": 7, "events": 8, "maps": 9, "unmaps": 10, "attach_dmbs": 11, "attached": 12, "mapped_bytes": 13,
		"attach_bytes": 14, "signals_refused_peer": 15, "signals_refused_rate": 16, "signals_refused_queue": 17,
		"sw_events_dropped": 18, "device_events_dropped": 19, "dmb_limit_refused": 20, "attach_limit_refused": 21,
		"mapped_limit_refused": 22, "bad_chains": 23, "queues_broken": 24, "refused_total": float64(s.RefusedTotal())}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v (in %s)", k, m[k], v, b)
		}
	}
	if _, ok := m["devices"]; ok {
		t.Errorf("per-VM stats carry devices: %s", b)
	}
	if len(m) != len(want)+1 {
		t.Errorf("%d fields, want %d: %s", len(m), len(want)+1, b)
	}
	refused, _ := m["refused"].(map[string]any)
	if len(refused) != ism.NumStatus-1 {
		t.Fatalf("refused %v: want every status but ok", refused)
	}
	for st := 1; st < ism.NumStatus; st++ {
		if name := statusNames[st]; name == "" || refused[name] != float64(100+st) {
			t.Errorf("status %d (%v): name %q, count %v", st, abi.Status(st), name, refused[name])
		}
	}
}

// TestStatsFile runs the backend with -stats-file, connects VM a through a
// test front-end (so its device starts), and has SIGUSR1 write the file;
// then stops the backend, which writes it once more.
func TestStatsFile(t *testing.T) {
	dir, err := os.MkdirTemp("", "ismb-") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "stats.json")
	opts, err := parseFlags([]string{"-socket-dir", dir, "-vm", "a=0xa", "-vm", "b=0xb", "-vm-modes", "b=copy",
		"-stats-file", path, "-log-level", "error"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// SIGUSR1 to this process must never take its default action (exit),
	// also before run has subscribed to it.
	guard := make(chan os.Signal, 1)
	signal.Notify(guard, syscall.SIGUSR1)
	defer signal.Stop(guard)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- run(ctx, opts) }()

	deadline := time.Now().Add(20 * time.Second)
	sock := filepath.Join(dir, "a.sock")
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s", sock)
		}
		time.Sleep(10 * time.Millisecond)
	}
	mem, err := fe.NewGuestMemory(0, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	f, err := fe.Dial(sock, mem)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Handshake(fe.HandshakeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(fe.StartOptions{QueueSize: 256}); err != nil {
		t.Fatal(err)
	}

	// Signal until a write shows a's device started.
	var got statsFile
	var seq uint64
	for {
		if err := syscall.Kill(os.Getpid(), syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		got = waitStatsFile(t, path, seq, deadline)
		seq = got.Seq
		if len(got.VMs) > 0 && got.VMs[0].Connected {
			break
		}
	}
	if len(got.VMs) != 2 {
		t.Fatalf("vms %+v: want a and b", got.VMs)
	}
	a, b := got.VMs[0], got.VMs[1]
	if a.Name != "a" || a.GID != "0x000000000000000a" || a.Modes != "copy,attach" || !a.Connected {
		t.Errorf("a: %+v", a)
	}
	if b.Name != "b" || b.GID != "0x000000000000000b" || b.Modes != "copy" || b.Connected || b.Stats.Refused == nil {
		t.Errorf("b (configured, never connected): %+v", b)
	}
	if got.Total.Devices == nil || *got.Total.Devices != 1 || got.CHID != "0xff00" {
		t.Errorf("total %+v chid %s", got.Total, got.CHID)
	}
	if ts, err := time.Parse(time.RFC3339Nano, got.Time); err != nil || time.Since(ts) > time.Minute {
		t.Errorf("time %q: %v", got.Time, err)
	}

	// At exit: once more, a disconnected now.
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	last := waitStatsFile(t, path, seq, deadline)
	if last.Seq != seq+1 || len(last.VMs) != 2 || last.VMs[0].Connected || *last.Total.Devices != 0 {
		t.Errorf("at exit (seq %d before): %+v", seq, last)
	}
	if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("%s.tmp left behind: %v", path, err)
	}
}

// waitStatsFile waits for the stats file to hold a write after seq.
func waitStatsFile(t *testing.T, path string, seq uint64, deadline time.Time) statsFile {
	t.Helper()
	for {
		var s statsFile
		b, err := os.ReadFile(path)
		if err == nil {
			if err := json.Unmarshal(b, &s); err != nil {
				t.Fatalf("%s: %v\n%s", path, err, b) // written whole, never half
			}
			if s.Seq > seq {
				return s
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no stats write after seq %d (read: %v)", seq, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestStatsFileNoDir: a -stats-file in a directory that does not exist
// stops the backend at start, not at the first write.
func TestStatsFileNoDir(t *testing.T) {
	dir, err := os.MkdirTemp("", "ismb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	opts, err := parseFlags([]string{"-socket-dir", dir, "-vm", "a", "-stats-file", filepath.Join(dir, "nodir", "s.json")}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if err := run(context.Background(), opts); err == nil {
		t.Fatal("run accepted a stats file in a missing directory")
	}
}

type nopNotifier struct{}

func (nopNotifier) Interrupt()               {}
func (nopNotifier) PostEvent(abi.Event) bool { return true }

// TestLogStatsDrops: a VM refused a SIGNAL gets its own line in the
// statistics log; a VM with nothing to report does not.
func TestLogStatsDrops(t *testing.T) {
	log, hook := logtest.NewNullLogger()
	f := ism.NewFabric(abi.DefaultCHID, logrus.NewEntry(log))
	mem, err := ism.NewSliceMemory(ism.Region{GPA: 0, Data: make([]byte, 4096)})
	if err != nil {
		t.Fatal(err)
	}
	a, err := f.Connect("a", 0xA, mem, nopNotifier{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Connect("b", 0xB, mem, nopNotifier{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Signal(0xB, 1, 0); err != abi.StatusPermission {
		t.Fatalf("SIGNAL without a DMB: %v", err)
	}
	hook.Reset()
	logStats(log, f)
	var lines []string
	for _, e := range hook.AllEntries() {
		if e.Message == "event drops and refused SIGNALs" {
			lines = append(lines, e.Data["vm"].(string))
			if e.Data["signals_refused_peer"] != uint64(1) {
				t.Errorf("line %v", e.Data)
			}
		}
	}
	if len(lines) != 1 || lines[0] != "a" {
		t.Fatalf("drop lines for %v, want a only", lines)
	}
}
