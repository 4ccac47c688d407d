package vm

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// The backend as an operator drives it while guests run: VMs added and
// removed at runtime (ism-backend add-vm / remove-vm), the status command
// during a transfer, and the guest stack's smcss-like listing
// (cmd/ism-agent/smcd_debug.go) read from the running guest.

// TestVMAddedAtRuntime, in copy mode and with attach mode offered: the
// backend starts with VMs a and b; c is added
// while it runs, its guest boots on the new socket and sends 16 MiB over
// SMC-D to a's guest (SHA-256 matched); then c is removed while its
// connection is open, and a's stack gets the GID-gone event (its
// connection fails with the device's error, not a timeout). The backend
// is never restarted.
func TestVMAddedAtRuntime(t *testing.T) {
	for _, modes := range []string{"copy", "copy,attach"} {
		t.Run(modes, func(t *testing.T) { testVMAddedAtRuntime(t, modes) })
	}
}

func testVMAddedAtRuntime(t *testing.T, modes string) {
	r := vmharness.New(t)
	r.RequireBackend()
	sa, sb := r.Path("a.sock"), r.Path("b.sock")
	be := r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a=" + gidA, "-vm", "b=" + gidB, "-modes", modes}, sa, sb)
	sc, err := be.AddVM("c=" + gidC)
	if err != nil {
		t.Fatal(err)
	}
	st, err := be.Status()
	if err != nil {
		t.Fatal(err)
	}
	if d, ok := st.Device("c"); !ok || d.GID != gidC || d.Connected || len(st.Devices) != 3 {
		t.Fatalf("status after add-vm: %+v", st.Devices)
	}

	srv, cli := r.NetPair()
	bytes := strconv.Itoa(16 << 20)
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smcd-server", Net: &srv, Timeout: 5 * time.Minute, HugePages: 32,
		Args: map[string]string{"ip": "169.254.7.1/24", "mode": "sink-gone", "bytes": bytes},
		ISM:  []vmharness.ISMDevice{{Socket: sa}}})
	c := r.StartVM(vmharness.VMConfig{Name: "c", Scenario: "smcd-client", Net: &cli, Timeout: 5 * time.Minute, HugePages: 32,
		Args: map[string]string{"ip": "169.254.7.2/24", "connect": "169.254.7.1:7000", "mode": "send-hold", "bytes": bytes},
		ISM:  []vmharness.ISMDevice{{Socket: sc}}})
	if _, err := c.WaitResult("sent_0", 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WaitResult("waiting_gone_0", time.Minute); err != nil {
		t.Fatal(err)
	}
	checkDigests(t, a.Outcome(), c.Outcome(), 1, true)
	if gid := c.Outcome().Results["gid"]; !sameGID(gid, gidC) {
		t.Errorf("c's guest has GID %s, want %s", gid, gidC)
	}

	st, err = be.Status()
	if err != nil {
		t.Fatal(err)
	}
	dc, _ := st.Device("c")
	sc2, _ := st.VM("c")
	if !dc.Connected || sc2.Stats.Moves == 0 || !hasDMB(st, "a", gidC) || !hasDMB(st, "c", gidA) {
		t.Fatalf("status while c holds its connection: devices %+v, DMBs %+v, c %+v", st.Devices, st.DMBs, sc2.Stats)
	}

	removed := time.Now()
	if err := be.RemoveVM("c"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WaitResult("peer_gone_0", time.Minute); err != nil {
		t.Fatalf("a did not learn that c was removed: %v", err)
	}
	oa := a.RequireOK(0)
	gone := oa.Results["peer_gone_0"]
	if !strings.Contains(gone, "ISM device went away") {
		t.Errorf("a's connection ended with %q, want the GID-gone event's error", gone)
	}
	t.Logf("a learnt c was removed %.1fs after remove-vm: %s", time.Since(removed).Seconds(), gone)

	st, err = be.Status()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := st.Device("c"); ok || len(st.Devices) != 2 || hasDMB(st, "c", "") {
		t.Errorf("status after remove-vm: devices %+v, DMBs %+v", st.Devices, st.DMBs)
	}
	if exited, err := be.Exited(); exited {
		t.Fatalf("the backend exited: %v", err)
	}
	// What c's QEMU does when its back-end closes the connection: it
	// stays up (no reconnect-ms), and its guest's requests go unanswered.
	qs, qerr := c.Status()
	out, _ := os.ReadFile(c.LogPath)
	t.Logf("c's QEMU after remove-vm: exited %v, status %q (%v); its output:\n%s", c.Exited(), qs, qerr, out)
}

// hasDMB: st lists a DMB owned by owner whose rgid is rgid ("" = any).
func hasDMB(st vmharness.Status, owner, rgid string) bool {
	for _, d := range st.DMBs {
		if d.Owner == owner && (rgid == "" || d.RGID == rgid) {
			return true
		}
	}
	return false
}

// TestStatusDuringSMCD: while b's guest streams to a's over SMC-D (copy
// mode), the harness runs `ism-backend status -json` between two readings
// of the stack's own listing, which b's guest fetches from its debug
// endpoint: both devices connected, a DMB each way between the two GIDs
// with the tokens the stack uses, and b's MOVE bytes between what the
// stack had sent at the first reading and what it had sent at the second
// (plus at most one chunk in flight and the CDC messages); the listing
// shows the connection's addresses, GIDs and mode, and its bytes grow.
func TestStatusDuringSMCD(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	sa, sb := r.Path("a.sock"), r.Path("b.sock")
	be := r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a=" + gidA, "-vm", "b=" + gidB, "-modes", "copy"}, sa, sb)
	srv, cli := r.NetPair()
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smcd-server", Net: &srv, Timeout: 5 * time.Minute, HugePages: 32,
		Args: map[string]string{"ip": "169.254.7.1/24", "mode": "sink-hold"},
		ISM:  []vmharness.ISMDevice{{Socket: sa}}})
	b := r.StartVM(vmharness.VMConfig{Name: "b", Scenario: "smcd-client", Net: &cli, Timeout: 5 * time.Minute, HugePages: 32, Control: true,
		Args: map[string]string{"ip": "169.254.7.2/24", "connect": "169.254.7.1:7000", "mode": "stream",
			"debug_addr": "127.0.0.1:7070", "debug_list": "1"},
		ISM: []vmharness.ISMDevice{{Socket: sb}}})
	if _, err := b.WaitResult("debug_list_ready", 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := b.WaitResult("streaming_0", 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	k := 0
	list := func() map[string]string {
		t.Helper()
		k++
		if err := b.Send("list"); err != nil {
			t.Fatal(err)
		}
		n, err := b.WaitResult(fmt.Sprintf("smcss_%d", k), time.Minute)
		if err != nil || n != "1" {
			t.Fatalf("reading %d: %q connections (%v; error %q)", k, n, err, b.Outcome().Results[fmt.Sprintf("smcss_%d_error", k)])
		}
		return fields(b.Outcome().Results[fmt.Sprintf("smcss_%d_0", k)])
	}
	r1 := list()
	st, err := be.Status()
	if err != nil {
		t.Fatal(err)
	}
	r2 := list()
	deadline := time.Now().Add(r.Scaled(2 * time.Minute))
	for num(t, r2, "sent") <= num(t, r1, "sent") {
		if time.Now().After(deadline) {
			t.Fatalf("the listing's bytes stay at %s (reading 1) .. %s (reading %d)", r1["sent"], r2["sent"], k)
		}
		r2 = list()
	}
	t.Logf("reading 1: %v", r1)
	t.Logf("reading %d: %v", k, r2)

	// The listing: the stack's view of its one connection.
	for _, l := range []map[string]string{r1, r2} {
		if !strings.HasPrefix(l["local"], "169.254.7.2:") || l["remote"] != "169.254.7.1:7000" || l["smc"] != "true" ||
			l["mode"] != "copy/copy" || !sameGID(l["lgid"], gidB) || !sameGID(l["pgid"], gidA) || l["fallback"] != "-" {
			t.Errorf("listing %v: want b's SMC-D connection to a in copy mode", l)
		}
	}

	// The status: what the backend sees of the same connection.
	for _, name := range []string{"a", "b"} {
		if d, ok := st.Device(name); !ok || !d.Connected || d.Modes != "copy" || d.Since == "" {
			t.Errorf("status: device %s %+v", name, d)
		}
	}
	if !hasDMBToken(st, "a", gidB, r1["ptoken"]) || !hasDMBToken(st, "b", gidA, r1["ltoken"]) {
		t.Errorf("status DMBs %+v; the stack uses a's %s… and b's %s…", st.DMBs, r1["ptoken"], r1["ltoken"])
	}
	vb, _ := st.VM("b")
	s1, s2 := num(t, r1, "sent"), num(t, r2, "sent")
	// A chunk is MOVEd before the stack counts it sent, and each chunk is
	// followed by a CDC MOVE of 32 bytes (guestdriver/smcd/conn.go).
	high := s2 + num(t, r1, "pdmb") + 32*vb.Stats.Moves
	if vb.Stats.MoveBytes < s1 || vb.Stats.MoveBytes > high || vb.Stats.Moves == 0 {
		t.Errorf("b's MOVE bytes %d (%d MOVEs): the stack had sent %d before the status, %d after (bound %d)",
			vb.Stats.MoveBytes, vb.Stats.Moves, s1, s2, high)
	}
	t.Logf("status between the readings: b MOVEd %d bytes in %d MOVEs; the stack had sent %d, then %d", vb.Stats.MoveBytes, vb.Stats.Moves, s1, s2)
	if o := a.Outcome(); o.Ended {
		t.Fatalf("a ended during the transfer: %+v", o)
	}
}

// fields parses "k=v k=v ..." (a listing's reading).
func fields(s string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(s) {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}

func num(t *testing.T, m map[string]string, key string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(m[key], 10, 64)
	if err != nil {
		t.Fatalf("%s=%q in %v: %v", key, m[key], m, err)
	}
	return n
}

// sameGID compares two GIDs in any of Go's integer notations.
func sameGID(a, b string) bool {
	x, err1 := strconv.ParseUint(a, 0, 64)
	y, err2 := strconv.ParseUint(b, 0, 64)
	return err1 == nil && err2 == nil && x == y
}

// hasDMBToken: st lists a DMB of owner for rgid whose token starts with
// prefix (8 hex digits).
func hasDMBToken(st vmharness.Status, owner, rgid, prefix string) bool {
	for _, d := range st.DMBs {
		if d.Owner == owner && sameGID(d.RGID, rgid) && prefix != "" && strings.TrimSuffix(d.TokenPrefix, "…") == prefix {
			return true
		}
	}
	return false
}
