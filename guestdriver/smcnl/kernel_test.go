package smcnl

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestKernelController resolves the controller's own family by name on the
// host's kernel: the request encoding and the reply parsing against the
// real thing, which any Linux has.
func TestKernelController(t *testing.T) {
	c, err := dial(unix.NETLINK_GENERIC)
	if err != nil {
		t.Skipf("no generic netlink here: %v", err)
	}
	defer c.close()
	id, err := resolveFamily(c, "nlctrl")
	if err != nil || id != unix.GENL_ID_CTRL {
		t.Fatalf("nlctrl resolved to %d, %v", id, err)
	}
	if _, err := resolveFamily(c, "NO_SUCH_FAMILY"); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("unknown family: %v", err)
	}
}

// TestKernelSMC runs against the host kernel's SMC module, when it has one
// and the test runs as root: add, list and remove a UEID, list devices and
// system info. The UEID table is global: the test leaves it as it found it.
func TestKernelSMC(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) to change the UEID table")
	}
	before, err := UEIDs()
	if errors.Is(err, ErrNotLoaded) {
		t.Skipf("host kernel: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	const name = "SMCNL-TEST.1"
	if err := AddUEID(name); err != nil {
		t.Fatal(err)
	}
	defer RemoveUEID(name)
	after, err := UEIDs()
	if err != nil || len(after) != len(before)+1 || after[len(after)-1] != name {
		t.Fatalf("after AddUEID: %q, %v (before %q)", after, err, before)
	}
	if err := AddUEID(name); !errors.Is(err, unix.EEXIST) {
		t.Fatalf("second AddUEID: %v", err)
	}
	sys, err := SystemInfo()
	if err != nil || sys.Version < 1 {
		t.Fatalf("SystemInfo() = %+v, %v", sys, err)
	}
	t.Logf("system: %+v", sys)
	devs, err := SMCDDevices()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("SMC-D devices: %+v", devs)
	if err := RemoveUEID(name); err != nil {
		t.Fatal(err)
	}
	if err := RemoveUEID(name); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("second RemoveUEID: %v", err)
	}
}
