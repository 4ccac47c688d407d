package vm

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// SMC-D over attach-mode DMBs: the receiver's DMB is host memory mapped into
// its shared-memory BAR and into the sender's, the sender writes data and
// CDC through its mapping and signals with zero-length MOVEs, so the backend
// copies no byte. The backend's -stats-file tells what it did.
//
// Guest agent contract these tests use (cmd/ism-agent, smcd-* scenarios):
// ism.modes=copy|attach|copy,attach limits what the guest driver uses
// (default: what the device offers); per connection i each side reports
// send_mode_<i> and recv_mode_<i> ("copy" or "attach"), and at the end
// attach_bytes (bytes this guest wrote through attachments) and
// attachments_left (attachments its driver still holds). Client mode
// stream-error streams until a write or read fails and reports
// stream_error_<i>; server mode sink-hold reports holding_<i>=1 after 1 MiB
// and reads until killed.

// statsArgs are the backend arguments for a stats file in r's directory.
func statsArgs(r *vmharness.Run) []string { return []string{"-stats-file", r.Path("stats.json")} }

// backendStats asks the backend for fresh statistics and returns VM name's.
func backendStats(t *testing.T, be *vmharness.Backend, name string) (vmharness.BackendStats, vmharness.VMStats) {
	t.Helper()
	s, err := be.Stats()
	if err != nil {
		t.Fatal(err)
	}
	vm, ok := s.VM(name)
	if !ok {
		t.Fatalf("backend statistics list no VM %q: %+v", name, s)
	}
	return s, vm
}

// resultValues returns every value the guest reported for key, in order (in
// smcd-local the client and the server report under the same keys).
func resultValues(vm *vmharness.VM, key string) []string {
	var out []string
	for _, l := range strings.Split(vm.Serial(), "\n") {
		l = strings.TrimRight(l, "\r")
		if i := strings.Index(l, "ISM-RESULT "+key+"="); i >= 0 {
			out = append(out, l[i+len("ISM-RESULT "+key+"="):])
		}
	}
	return out
}

// checkModes: every report of send_mode_<i> and recv_mode_<i> by the guest,
// for each connection, says send and recv; at least want reports of each.
func checkModes(t *testing.T, vm *vmharness.VM, conns, want int, send, recv string) {
	t.Helper()
	for i := range conns {
		for _, c := range []struct{ key, mode string }{{fmt.Sprintf("send_mode_%d", i), send}, {fmt.Sprintf("recv_mode_%d", i), recv}} {
			got := resultValues(vm, c.key)
			bad := len(got) < want
			for _, g := range got {
				bad = bad || g != c.mode
			}
			if bad {
				t.Errorf("%s: %s reported %q, want %d× %q", vm.Cfg.Name, c.key, got, want, c.mode)
			}
		}
	}
}

// resultUint is a guest's numeric result key; it fails the test if missing.
func resultUint(t *testing.T, name string, o vmharness.Outcome, key string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(o.Results[key], 10, 64)
	if err != nil {
		t.Fatalf("%s: result %s=%q: %v", name, key, o.Results[key], err)
	}
	return n
}

// checkNoAttachmentsLeft: the guest's driver holds no attachment at the end.
func checkNoAttachmentsLeft(t *testing.T, name string, o vmharness.Outcome) {
	t.Helper()
	if n := resultUint(t, name, o, "attachments_left"); n != 0 {
		t.Errorf("%s: %d attachments left after every connection closed", name, n)
	}
}

var attachCases = []smcCase{{conns: 1}, {conns: 32}}

// checkMetricsMatchStats scrapes the backend's /metrics between two fresh
// writes of its stats file and checks each named VM's counters: every
// scraped value lies between the two files' (a guest that is powering off
// meanwhile may still move the counters, never backwards).
func checkMetricsMatchStats(t *testing.T, be *vmharness.Backend, names ...string) {
	t.Helper()
	before, err := be.Stats()
	if err != nil {
		t.Fatal(err)
	}
	fams, err := be.Metrics()
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	after, err := be.Stats()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		b, ok1 := before.VM(name)
		a, ok2 := after.VM(name)
		if !ok1 || !ok2 {
			t.Fatalf("the stats file lists no VM %q", name)
		}
		labels := map[string]string{"vm": name, "gid": b.GID}
		for _, c := range []struct {
			metric    string
			low, high uint64
		}{
			{"ism_backend_vm_moves_total", b.Stats.Moves, a.Stats.Moves},
			{"ism_backend_vm_move_bytes_total", b.Stats.MoveBytes, a.Stats.MoveBytes},
			{"ism_backend_vm_shmem_maps_total", b.Stats.Maps, a.Stats.Maps},
			{"ism_backend_vm_shmem_unmaps_total", b.Stats.Unmaps, a.Stats.Unmaps},
			{"ism_backend_vm_events_total", b.Stats.Events, a.Stats.Events},
		} {
			got, ok := vmharness.MetricValue(fams, c.metric, labels)
			if !ok || got < float64(c.low) || got > float64(c.high) {
				t.Errorf("%s%v = %v (present %v); the stats file said %d, then %d", c.metric, labels, got, ok, c.low, c.high)
			}
		}
	}
}

