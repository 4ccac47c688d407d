// Package contrib holds files for installing ism-backend (a systemd unit,
// a libvirt domain); its tests check them with the tools that read them,
// where those are installed (systemd-analyze: systemd; virt-xml-validate:
// Debian's libvirt-clients and libxml2-utils), and skip otherwise.
package contrib

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func tool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed: not checked", name)
	}
	return p
}

// TestSystemdUnit: systemd-analyze verify accepts the unit with nothing to
// say (it reports a bad setting as a line and still exits 0). verify wants
// ExecStart's binary to exist: the copy points it at this test binary.
func TestSystemdUnit(t *testing.T) {
	sa := tool(t, "systemd-analyze")
	unit, err := os.ReadFile("systemd/ism-backend.service")
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "ExecStart=/usr/local/bin/ism-backend ") {
		t.Fatal("the unit's ExecStart is not /usr/local/bin/ism-backend")
	}
	copyPath := filepath.Join(t.TempDir(), "ism-backend.service")
	if err := os.WriteFile(copyPath, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/ism-backend", self)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", copyPath).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) != 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestLibvirtDomain: the example domain validates against libvirt's schema.
func TestLibvirtDomain(t *testing.T) {
	validateDomain(t, "libvirt/ism-guest.xml")
}

// validateDomain runs virt-xml-validate on a domain XML file.
func validateDomain(t *testing.T, path string) {
	t.Helper()
	v := tool(t, "virt-xml-validate")
	if _, err := exec.LookPath("xmllint"); err != nil {
		t.Skip("xmllint (libxml2-utils) not installed: virt-xml-validate cannot run")
	}
	out, err := exec.Command(v, path, "domain").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "validates") {
		t.Fatalf("virt-xml-validate %s: %v\n%s", path, err, out)
	}
}
