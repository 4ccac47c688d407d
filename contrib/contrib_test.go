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

// TestSystemdUnit: systemd-analyze verify accepts the units with nothing
// to say (it reports a bad setting as a line and still exits 0): the
// service, and the socket unit with the service and its socket-activation
// drop-in. verify wants ExecStart's binary to exist: the copies point it at
// this test binary.
func TestSystemdUnit(t *testing.T) {
	sa := tool(t, "systemd-analyze")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile("systemd/ism-backend.service")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "ExecStart=/usr/local/bin/ism-backend ") {
		t.Fatal("the unit's ExecStart is not /usr/local/bin/ism-backend")
	}
	dir := t.TempDir()
	install := func(src, dst string, b []byte) string {
		t.Helper()
		if b == nil {
			var err error
			if b, err = os.ReadFile(src); err != nil {
				t.Fatal(err)
			}
		}
		p := filepath.Join(dir, dst)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	service := install("", "ism-backend.service", []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/ism-backend", self)))
	verify := func(path string) {
		t.Helper()
		out, err := exec.Command(sa, "verify", path).CombinedOutput()
		if err != nil || len(strings.TrimSpace(string(out))) != 0 {
			t.Fatalf("systemd-analyze verify %s: %v\n%s", filepath.Base(path), err, out)
		}
	}
	verify(service)

	install("systemd/ism-backend.service.d/socket-activation.conf", "ism-backend.service.d/socket-activation.conf", nil)
	socket := install("systemd/ism-backend.socket", "ism-backend.socket", nil)
	verify(socket)
	verify(service)
	// The socket unit names the control and handover sockets the backend
	// looks for in -socket-dir /run/ism.
	b, _ := os.ReadFile(socket)
	for _, want := range []string{"ListenStream=/run/ism/ism-backend.ctl", "ListenStream=/run/ism/ism-backend.handover"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("ism-backend.socket lacks %s", want)
		}
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
