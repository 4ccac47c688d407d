package vm

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// TestKernelSMCD: the Linux kernel's own SMC between two guests, over our
// DIBS driver (guestdriver/kernel/ism_dibs.c) and the real backend, with
// unmodified AF_SMC sockets (scenario kernel-smcd): 64 MiB from client to
// server, SHA-256 compared, and smc_diag in each guest saying SMC-D with
// the device's GID. copy: the backend offers copy mode only, so every byte
// goes through MOVE. attach: it offers attach mode too; the kernel's SMC
// then attaches the peer's DMB and writes into it directly (the backend maps
// DMBs into both regions and copies almost nothing).
func TestKernelSMCD(t *testing.T) {
	for _, c := range []struct {
		name  string
		modes string
	}{{"copy", "copy"}, {"attach", "copy,attach"}} {
		t.Run(c.name, func(t *testing.T) {
			r := vmharness.New(t)
			r.RequireBackend()
			vmharness.NeedSMCKernel(t, r.Cfg)
			sa, sb := r.Path("a.sock"), r.Path("b.sock")
			be := r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a", "-vm", "b", "-modes", c.modes,
				"-stats-file", r.Path("stats.json")}, sa, sb)
			srv, cli := r.NetPair()
			common := func(m map[string]string) map[string]string {
				m["bytes"] = strconv.Itoa(smcBytes)
				return m
			}
			a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "kernel-smcd", SMCKernel: true, Net: &srv,
				Timeout: 5 * time.Minute, Args: common(map[string]string{"role": "server", "ip": "169.254.7.1/24"}),
				ISM: []vmharness.ISMDevice{{Socket: sa}}})
			b := r.StartVM(vmharness.VMConfig{Name: "b", Scenario: "kernel-smcd", SMCKernel: true, Net: &cli,
				Timeout: 5 * time.Minute, Args: common(map[string]string{"role": "client", "ip": "169.254.7.2/24",
					"connect": "169.254.7.1:7100"}),
				ISM: []vmharness.ISMDevice{{Socket: sb}}})
			ob := b.RequireOK(0)
			oa := a.RequireOK(0)

			if sent, got := ob.Results["sha_0"], oa.Results["recv_sha_0"]; sent == "" || sent != got {
				t.Errorf("client sent sha256 %q, server read %q", sent, got)
			}
			if n := oa.Results["bytes_0"]; n != strconv.Itoa(smcBytes) {
				t.Errorf("server read %s bytes, want %d", n, smcBytes)
			}
			if ob.Results["unloaded"] != "1" {
				t.Errorf("client: the module's unload did not remove its dibs device")
			}
			for _, vm := range []*vmharness.VM{a, b} {
				// The driver's complaints (dev_err, dev_warn: "ism_dibs
				// virtioN: ...") reach the console; its dev_info does not.
				for _, l := range strings.Split(vm.Serial(), "\n") {
					if strings.Contains(l, "ism_dibs virtio") {
						t.Errorf("%s: driver says: %s", vm.Cfg.Name, strings.TrimSpace(l))
					}
				}
			}
			for _, o := range []struct {
				name      string
				out, peer vmharness.Outcome
			}{{"a", oa, ob}, {"b", ob, oa}} {
				if m := o.out.Results["kernel_mode"]; m != "smcd" {
					t.Errorf("%s: the kernel's connection is %q (%s), want smcd", o.name, m, o.out.Results["kernel_view"])
				}
				// The GIDs the kernel's SMC uses are the devices'.
				if my, dev := o.out.Results["kernel_my_gid"], o.out.Results["dibs_gid"]; my == "" || my != dev {
					t.Errorf("%s: SMC-D with GID %q, the dibs device has %q", o.name, my, dev)
				}
				if peer, dev := o.out.Results["kernel_peer_gid"], o.peer.Results["dibs_gid"]; peer == "" || peer != dev {
					t.Errorf("%s: SMC-D peer GID %q, the peer's dibs device has %q", o.name, peer, dev)
				}
				if f := o.out.Results["dibs_fabric_id"]; f != "0xff00" {
					t.Errorf("%s: dibs fabric id %q, want the backend's CHID 0xff00", o.name, f)
				}
			}

			// What the backend did: in copy mode it copied every byte and
			// mapped nothing; in attach mode the client wrote the stream
			// straight into the server's DMB.
			s, err := be.Stats()
			if err != nil {
				t.Fatal(err)
			}
			va, _ := s.VM("a")
			vb, ok := s.VM("b")
			if !ok {
				t.Fatalf("backend statistics list no VM b: %+v", s)
			}
			switch c.name {
			case "copy":
				if vb.Stats.MoveBytes < smcBytes {
					t.Errorf("client's MOVEs copied %d bytes, want at least %d", vb.Stats.MoveBytes, smcBytes)
				}
				if va.Stats.Maps+vb.Stats.Maps != 0 {
					t.Errorf("copy mode: %d+%d SHMEM_MAPs", va.Stats.Maps, vb.Stats.Maps)
				}
			case "attach":
				if va.Stats.Maps == 0 || vb.Stats.Maps < 2 {
					t.Errorf("attach mode: SHMEM_MAPs a=%d b=%d, want the server's DMB mapped in both and the client's own", va.Stats.Maps, vb.Stats.Maps)
				}
				if vb.Stats.MoveBytes >= smcBytes {
					t.Errorf("attach mode: the client's MOVEs copied %d bytes, want the stream written directly", vb.Stats.MoveBytes)
				}
			}
			t.Logf("%s: %d MiB over the kernel's SMC-D between guests: client %ss (%s MB/s under emulation); backend copied %d bytes for the client, maps a=%d b=%d",
				c.name, smcBytes>>20, ob.Results["client_seconds"], ob.Results["client_mbytes_per_s"],
				vb.Stats.MoveBytes, va.Stats.Maps, vb.Stats.Maps)
		})
	}
}

