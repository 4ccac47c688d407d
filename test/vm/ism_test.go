package vm

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// The ISM device itself in real guests: the userspace driver over the real
// backend (copy mode), before any SMC-D.

const (
	gidA = "0xa1a1a1a1a1a1a1a1"
	gidB = "0xb2b2b2b2b2b2b2b2"
	gidC = "0xc3c3c3c3c3c3c3c3"
)

// ismFabric starts a backend serving VMs a, b and c with fixed GIDs.
func ismFabric(t *testing.T, extra ...string) (*vmharness.Run, *vmharness.Backend, map[string]string) {
	r := vmharness.New(t)
	r.RequireBackend()
	socks := map[string]string{"a": r.Path("a.sock"), "b": r.Path("b.sock"), "c": r.Path("c.sock")}
	args := append([]string{"-socket-dir", r.Dir, "-vm", "a=" + gidA, "-vm", "b=" + gidB, "-vm", "c=" + gidC}, extra...)
	b := r.StartBackend(args, socks["a"], socks["b"], socks["c"])
	return r, b, socks
}

func ismVM(r *vmharness.Run, name, scenario, sock string, timeout time.Duration, args map[string]string) *vmharness.VM {
	return r.StartVM(vmharness.VMConfig{Name: name, Scenario: scenario, Timeout: timeout, Args: args,
		ISM: []vmharness.ISMDevice{{Socket: sock}}})
}

// waitResult waits for the agent's whole ISM-RESULT key=... line (the
// console may have written only part of a token yet) and returns the value.
func waitResult(t *testing.T, vm *vmharness.VM, key string, timeout time.Duration) string {
	t.Helper()
	v, err := vm.WaitResult(key, timeout)
	if err != nil {
		t.Fatalf("waiting for %s: %v", key, err)
	}
	return v
}

// TestISMProbe: the driver finds the device, reads GID and CHID from config
// space, and registers and unregisters DMBs.
func TestISMProbe(t *testing.T) {
	r, _, socks := ismFabric(t)
	o := ismVM(r, "a", "ism-probe", socks["a"], 2*time.Minute, nil).RequireOK(0)
	if o.Results["gid"] != gidA || o.Results["chid"] != "0xff00" {
		t.Fatalf("guest read gid %q chid %q, want %s 0xff00", o.Results["gid"], o.Results["chid"], gidA)
	}
	if !strings.Contains(o.Results["config"], "version=2") || o.Results["query_self"] != "OK" {
		t.Fatalf("config %q query_self %q", o.Results["config"], o.Results["query_self"])
	}
}

// TestISMProbeFromVirtioPCI: with virtio_pci loaded before the driver runs
// (as for a virtio-net NIC), the kernel has bound the ISM device; the driver
// must identify it without mapping its BARs, unbind it, log that once, and
// then work as usual: on interrupts through uio_pci_generic (auto), or
// polling with the device unbound (poll).
func TestISMProbeFromVirtioPCI(t *testing.T) {
	for _, wait := range []string{"auto", "poll"} {
		t.Run(wait, func(t *testing.T) {
			r, _, socks := ismFabric(t)
			vm := ismVM(r, "a", "ism-probe", socks["a"], 2*time.Minute, map[string]string{"modules": "virtio_pci", "wait": wait})
			o := vm.RequireOK(0)
			if o.Results["gid"] != gidA || o.Results["query_self"] != "OK" {
				t.Fatalf("gid %q query_self %q", o.Results["gid"], o.Results["query_self"])
			}
			if want := fmt.Sprint(wait == "auto"); o.Results["interrupts"] != want {
				t.Errorf("interrupts=%q, want %s", o.Results["interrupts"], want)
			}
			// ism-probe opens the device twice: the second time it is no
			// longer virtio_pci's.
			if n := strings.Count(vm.Serial(), "ISM device was bound to kernel driver virtio-pci"); n != 1 {
				t.Errorf("%d takeover log lines, want 1:\n%s", n, vm.Serial())
			}
		})
	}
}

