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
