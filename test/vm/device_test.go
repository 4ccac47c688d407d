package vm

import (
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// TestDeviceInQueryPCI boots a guest with the ISM device on a real backend:
// QEMU must complete the vhost-user handshake at realize and show the device
// as 1af4:1066 (virtio 0x1040 + id 38), and the backend must survive the
// guest powering off.
func TestDeviceInQueryPCI(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	sock := r.Path("vm0.sock")
	b := r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "vm0"}, sock)
	vm := r.StartVM(vmharness.VMConfig{Name: "vm0", Scenario: "hello", Timeout: 60 * time.Second,
		ISM: []vmharness.ISMDevice{{Socket: sock}}})
	devs, err := vm.QueryPCI()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, d := range devs {
		if d.Vendor == 0x1af4 && d.Device == 0x1066 {
			found = true
			t.Logf("device at %02x:%02x.%d class %#04x %s", d.Bus, d.Slot, d.Function, d.Class, d.Desc)
		}
	}
	if !found {
		t.Fatalf("no 1af4:1066 in query-pci: %+v", devs)
	}
	vm.RequireOK(0)
	if exited, err := b.Exited(); exited {
		t.Fatalf("backend exited when the guest went away: %v", err)
	}
}

// TestBackendSurvivesGuestKill SIGKILLs a QEMU mid-run (the backend sees its
// socket drop without any stop message) and then boots a new guest on the
// same socket: the backend must accept it and complete the handshake again.
func TestBackendSurvivesGuestKill(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	sock := r.Path("vm0.sock")
	b := r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "vm0"}, sock)
	dev := []vmharness.ISMDevice{{Socket: sock}}
	first := r.StartVM(vmharness.VMConfig{Name: "first", Scenario: "hello", ISM: dev,
		Args: map[string]string{"poweroff": "0"}})
	if err := first.WaitSerial("ISM-AGENT-END ok", 180*time.Second); err != nil {
		t.Fatal(err)
	}
	first.Kill()
	if exited, err := b.Exited(); exited {
		t.Fatalf("backend exited after QEMU was killed: %v", err)
	}
	second := r.StartVM(vmharness.VMConfig{Name: "second", Scenario: "hello", Timeout: 60 * time.Second, ISM: dev})
	devs, err := second.QueryPCI()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, d := range devs {
		found = found || (d.Vendor == 0x1af4 && d.Device == 0x1066)
	}
	if !found {
		t.Fatalf("second guest: no 1af4:1066 in query-pci")
	}
	second.RequireOK(0)
}

// TestDriverSeesBackendGone SIGKILLs the backend under a running guest: the
// guest's next request must fail with ErrBackendGone (the SBA heartbeat
// stood still), not with the driver's 30 s request timeout, and closing the
// driver must leave the device alone so that QEMU 11.1.3, which aborts on a
// config read once the back-end is gone, survives to a clean power-off.
func TestDriverSeesBackendGone(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	sock := r.Path("vm0.sock")
	b := r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "vm0"}, sock)
	vm := r.StartVM(vmharness.VMConfig{Name: "vm0", Scenario: "backend-gone", Control: true,
		ISM: []vmharness.ISMDevice{{Socket: sock}}})
	if _, err := vm.WaitResult("ready", 180*time.Second); err != nil {
		t.Fatal(err)
	}
	b.Kill()
	if err := vm.Send("go"); err != nil {
		t.Fatal(err)
	}
	o := vm.RequireOK(0)
	t.Logf("first request failed after %s ms: %s; the next after %s ms", o.Results["first_error_ms"],
		o.Results["first_error"], o.Results["second_error_ms"])
}
