package vm

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// The Linux kernel's own SMC-D on the SMC kernel (Linux 7.x with DIBS and
// SMC; scripts/provision-smc-kernel.sh), AF_SMC sockets in the guests.

// checkKernelSMCD: every connection's digest as sent equals the one read,
// and the kernel reports SMC-D for it at both ends.
func checkKernelSMCD(t *testing.T, server, client vmharness.Outcome, conns int) {
	t.Helper()
	for i := range conns {
		sent, got := client.Results[fmt.Sprintf("sha_%d", i)], server.Results[fmt.Sprintf("recv_sha_%d", i)]
		if sent == "" || sent != got {
			t.Errorf("connection %d: sent sha256 %q, read %q", i, sent, got)
		}
		for _, o := range []vmharness.Outcome{server, client} {
			if m := o.Results[fmt.Sprintf("kernel_mode_%d", i)]; !strings.HasPrefix(m, "mode=smcd ") {
				t.Errorf("connection %d: the kernel's smc_diag says %q, want mode=smcd", i, m)
			}
		}
	}
}

// TestKernelLoopbackISM: AF_SMC client and server in one guest use the
// kernel's loopback-ism (DIBS_LO), the intra-VM anchor of `make bench`.
func TestKernelLoopbackISM(t *testing.T) {
	r := vmharness.New(t)
	vmharness.NeedSMCKernel(t, r.Cfg)
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "kernel-lo", SMCKernel: true, Timeout: 5 * time.Minute,
		Args: map[string]string{"bytes": strconv.Itoa(smcBytes)}})
	o := a.RequireOK(0)
	checkKernelSMCD(t, o, o, 1)
	t.Logf("devices %q; %d MiB over the kernel's loopback-ism: %s", o.Results["devices"], smcBytes>>20, o.Results["kernel_mode_0"])
}

// kernelPeer is one end of a two-guest SMC-D test: its scenario, whether it
// boots the SMC kernel, and its arguments.
type kernelPeer struct {
	scenario  string
	smcKernel bool
	args      map[string]string
}

// kernelPairOn boots server a and client b on one backend (backendArgs
// added), linked by a network, one vCPU each.
func kernelPairOn(r *vmharness.Run, backendArgs []string, server, client kernelPeer, timeout time.Duration) (a, b *vmharness.VM) {
	sa, sb := r.Path("a.sock"), r.Path("b.sock")
	r.StartBackend(append([]string{"-socket-dir", r.Dir, "-vm", "a", "-vm", "b"}, backendArgs...), sa, sb)
	srv, cli := r.NetPair()
	server.args["ip"] = "169.254.7.1/24"
	client.args["ip"] = "169.254.7.2/24"
	client.args["connect"] = "169.254.7.1:7000"
	a = r.StartVM(vmharness.VMConfig{Name: "a", Scenario: server.scenario, SMCKernel: server.smcKernel, Net: &srv,
		Timeout: timeout, HugePages: 32, Args: server.args, ISM: []vmharness.ISMDevice{{Socket: sa}}})
	b = r.StartVM(vmharness.VMConfig{Name: "b", Scenario: client.scenario, SMCKernel: client.smcKernel, Net: &cli,
		Timeout: timeout, HugePages: 32, Args: client.args, ISM: []vmharness.ISMDevice{{Socket: sb}}})
	return a, b
}

// TestSMCDGoKernel: our Go stack (on Debian's 6.1 kernel) and the Linux
// kernel's SMC (on the SMC kernel, through our DIBS driver) connect over
// SMC-Dv2 through the backend, each way: 64 MiB, SHA-256 matched, the Go
// end reporting SMC-D with CLC version 2, the kernel's smc_diag SMC-D.
func TestSMCDGoKernel(t *testing.T) {
	ueid := "ISM-BACKEND-GUESTS" // the agent's default for the kernel guests
	goArgs := func(m map[string]string) map[string]string { m["ueid"] = ueid; return m }
	t.Run("kernel_client", func(t *testing.T) {
		r := vmharness.New(t)
		r.RequireBackend()
		vmharness.NeedSMCKernel(t, r.Cfg)
		a, b := kernelPairOn(r, nil,
			kernelPeer{scenario: "smcd-server", args: goArgs(map[string]string{})},
			kernelPeer{scenario: "kernel-smcd", smcKernel: true, args: map[string]string{"role": "client", "bytes": strconv.Itoa(smcBytes), "ueid": ueid}},
			5*time.Minute)
		ob, oa := b.RequireOK(0), a.RequireOK(0)
		checkGoKernel(t, oa, ob, oa.Results["sha_0"], ob.Results["sha_0"])
	})
	t.Run("go_client", func(t *testing.T) {
		r := vmharness.New(t)
		r.RequireBackend()
		vmharness.NeedSMCKernel(t, r.Cfg)
		a, b := kernelPairOn(r, nil,
			kernelPeer{scenario: "kernel-smcd", smcKernel: true, args: map[string]string{"role": "server", "listen": ":7000", "ueid": ueid}},
			kernelPeer{scenario: "smcd-client", args: goArgs(map[string]string{"bytes": strconv.Itoa(smcBytes)})},
			5*time.Minute)
		ob, oa := b.RequireOK(0), a.RequireOK(0)
		checkGoKernel(t, ob, oa, oa.Results["recv_sha_0"], ob.Results["sha_0"])
	})
}

// checkGoKernel: the digests match, the Go end ran SMC-D v2 (clc_version
// 2) and the kernel's end says SMC-D with the Go end's GID as its peer.
func checkGoKernel(t *testing.T, goEnd, kernelEnd vmharness.Outcome, read, sent string) {
	t.Helper()
	if sent == "" || sent != read {
		t.Errorf("sent sha256 %q, read %q", sent, read)
	}
	if v := goEnd.Results["clc_version_0"]; v != "2" {
		t.Errorf("Go end: CLC version %q, want 2 (SMC-Dv2)", v)
	}
	smc := goEnd.Results["smc_0"] + goEnd.Results["client_smc_0"]
	if smc != "true" {
		t.Errorf("Go end: SMC-D %q, want true", smc)
	}
	if m := kernelEnd.Results["kernel_mode"]; m != "smcd" {
		t.Errorf("kernel end: smc_diag says %q (%s), want smcd", m, kernelEnd.Results["kernel_view"])
	}
	if g, p := goEnd.Results["gid"], kernelEnd.Results["kernel_peer_gid"]; g == "" || g != p {
		t.Errorf("the kernel's peer GID %q, the Go end's device GID %q", p, g)
	}
	t.Logf("Go end: send %s, recv %s, CLC v%s; kernel end: %s, its GID %s, the peer's %s",
		goEnd.Results["send_mode_0"], goEnd.Results["recv_mode_0"], goEnd.Results["clc_version_0"],
		kernelEnd.Results["kernel_view"], kernelEnd.Results["kernel_my_gid"], kernelEnd.Results["kernel_peer_gid"])
}
