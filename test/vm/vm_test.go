// Package vm holds the VM tests: real QEMU guests running ism-agent
// scenarios (see cmd/ism-agent), driven by vmharness. They skip unless
// ISM_VMTEST=1; `make vmtest` provisions everything and sets the variables.
package vm

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// TestHello boots one guest without the device: kernel, initramfs, agent,
// serial markers and power-off all work.
func TestHello(t *testing.T) {
	r := vmharness.New(t)
	vm := r.StartVM(vmharness.VMConfig{Scenario: "hello", Timeout: 60 * time.Second})
	if st, err := vm.Status(); err != nil || st != "running" {
		t.Fatalf("query-status = %q, %v; want running", st, err)
	}
	o := vm.RequireOK(0)
	if o.Results["uname"] == "" || o.Results["uptime_seconds"] == "" {
		t.Fatalf("hello reported %v; want uname and uptime_seconds", o.Results)
	}
	if o.Results["hugepages_total"] != "8" {
		t.Errorf("hugepages_total = %q, want 8 (hugepages=8 on the command line)", o.Results["hugepages_total"])
	}
}

// TestNetPing links two guests over a 127.0.0.1 stream, with each NIC model
// the harness offers (virtio-net, the default, and e1000), and has each ping
// the other and meet it over TCP.
func TestNetPing(t *testing.T) {
	// The guest reports the driver behind its interface.
	for _, nic := range []struct{ model, driver string }{{vmharness.NICVirtio, "virtio_net"}, {vmharness.NICE1000, "e1000"}} {
		model, driver := nic.model, nic.driver
		t.Run(model, func(t *testing.T) {
			r := vmharness.New(t)
			srv, cli := r.NetPair()
			srv.Model, cli.Model = model, model
			a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "net-ping", Net: &srv, Timeout: 90 * time.Second,
				Args: map[string]string{"ip": "169.254.7.1/24", "peer": "169.254.7.2"}})
			b := r.StartVM(vmharness.VMConfig{Name: "b", Scenario: "net-ping", Net: &cli, Timeout: 90 * time.Second,
				Args: map[string]string{"ip": "169.254.7.2/24", "peer": "169.254.7.1", "wait_peer": "169.254.7.1"}})
			start := time.Now()
			oa := a.RequireOK(0)
			ob := b.RequireOK(0)
			t.Logf("two guests done in %.1fs", time.Since(start).Seconds())
			for _, o := range []vmharness.Outcome{oa, ob} {
				if o.Results["ping_rtt_us"] == "" {
					t.Errorf("no ping_rtt_us in %v", o.Results)
				}
				if o.Results["nic"] != driver {
					t.Errorf("guest's NIC driver %q, want %s", o.Results["nic"], driver)
				}
			}
		})
	}
}

// TestAgentFailureIsReported checks that every way a scenario can go wrong
// reaches the host as "ISM-AGENT-END fail" followed by a power-off, so VM
// tests can fail.
func TestAgentFailureIsReported(t *testing.T) {
	r := vmharness.New(t)
	cases := []struct {
		scenario, mode, want string
	}{
		{"no-such-scenario", "", "unknown scenario"},
		{"agent-selftest", "error", "selftest error"},
		{"agent-selftest", "panic", "panic: selftest panic"},
		{"agent-selftest", "gopanic", "scenario process died"},
		{"agent-selftest", "hang", "timeout after %v"}, // the scaled ism.timeout
	}
	// Two guests at a time: the machines have two cores, and five TCG
	// boots at once on a loaded host overran the harness's timeouts.
	for lo := 0; lo < len(cases); lo += 2 {
		batch := cases[lo:min(lo+2, len(cases))]
		vms := make([]*vmharness.VM, len(batch))
		for i, c := range batch {
			vms[i] = r.StartVM(vmharness.VMConfig{Scenario: c.scenario, Timeout: 10 * time.Second,
				Args: map[string]string{"mode": c.mode}})
		}
		for i, c := range batch {
			o, _, err := vms[i].Wait(0)
			if err != nil {
				t.Errorf("%s/%s: %v", c.scenario, c.mode, err)
				continue
			}
			want := c.want
			if strings.Contains(want, "%v") {
				want = fmt.Sprintf(want, vms[i].Cfg.Timeout)
			}
			if !o.Began || !o.Ended || o.OK || !strings.Contains(o.Fail, want) {
				t.Errorf("%s/%s: outcome %+v; want BEGIN and END fail containing %q", c.scenario, c.mode, o, want)
			}
		}
	}
}

// TestKillAndQuit checks the harness can stop guests mid-run both ways.
func TestKillAndQuit(t *testing.T) {
	r := vmharness.New(t)
	// poweroff=0 keeps the guest up after the scenario, so it is surely running.
	a := r.StartVM(vmharness.VMConfig{Name: "quit", Scenario: "hello", Args: map[string]string{"poweroff": "0"}})
	k := r.StartVM(vmharness.VMConfig{Name: "kill", Scenario: "hello", Args: map[string]string{"poweroff": "0"}})
	for _, v := range []*vmharness.VM{a, k} {
		if err := v.WaitSerial("ISM-AGENT-END ok", 180*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if u, err := a.WaitResult("uname", time.Second); err != nil || !strings.HasPrefix(u, "Linux ") {
		t.Fatalf("WaitResult(uname) = %q, %v", u, err)
	}
	if st, err := a.Status(); err != nil || st != "running" {
		t.Fatalf("after END with ism.poweroff=0: status %q, %v; want running", st, err)
	}
	if err := a.Quit(); err != nil {
		t.Fatalf("QMP quit: %v", err)
	}
	k.Kill()
	if !a.Exited() || !k.Exited() {
		t.Fatal("QEMU still running after quit/kill")
	}
}