// TestKernelSMCDBackendGone: the backend dies under a kernel SMC-D stream.
// The client's driver, spinning in a MOVE, sees the SBA heartbeat stand
// still, declares the device unusable (one console line) and fails the MOVE
// and every later request with -EIO, so SMC's writes fail instead of
// hanging the guest.
func TestKernelSMCDBackendGone(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	vmharness.NeedSMCKernel(t, r.Cfg)
	sa, sb := r.Path("a.sock"), r.Path("b.sock")
	be := r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a", "-vm", "b", "-modes", "copy"}, sa, sb)
	srv, cli := r.NetPair()
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "kernel-smcd", SMCKernel: true, Net: &srv,
		Timeout: 5 * time.Minute, Args: map[string]string{"role": "server", "ip": "169.254.7.1/24"},
		ISM: []vmharness.ISMDevice{{Socket: sa}}})
	b := r.StartVM(vmharness.VMConfig{Name: "b", Scenario: "kernel-smcd", SMCKernel: true, Net: &cli,
		Timeout: 5 * time.Minute, Args: map[string]string{"role": "client", "ip": "169.254.7.2/24",
			"connect": "169.254.7.1:7100", "mode": "stream"},
		ISM: []vmharness.ISMDevice{{Socket: sb}}})
	defer a.Kill()
	if _, err := b.WaitResult("streaming", 3*time.Minute); err != nil {
		t.Fatalf("client never streamed: %v", err)
	}
	be.Kill()
	killed := time.Now()
	const line = "heartbeat stopped: the backend is gone"
	if err := b.WaitSerial(line, time.Minute); err != nil {
		t.Fatalf("the client's driver did not declare the backend gone: %v", err)
	}
	t.Logf("driver declared the backend gone %v after the kill", time.Since(killed).Round(time.Millisecond))
	o := b.RequireOK(0)
	if o.Results["write_error"] == "" {
		t.Errorf("client: no write error reported")
	}
	t.Logf("client's write failed after %s bytes: %s", o.Results["bytes_written"], o.Results["write_error"])
}
