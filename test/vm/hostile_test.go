package vm

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// hostileKinds are the malformed request chains the hostile scenario posts
// (cmd/ism-agent/scenario_hostile.go): each must come back with nothing
// written.
var hostileKinds = []string{"header_outside_ram", "data_outside_ram", "loop", "indirect_too_long", "indirect_nested",
	"no_response_room", "readable_after_writable", "address_wraps", "lengths_overflow"}

// hostileSignalRate and hostileSignalBurst are the backend's SIGNAL limits
// in TestHostileGuestBesideTransfer: low, so that every flood of the
// hostile guest (2×256 SIGNALs at once) spends the burst however slowly
// its emulated CPU runs, and BUSY must show.
const (
	hostileSignalRate  = "1000"
	hostileSignalBurst = "100"
)

// hostileKernelArgs: the guests boot beside a guest that keeps a core busy.
// A first run had b's kernel fail its IO-APIC timer check ("MP-BIOS bug:
// 8254 timer not connected to IO-APIC": the emulated CPU was too slow for
// the check's window) and then print nothing from user space; the check
// proves nothing about a VM's timer.
var hostileKernelArgs = []string{"no_timer_check"}

// TestHostileGuestBesideTransfer: guest c attacks the device below the
// driver (malformed chains, forged tokens, SIGNAL floods at a's and b's
// GIDs, avail idx jumps and resets) for the whole life of a 64 MiB SMC-D
// transfer from b to a, in attach mode and in copy mode. The transfer's
// SHA-256 matches over SMC-D; then b's VM is killed while c goes on, and a
// still gets the peer-gone event (its open connection fails with the
// device's GID event, not a timeout). c's answers and the backend's
// counters show each attack refused, and the backend still serves c's own
// valid requests at the end.
func TestHostileGuestBesideTransfer(t *testing.T) {
	for _, mode := range []string{"attach", "copy"} {
		t.Run(mode, func(t *testing.T) { hostileBesideTransfer(t, mode) })
	}
}