// TestISMTransfer: A registers a DMB for B; B MOVEs 16 MiB of a seeded
// pattern into it in signalled chunks; both SHA-256s must match. Meanwhile a
// third VM C tries a forged token and A's real token: both refused.
//
// C's probe of A's token means PERMISSION only while A's DMB exists, and
// B's transfer can end before C has even booted. So A holds its DMB
// (ism.hold=1) until the host, having C's results, sends it "release" on its
// control port.
func TestISMTransfer(t *testing.T) {
	r, _, socks := ismFabric(t)
	const bytes = "16777216"
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "ism-recv", Timeout: 4 * time.Minute, Control: true,
		Args: map[string]string{"peer": gidB, "bytes": bytes, "hold": "1"},
		ISM:  []vmharness.ISMDevice{{Socket: socks["a"]}}})
	token := waitResult(t, a, "token", 3*time.Minute)
	b := ismVM(r, "b", "ism-send", socks["b"], 4*time.Minute, map[string]string{"token": token, "peer": gidA, "bytes": bytes})
	c := ismVM(r, "c", "ism-forge", socks["c"], 4*time.Minute, map[string]string{"token": token})

	oc := c.RequireOK(0)
	if s := a.Outcome(); s.Ended {
		// Cannot happen while A holds; if it does, C's verdict is void.
		t.Fatalf("A ended before C's probes were checked: %+v", s)
	}
	if oc.Results["forged_token_status"] != "NOENTRY" || oc.Results["third_gid_status"] != "PERMISSION" {
		t.Errorf("third VM: forged token %q (want NOENTRY), A's token from C %q (want PERMISSION)",
			oc.Results["forged_token_status"], oc.Results["third_gid_status"])
	}
	// A opened its control port before printing the token, so the line
	// cannot be lost; it reads it once the transfer is done.
	if err := a.Send("release"); err != nil {
		t.Fatal(err)
	}
	ob := b.RequireOK(0)
	oa := a.RequireOK(0)
	if oa.Results["holding"] != "1" {
		t.Errorf("A did not hold its DMB for the host: %v", oa.Results)
	}
	if oa.Results["sha256"] == "" || oa.Results["sha256"] != ob.Results["sha256"] || oa.Results["bytes"] != bytes {
		t.Fatalf("A received %s bytes with sha256 %q; B sent sha256 %q", oa.Results["bytes"], oa.Results["sha256"], ob.Results["sha256"])
	}
	t.Logf("16 MiB copy-mode transfer between guests: sha256 %s, %s Mbit/s under emulation", oa.Results["sha256"], ob.Results["mbit_per_s"])
}

// TestISMKillReceiver: the receiver's QEMU goes away mid-transfer (QMP quit,
// or SIGKILL as in a crash). The sender learns it (GID event or NOENTRY) and
// is still served; the dead VM's DMBs are gone from the backend.
func TestISMKillReceiver(t *testing.T) {
	for _, how := range []string{"quit", "sigkill"} {
		t.Run(how, func(t *testing.T) {
			r, backend, socks := ismFabric(t, "-stats-interval", "500ms")
			a := ismVM(r, "a", "ism-recv", socks["a"], 4*time.Minute, map[string]string{"peer": gidB, "bytes": fmt.Sprint(1 << 30)})
			token := waitResult(t, a, "token", 3*time.Minute)
			b := ismVM(r, "b", "ism-send", socks["b"], 4*time.Minute,
				map[string]string{"token": token, "peer": gidA, "bytes": fmt.Sprint(1 << 30), "expect_gone": "1"})
			waitResult(t, b, "acked_1mib", 3*time.Minute)
			switch how {
			case "quit":
				if err := a.Quit(); err != nil {
					t.Fatalf("QMP quit: %v", err)
				}
			case "sigkill":
				a.Kill()
			}
			ob := b.RequireOK(0)
			if ob.Results["peer_gone"] == "" || ob.Results["still_served"] != "1" {
				t.Fatalf("sender after the receiver died: %v", ob.Results)
			}
			t.Logf("sender learnt: %s", ob.Results["peer_gone"])
			if exited, err := backend.Exited(); exited {
				t.Fatalf("backend exited: %v", err)
			}
			requireDMBsGone(t, r, backend)
		})
	}
}

// requireDMBsGone waits for the backend's log to show A's device stopped
// and, after that, a statistics line with no DMB left on the fabric. It
// looks for A's line wherever it is: B's device stops too, once B has
// learnt of A's end and powered off, and the order of those log lines is
// the backend's scheduling, not what this test is about.
func requireDMBsGone(t *testing.T, r *vmharness.Run, b *vmharness.Backend) {
	t.Helper()
	deadline := time.Now().Add(r.Scaled(10 * time.Second))
	for {
		log := b.Log()
		if i := stopLineOf(log, "a"); i >= 0 && strings.Contains(log[i:], "DMBs:0 ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend log does not show A's DMBs gone:\n%s", log)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// stopLineOf returns where the backend's "device stopped" line for vm
// starts in log, or -1.
func stopLineOf(log, vm string) int {
	off := 0
	for _, l := range strings.SplitAfter(log, "\n") {
		if strings.Contains(l, `msg="device stopped: its DMBs are gone"`) && slices.Contains(strings.Fields(l), "vm="+vm) {
			return off
		}
		off += len(l)
	}
	return -1
}
