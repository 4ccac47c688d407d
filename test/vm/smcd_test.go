package vm

import (
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// SMC-D end to end: the userspace stack in real guests, over the real
// backend, with the CLC handshake on a virtio-net link between the guests
// (the harness's default NIC; the guests' virtio_pci binds the ISM device
// first and the driver takes it back).

const smcBytes = 64 << 20

// smcPair boots a server guest "a" and a client guest "b" on one backend,
// linked by a network, with one vCPU each; it returns them unstarted-waited.
func smcPair(t *testing.T, serverArgs, clientArgs map[string]string, timeout time.Duration) (r *vmharness.Run, a, b *vmharness.VM) {
	return smcPairCPUs(t, 1, serverArgs, clientArgs, timeout)
}

// smcPairCPUs is smcPair with cpus vCPUs per guest.
func smcPairCPUs(t *testing.T, cpus int, serverArgs, clientArgs map[string]string, timeout time.Duration) (r *vmharness.Run, a, b *vmharness.VM) {
	r = vmharness.New(t)
	r.RequireBackend()
	_, a, b = smcPairOn(r, cpus, nil, serverArgs, clientArgs, timeout)
	return r, a, b
}

// smcPairOn is smcPairCPUs on a run the caller has, with backendArgs added
// to the backend's command line (e.g. -stats-file r.Path(...)); it returns
// the backend too.
func smcPairOn(r *vmharness.Run, cpus int, backendArgs []string, serverArgs, clientArgs map[string]string, timeout time.Duration) (be *vmharness.Backend, a, b *vmharness.VM) {
	sa, sb := r.Path("a.sock"), r.Path("b.sock")
	be = r.StartBackend(append([]string{"-socket-dir", r.Dir, "-vm", "a", "-vm", "b"}, backendArgs...), sa, sb)
	srv, cli := r.NetPair()
	serverArgs["ip"] = "169.254.7.1/24"
	clientArgs["ip"] = "169.254.7.2/24"
	clientArgs["connect"] = "169.254.7.1:7000"
	a = r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smcd-server", Net: &srv, Timeout: timeout, CPUs: cpus,
		HugePages: 32, Args: serverArgs, ISM: []vmharness.ISMDevice{{Socket: sa}}})
	b = r.StartVM(vmharness.VMConfig{Name: "b", Scenario: "smcd-client", Net: &cli, Timeout: timeout, CPUs: cpus,
		HugePages: 32, Args: clientArgs, ISM: []vmharness.ISMDevice{{Socket: sb}}})
	return be, a, b
}

// checkDigests: every connection's SHA-256 as the client sent it equals the
// server's, and each connection used SMC-D (or TCP, as wantSMC says).
func checkDigests(t *testing.T, server, client vmharness.Outcome, conns int, wantSMC bool) {
	t.Helper()
	for i := range conns {
		sent, got := client.Results[fmt.Sprintf("sha_%d", i)], server.Results[fmt.Sprintf("sha_%d", i)]
		if sent == "" || sent != got {
			t.Errorf("connection %d: client sent sha256 %q, server read %q", i, sent, got)
		}
		if smc := server.Results[fmt.Sprintf("smc_%d", i)]; smc != strconv.FormatBool(wantSMC) {
			t.Errorf("connection %d: server smc=%q, want %v", i, smc, wantSMC)
		}
	}
}

// smcCase is one configuration of the SMC-D transfer tests: connections,
// vCPUs per guest (1 is the harshest for shared-memory races, 2 brings
// concurrency inside the guest), and how the guest driver waits for signals
// (the default, interrupts, or polling).
type smcCase struct {
	conns, cpus int
	wait        string // "" = the driver's default
}

func (c smcCase) String() string {
	s := fmt.Sprintf("conns=%d", c.conns)
	if c.cpus > 1 {
		s += fmt.Sprintf(",cpus=%d", c.cpus)
	}
	if c.wait != "" {
		s += ",wait=" + c.wait
	}
	return s
}