// TestSMCDAttachInterVM: 64 MiB between two guests over attach-mode DMBs;
// every connection attaches on both sides, and the backend copied nothing.
func TestSMCDAttachInterVM(t *testing.T) {
	for _, c := range attachCases {
		t.Run(c.String(), func(t *testing.T) {
			r := vmharness.New(t)
			r.RequireBackend()
			be, a, b := smcPairOn(r, c.cpus, append(statsArgs(r), "-metrics-addr", "127.0.0.1:0"),
				c.args(map[string]string{}),
				c.args(map[string]string{"bytes": strconv.Itoa(smcBytes)}), 5*time.Minute)
			ob := b.RequireOK(0)
			oa := a.RequireOK(0)
			checkDigests(t, oa, ob, c.conns, true)
			checkModes(t, a, c.conns, 1, "attach", "attach")
			checkModes(t, b, c.conns, 1, "attach", "attach")
			if n := resultUint(t, "b", ob, "attach_bytes"); n < smcBytes {
				t.Errorf("client wrote %d bytes through attachments, want >= %d", n, smcBytes)
			}
			checkNoAttachmentsLeft(t, "a", oa)
			checkNoAttachmentsLeft(t, "b", ob)

			s, sa := backendStats(t, be, "a")
			sb, _ := s.VM("b")
			// Signals are zero-length MOVEs; data and CDC go through the mappings.
			if s.Total.MoveBytes != 0 {
				t.Errorf("the backend copied %d bytes (a %d, b %d), want 0 in attach mode",
					s.Total.MoveBytes, sa.Stats.MoveBytes, sb.Stats.MoveBytes)
			}
			if sa.Stats.Maps == 0 || sb.Stats.Maps == 0 {
				t.Errorf("shared-memory maps: a %d, b %d; want both > 0", sa.Stats.Maps, sb.Stats.Maps)
			}
			checkMetricsMatchStats(t, be, "a", "b")
			t.Logf("%d MiB over %d attach-mode SMC-D connection(s): client %ss (%s MB/s); backend: a %+v, b %+v",
				smcBytes>>20, c.conns, ob.Results["client_seconds"], ob.Results["client_mbytes_per_s"], sa.Stats, sb.Stats)
		})
	}
}

// TestSMCDAttachIntraVM: as TestSMCDAttachInterVM with server and client in
// one guest (the DMB's rgid is the device's own GID: the owner attaches its
// own DMB for the sending side).
func TestSMCDAttachIntraVM(t *testing.T) {
	for _, c := range attachCases {
		t.Run(c.String(), func(t *testing.T) {
			r := vmharness.New(t)
			r.RequireBackend()
			sock := r.Path("a.sock")
			be := r.StartBackend(append([]string{"-socket-dir", r.Dir, "-vm", "a"}, statsArgs(r)...), sock)
			a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smcd-local", Timeout: 5 * time.Minute, HugePages: 48,
				CPUs: c.cpus, Args: c.args(map[string]string{"bytes": strconv.Itoa(smcBytes)}),
				ISM: []vmharness.ISMDevice{{Socket: sock}}})
			o := a.RequireOK(0)
			checkDigests(t, o, o, c.conns, true)
			checkModes(t, a, c.conns, 2, "attach", "attach") // client and server
			if n := resultUint(t, "a", o, "attach_bytes"); n < smcBytes {
				t.Errorf("the guest wrote %d bytes through attachments, want >= %d", n, smcBytes)
			}
			checkNoAttachmentsLeft(t, "a", o)

			s, sa := backendStats(t, be, "a")
			if s.Total.MoveBytes != 0 || sa.Stats.Maps == 0 {
				t.Errorf("backend: copied %d bytes (want 0), %d maps (want > 0): %+v", s.Total.MoveBytes, sa.Stats.Maps, sa.Stats)
			}
			t.Logf("%d MiB over %d attach-mode SMC-D connection(s) inside one guest: %ss; backend: %+v",
				smcBytes>>20, c.conns, o.Results["client_seconds"], sa.Stats)
		})
	}
}