func hostileBesideTransfer(t *testing.T, mode string) {
	// The transfer's DMBs in mode; the SMC-D scenarios default to attach.
	withMode := func(m map[string]string) map[string]string {
		if mode == "copy" {
			m["modes"] = "copy"
		}
		return m
	}
	r := vmharness.New(t)
	r.RequireBackend()
	sa, sb, sc := r.Path("a.sock"), r.Path("b.sock"), r.Path("c.sock")
	be := r.StartBackend(append([]string{"-socket-dir", r.Dir, "-vm", "a=" + gidA, "-vm", "b=" + gidB, "-vm", "c=" + gidC,
		"-signal-rate", hostileSignalRate, "-signal-burst", hostileSignalBurst}, statsArgs(r)...), sa, sb, sc)

	c := r.StartVM(vmharness.VMConfig{Name: "c", Scenario: "hostile", Timeout: 10 * time.Minute, Control: true,
		Append: hostileKernelArgs, Args: map[string]string{"victims": gidA + "," + gidB}, ISM: []vmharness.ISMDevice{{Socket: sc}}})
	if _, err := c.WaitResult("flooding", 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	started := time.Now()

	srv, cli := r.NetPair()
	bytes := strconv.Itoa(smcBytes)
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smcd-server", Net: &srv, Timeout: 6 * time.Minute, HugePages: 32, Append: hostileKernelArgs,
		Args: withMode(map[string]string{"ip": "169.254.7.1/24", "mode": "sink-gone", "bytes": bytes}),
		ISM:  []vmharness.ISMDevice{{Socket: sa}}})
	b := r.StartVM(vmharness.VMConfig{Name: "b", Scenario: "smcd-client", Net: &cli, Timeout: 6 * time.Minute, HugePages: 32, Append: hostileKernelArgs,
		Args: withMode(map[string]string{"ip": "169.254.7.2/24", "connect": "169.254.7.1:7000", "mode": "send-hold", "bytes": bytes}),
		ISM:  []vmharness.ISMDevice{{Socket: sb}}})
	if _, err := b.WaitResult("sent_0", 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WaitResult("waiting_gone_0", time.Minute); err != nil {
		t.Fatal(err)
	}
	t.Logf("64 MiB over SMC-D beside the hostile guest in %.1fs", time.Since(started).Seconds())
	checkDigests(t, a.Outcome(), b.Outcome(), 1, true)
	if smc := b.Outcome().Results["client_smc_0"]; smc != "true" {
		t.Errorf("client smc=%q, want true", smc)
	}
	checkModes(t, b, 1, 1, mode, mode)
	if o := c.Outcome(); o.Ended {
		t.Fatalf("the hostile guest ended before the transfer did: %+v", o)
	}
	_, before := backendStats(t, be, "c")

	killed := time.Now()
	b.Kill()
	// The event comes at once (under a second in the runs so far); the
	// bound is for a run where it is lost and a would wait for ever.
	if _, err := a.WaitResult("peer_gone_0", time.Minute); err != nil {
		t.Fatalf("a did not learn that b's VM was killed: %v", err)
	}
	oa := a.RequireOK(0)
	gone := oa.Results["peer_gone_0"]
	// Without the event, a learns it from TCP much later (150 s in a run
	// with the backend's GID events turned off): "peer vanished (TCP
	// connection closed without CDC close)". The error says which.
	if !strings.Contains(gone, "ISM device went away") {
		t.Errorf("a's connection ended with %q, want the peer-gone event's error", gone)
	}
	t.Logf("a learnt b was gone %.1fs after the kill: %s", time.Since(killed).Seconds(), gone)

	// c attacked across the kill (it stops only when told): its refusals
	// and bad chains go on growing after a's verdict.
	deadline := time.Now().Add(r.Scaled(time.Minute))
	for {
		_, after := backendStats(t, be, "c")
		if after.Stats.RefusedTotal > before.Stats.RefusedTotal && after.Stats.BadChains > before.Stats.BadChains {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("c stopped attacking: refused %d -> %d, bad chains %d -> %d", before.Stats.RefusedTotal,
				after.Stats.RefusedTotal, before.Stats.BadChains, after.Stats.BadChains)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := c.Send("stop"); err != nil {
		t.Fatal(err)
	}
	oc := c.RequireOK(0)
	res := oc.Results
	count := func(key string) uint64 {
		n, _ := strconv.ParseUint(res[key], 10, 64)
		return n
	}
	if res["still_served"] != "1" {
		t.Errorf("c's own valid requests after the attack: still_served=%q", res["still_served"])
	}
	for _, want := range []string{"signal_norel.PERMISSION", "signal_rel.OK", "signal_rel.BUSY", "forged.NOENTRY", "malformed.header_lies.INVALID"} {
		if count(want) == 0 {
			t.Errorf("c got no %s", want)
		}
	}
	for k := range res {
		for _, p := range []string{"signal_norel.", "signal_rel.", "forged.", "malformed."} {
			if !strings.HasPrefix(k, p) {
				continue
			}
			st := k[strings.LastIndexByte(k, '.')+1:]
			switch {
			case p == "signal_norel." && st != "PERMISSION" && st != "NOENTRY",
				p == "signal_rel." && st != "OK" && st != "BUSY" && st != "NOSPACE" && st != "NOENTRY",
				p == "forged." && st != "NOENTRY" && st != "PERMISSION",
				p == "malformed." && !strings.HasPrefix(k, "malformed.header_lies.") && st != "rejected",
				k == "malformed.header_lies."+st && st != "INVALID":
				t.Errorf("c: %s=%s", k, res[k])
			}
		}
	}
	rounds := count("rounds")
	for _, k := range hostileKinds {
		if n := count("malformed." + k + ".rejected"); n != rounds {
			t.Errorf("malformed chain %s rejected %d times in %d rounds", k, n, rounds)
		}
	}
	if count("avail_jumps") == 0 || count("resets") < count("avail_jumps") {
		t.Errorf("c: %s avail idx jumps, %s resets", res["avail_jumps"], res["resets"])
	}

	// The backend's side: each attack counted against c, nothing of it
	// against a or b, and no device event lost.
	s, sc2 := backendStats(t, be, "c")
	st := sc2.Stats
	if rejected := rounds * uint64(len(hostileKinds)); st.BadChains < rejected {
		t.Errorf("backend counted %d bad chains of c, c had %d rejected", st.BadChains, rejected)
	}
	if st.QueuesBroken == 0 {
		t.Errorf("backend saw none of c's %s avail idx jumps", res["avail_jumps"])
	}
	if st.SignalsRefusedPeer == 0 || st.SignalsRefusedRate == 0 || st.Refused["no_entry"] == 0 {
		t.Errorf("backend's refusals of c: %+v", st)
	}
	// What got through is within the limit, however long c flooded: at
	// most the burst plus the rate for every second since c's QEMU began.
	rate, _ := strconv.ParseFloat(hostileSignalRate, 64)
	burst, _ := strconv.ParseFloat(hostileSignalBurst, 64)
	if limit := burst + rate*time.Since(c.Started).Seconds(); float64(st.SWEvents) > limit {
		t.Errorf("c's SIGNALs reached its victims %d times, over the limit's %.0f", st.SWEvents, limit)
	}
	if st.SignalsRefusedRate < count("signal_rel.BUSY") {
		t.Errorf("c got %d BUSY, the backend counted %d refused for the rate", count("signal_rel.BUSY"), st.SignalsRefusedRate)
	}
	for _, name := range []string{"a", "b"} {
		v, _ := s.VM(name)
		if v.Stats.BadChains != 0 || v.Stats.QueuesBroken != 0 || v.Stats.DeviceEventsDropped != 0 {
			t.Errorf("%s: %+v", name, v.Stats)
		}
		t.Logf("%s: %d SIGNAL events of c dropped for room (its queue's share), %d events", name, v.Stats.SWEventsDropped, v.Stats.Events)
	}
	if exited, err := be.Exited(); exited {
		t.Fatalf("backend exited: %v", err)
	}
	t.Logf("c: %s rounds, %s SIGNALs at %s/s, %s jumps; backend: %+v", res["rounds"], res["signals_sent"], res["signals_per_s"],
		res["avail_jumps"], st)
}