// args adds the case's guest arguments to m.
func (c smcCase) args(m map[string]string) map[string]string {
	m["conns"] = strconv.Itoa(c.conns)
	if c.wait != "" {
		m["wait"] = c.wait
	}
	return m
}

var smcCases = []smcCase{{conns: 1}, {conns: 32}, {conns: 32, cpus: 2}, {conns: 32, wait: "poll"}}

func TestSMCDInterVM(t *testing.T) {
	for _, c := range smcCases {
		t.Run(c.String(), func(t *testing.T) {
			_, a, b := smcPairCPUs(t, c.cpus,
				c.args(map[string]string{}),
				c.args(map[string]string{"bytes": strconv.Itoa(smcBytes)}), 5*time.Minute)
			ob := b.RequireOK(0)
			oa := a.RequireOK(0)
			checkDigests(t, oa, ob, c.conns, true)
			t.Logf("%d MiB over %d SMC-D connection(s) between guests: client %ss (%s MB/s under emulation)",
				smcBytes>>20, c.conns, ob.Results["client_seconds"], ob.Results["client_mbytes_per_s"])
		})
	}
}

func TestSMCDIntraVM(t *testing.T) {
	for _, c := range smcCases[:3] {
		t.Run(c.String(), func(t *testing.T) {
			r := vmharness.New(t)
			r.RequireBackend()
			sock := r.Path("a.sock")
			r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a"}, sock)
			a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smcd-local", Timeout: 5 * time.Minute, HugePages: 48,
				CPUs: c.cpus, Args: c.args(map[string]string{"bytes": strconv.Itoa(smcBytes)}),
				ISM: []vmharness.ISMDevice{{Socket: sock}}})
			o := a.RequireOK(0)
			checkDigests(t, o, o, c.conns, true)
			t.Logf("%d MiB over %d SMC-D connection(s) inside one guest: %ss", smcBytes>>20, c.conns, o.Results["client_seconds"])
		})
	}
}

func TestSMCDEcho(t *testing.T) {
	_, a, b := smcPair(t, map[string]string{"mode": "echo"}, map[string]string{"mode": "echo", "pairs": "1000"}, 3*time.Minute)
	ob := b.RequireOK(0)
	a.RequireOK(0)
	if ob.Results["echo_pairs_0"] != "1000" || ob.Results["client_smc_0"] != "true" {
		t.Fatalf("echo results %v", ob.Results)
	}
	t.Logf("1000 echo pairs over SMC-D between guests: %s us per round trip (under emulation)", ob.Results["echo_rtt_us_0"])
}

// TestSMCDDecline: the server refuses SMC-D (as if it had no ISM device);
// both ends fall back to TCP on the same connection and the data arrives.
func TestSMCDDecline(t *testing.T) {
	_, a, b := smcPair(t,
		map[string]string{"decline": "0x03030001"},
		map[string]string{"bytes": strconv.Itoa(8 << 20)}, 3*time.Minute)
	ob := b.RequireOK(0)
	oa := a.RequireOK(0)
	checkDigests(t, oa, ob, 1, false)
	if ob.Results["client_smc_0"] != "false" {
		t.Fatalf("client thinks it uses SMC-D after a Decline: %v", ob.Results)
	}
}

// TestSMCDPeerVanishes: the client's VM is killed mid-stream; the server's
// Read must fail, not hang.
func TestSMCDPeerVanishes(t *testing.T) {
	_, a, b := smcPair(t, map[string]string{"mode": "sink-vanish"}, map[string]string{"mode": "stream"}, 3*time.Minute)
	if err := b.WaitSerial("ISM-RESULT streaming_0=1", 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	b.Kill()
	oa := a.RequireOK(0)
	t.Logf("server saw %q %.1fs after the client VM was killed", oa.Results["vanish_error_0"], time.Since(killed).Seconds())
	if oa.Results["smc_0"] != "true" {
		t.Fatalf("the vanished connection was not SMC-D: %v", oa.Results)
	}
}
