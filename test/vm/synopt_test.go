package vm

import (
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// TestSMCDOptionPlainPeers: with the SMC TCP option program (BPF, in the
// guest's cgroup), our Dial to plain Go TCP servers (one speaks first, one
// waits) and plain Go clients (one speaks first with 5 bytes, one waits) to
// our Listener are plain TCP at once, byte-exact both ways. No CLC byte is
// sent and nothing waits for one: the handshake timeout is the watchdog
// (ism.clc_timeout's default), so a connection that waited on CLC would
// fail the run, and the fallback reason "peer did not offer SMC" comes only
// from the option's per-connection record. Our Dial to our Listener still
// negotiates SMC-D, the option seen both ways.
func TestSMCDOptionPlainPeers(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	sock := r.Path("a.sock")
	r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a"}, sock)
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smcd-plain", Timeout: 4 * time.Minute, HugePages: 32,
		ISM: []vmharness.ISMDevice{{Socket: sock}}})
	o := a.RequireOK(0)
	res := o.Results
	if res["synopt"] != "option" {
		t.Fatalf("the option program did not load in the guest: synopt=%q", res["synopt"])
	}
	want := map[string]string{
		// our Dial: our SYN had the option, the plain server's SYN-ACK not
		"dial_speaks_record_client": "sent=true peer=false",
		"dial_waits_record_client":  "sent=true peer=false",
		// our Listener: the plain client's SYN had none (the program's
		// record and the Go parse of the saved SYN agree)
		"plain_speaks_record_server": "sent=false peer=false saved-syn-option=false",
		"plain_waits_record_server":  "sent=false peer=false saved-syn-option=false",
		// both ours: the option in SYN and SYN-ACK
		"both_record_client": "sent=true peer=true",
		"both_record_server": "sent=false peer=true saved-syn-option=true",
		"both_reason":        "smc",
	}
	for _, c := range []string{"dial_speaks", "dial_waits", "plain_speaks", "plain_waits", "both"} {
		if res[c] != "ok" {
			t.Errorf("%s: not ok (results %v)", c, res)
		}
		if c != "both" && !strings.Contains(res[c+"_reason"], "peer did not offer SMC") {
			t.Errorf("%s: fallback reason %q, want the option's \"peer did not offer SMC\"", c, res[c+"_reason"])
		}
	}
	for k, v := range want {
		if res[k] != v {
			t.Errorf("%s = %q, want %q", k, res[k], v)
		}
	}
	for _, k := range []string{"dial_speaks", "dial_waits", "plain_speaks", "plain_waits", "both"} {
		t.Logf("%s: %s; records: client %q, server %q", k, res[k+"_reason"], res[k+"_record_client"], res[k+"_record_server"])
	}
}

// TestSMCKernelInterop: Linux's own SMC (smc.ko, AF_SMC sockets) and our
// stack meet in one guest, both directions. The option is seen both ways
// (our BPF record: the kernel's SYN had it and the kernel client went on to
// CLC, which it does only when our SYN-ACK echoed it; the kernel server's
// SYN-ACK echoed ours), CLC is exchanged, the kernel declines (it has no SMC
// device to use with our GID: as a client it declines instead of proposing,
// as a server it declines our Proposal), and both ends fall back to TCP on
// the same connection with the streams intact.
func TestSMCKernelInterop(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	sock := r.Path("a.sock")
	r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a"}, sock)
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smc-kernel", Timeout: 4 * time.Minute, HugePages: 32,
		ISM: []vmharness.ISMDevice{{Socket: sock}}})
	o := a.RequireOK(0)
	res := o.Results
	for _, c := range []string{"kernel_client", "kernel_server"} {
		t.Logf("%s: %s; decline %s (by peer: %s); record %q", c, res[c+"_reason"], res[c+"_decline"], res[c+"_decline_by_peer"], res[c+"_record"])
		if res[c] != "ok" {
			t.Errorf("%s: streams not intact (results %v)", c, res)
		}
		if res[c+"_decline_by_peer"] != "true" {
			t.Errorf("%s: the kernel did not decline: %q", c, res[c+"_reason"])
		}
		// The kernel's own view (smc_diag): fallback to TCP, for the
		// reason it declined with.
		t.Logf("%s: kernel's view: %s", c, res[c+"_kernel"])
		if want := "mode=fallback reason=" + res[c+"_decline"] + " "; !strings.HasPrefix(res[c+"_kernel"], want) {
			t.Errorf("%s: kernel's view %q, want it to start %q", c, res[c+"_kernel"], want)
		}
	}
	want := map[string]string{
		"synopt":               "option",
		"kernel_client_record": "sent=false peer=true saved-syn-option=true",
		"kernel_server_record": "sent=true peer=true",
		// SMC_CLC_DECL_NOSMCDEV: the client found no device at all
		"kernel_client_decline": "0x03030000",
		// SMC_CLC_DECL_NOSMCDDEV: no SMC-D device for our Proposal
		"kernel_server_decline": "0x03030001",
	}
	for k, v := range want {
		if res[k] != v {
			t.Errorf("%s = %q, want %q", k, res[k], v)
		}
	}
}