// TestSMCDMixedModes: the client (b) uses copy mode only, because its
// device offers nothing else (-vm-modes b=copy) or because its driver is
// told so (ism.modes=copy). The server's DMB is attach-mode and the client
// MOVEs into it; the client's DMB is copy-mode, so the server cannot attach
// it and MOVEs too. The data arrives, and the backend copied it.
func TestSMCDMixedModes(t *testing.T) {
	for _, how := range []string{"device", "driver"} {
		t.Run(how, func(t *testing.T) {
			r := vmharness.New(t)
			r.RequireBackend()
			backendArgs := statsArgs(r)
			clientArgs := map[string]string{"bytes": strconv.Itoa(smcBytes)}
			wantModes := "copy,attach"
			if how == "device" {
				backendArgs = append(backendArgs, "-vm-modes", "b=copy")
				wantModes = "copy"
			} else {
				clientArgs["modes"] = "copy"
			}
			be, a, b := smcPairOn(r, 1, backendArgs, map[string]string{}, clientArgs, 5*time.Minute)
			ob := b.RequireOK(0)
			oa := a.RequireOK(0)
			checkDigests(t, oa, ob, 1, true)
			checkModes(t, b, 1, 1, "copy", "copy")
			checkModes(t, a, 1, 1, "copy", "attach")
			for _, o := range []struct {
				name string
				o    vmharness.Outcome
			}{{"a", oa}, {"b", ob}} {
				if n := resultUint(t, o.name, o.o, "attach_bytes"); n != 0 {
					t.Errorf("%s wrote %d bytes through attachments, want 0: nothing could be attached", o.name, n)
				}
				checkNoAttachmentsLeft(t, o.name, o.o)
			}

			_, sb := backendStats(t, be, "b")
			if sb.Modes != wantModes {
				t.Errorf("b's device offers %q, want %q", sb.Modes, wantModes)
			}
			if sb.Stats.MoveBytes < smcBytes {
				t.Errorf("the backend copied %d bytes for the copy-only client, want >= %d", sb.Stats.MoveBytes, smcBytes)
			}
			t.Logf("%d MiB from a copy-only client into an attach-mode DMB: client %ss; backend b: %+v",
				smcBytes>>20, ob.Results["client_seconds"], sb.Stats)
		})
	}
}

// TestSMCDAttachReceiverKilled: the client (b) writes into the server's (a)
// DMB through its attachment when a's QEMU is killed. The backend drops
// b's mapping with a's device; b's next write or read fails, b ends
// cleanly holding no attachment, and the backend keeps serving.
func TestSMCDAttachReceiverKilled(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	be, a, b := smcPairOn(r, 1, statsArgs(r), map[string]string{"mode": "sink-hold"},
		map[string]string{"mode": "stream-error"}, 5*time.Minute)
	if err := a.WaitSerial("ISM-RESULT holding_0=1", 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	s, sb := backendStats(t, be, "b")
	if sa, _ := s.VM("a"); !sb.Connected || sb.Stats.Attached < 1 || sa.Stats.AttachDMBs < 1 {
		t.Fatalf("while streaming: b %+v, a %+v; want b to have attached a's DMB", sb, sa)
	}

	killed := time.Now()
	a.Kill()
	// The backend's side: a's device gone, b's attachment of its DMB with it.
	limit := r.Scaled(30 * time.Second)
	deadline := time.Now().Add(limit)
	for {
		s, sb = backendStats(t, be, "b")
		sa, _ := s.VM("a")
		if !sa.Connected && sa.Stats.MappedBytes == 0 && sb.Stats.Attached == 0 {
			t.Logf("backend dropped a (b connected: %v) %.1fs after the kill", sb.Connected, time.Since(killed).Seconds())
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v after a was killed: a %+v, b %+v", limit, sa, sb)
		}
		time.Sleep(50 * time.Millisecond)
	}

	ob := b.RequireOK(0)
	if ob.Results["stream_error_0"] == "" {
		t.Errorf("client b reported no stream error: %v", ob.Results)
	}
	checkNoAttachmentsLeft(t, "b", ob)
	t.Logf("client saw %q %.1fs after the server VM was killed", ob.Results["stream_error_0"], time.Since(killed).Seconds())

	s, sb = backendStats(t, be, "b")
	sa, _ := s.VM("a")
	if sb.Stats.Attached != 0 || sa.Connected || sa.Stats.MappedBytes != 0 {
		t.Errorf("after the client ended: b %+v, a %+v", sb, sa)
	}
}
