package main

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/ismvirtio"
	"github.com/ism-backend/ism-backend/vhostuser"
)

func TestParseFlags(t *testing.T) {
	opts, err := parseFlags([]string{"-socket-dir", "/tmp/x", "-vm", "vm1", "-vm", "vm2=0x1234", "-chid", "0xff01"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(opts.vms) != 2 || opts.vms[1].GID != 0x1234 || opts.chid != 0xff01 {
		t.Fatalf("%+v", opts)
	}
	if opts.vms[0].GID != gidForName("vm1") || opts.vms[0].GID == gidForName("vm2") {
		t.Fatal("derived GIDs not stable or not distinct")
	}
	if opts.maxMemBytes != vhostuser.DefaultMaxMemBytes || opts.maxMemRegions != vhostuser.MaxMemSlots {
		t.Fatalf("memory caps default to %d bytes, %d regions", opts.maxMemBytes, opts.maxMemRegions)
	}
	opts, err = parseFlags([]string{"-vm", "vm1", "-max-mem-bytes", "1073741824", "-max-mem-regions", "16"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if opts.maxMemBytes != 1<<30 || opts.maxMemRegions != 16 {
		t.Fatalf("memory caps %d bytes, %d regions", opts.maxMemBytes, opts.maxMemRegions)
	}
	for _, addr := range []string{"127.0.0.1:9100", ":0", "[::1]:9100"} {
		if opts, err := parseFlags([]string{"-vm", "vm1", "-metrics-addr", addr}, io.Discard); err != nil || opts.metricsAddr != addr {
			t.Errorf("-metrics-addr %s: %v", addr, err)
		}
	}
}

func TestParseFlagsRefuses(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"-vm", "bad name"},
		{"-vm", "a=0"},
		{"-vm", "a=zz"},
		{"-vm", "a", "-vm", "a"},
		{"-vm", "a=5", "-vm", "b=5"},
		{"-vm", "a", "-chid", "0x10000"},
		{"-vm", "a", "-log-level", "loud"},
		{"-vm", "a", "-virtio-id", "0"},
		{"-vm", "a", "extra"},
		{"-vm", "a", "-max-mem-bytes", "0"},
		{"-vm", "a", "-max-mem-regions", "0"},
		{"-vm", "a", "-max-mem-regions", "513"},
		{"-vm", "a", "-metrics-addr", "9100"},
		{"-vm", "a", "-metrics-addr", "localhost:99999"},
		{"-vm", "a", "-metrics-addr", "localhost:http"},
		{"-bogus"},
	} {
		var out bytes.Buffer
		if _, err := parseFlags(args, &out); err == nil {
			t.Errorf("%q: accepted", args)
		} else if strings.Contains(err.Error(), "\n") || out.Len() != 0 {
			t.Errorf("%q: error not one line (%q, printed %q)", args, err, out.String())
		}
	}
}

// printedQEMU is what ism-backend -socket-dir /run/ism -print-qemu vm1
// prints.
func printedQEMU(t *testing.T) *bytes.Buffer {
	t.Helper()
	opts, err := parseFlags([]string{"-socket-dir", "/run/ism", "-print-qemu", "vm1"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := printQEMU(&out, opts); err != nil {
		t.Fatal(err)
	}
	return &out
}

func TestPrintQEMU(t *testing.T) {
	out := printedQEMU(t)
	for _, want := range []string{"share=on", "path=/run/ism/vm1.sock", "vhost-user-test-device-pci", "virtio-id=38", "num_vqs=2", "config_size=64"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("missing %q in %s", want, out.String())
		}
	}
}

// TestPrintQEMULibvirt: the libvirt part of -print-qemu, put in a minimal
// q35 domain, validates against libvirt's schema (where virt-xml-validate
// and xmllint are installed).
func TestPrintQEMULibvirt(t *testing.T) {
	out := printedQEMU(t)
	_, frag, ok := strings.Cut(out.String(), "\n<!--")
	if !ok {
		t.Fatalf("no libvirt part in\n%s", out.String())
	}
	_, frag, _ = strings.Cut(frag, "-->")
	for _, want := range []string{"<source type='memfd'/>", "<access mode='shared'/>", "<qemu:arg value='socket,id=ism0,path=/run/ism/vm1.sock'/>"} {
		if !strings.Contains(frag, want) {
			t.Errorf("libvirt part lacks %s:\n%s", want, frag)
		}
	}
	v, err := exec.LookPath("virt-xml-validate")
	if err != nil {
		t.Skip("virt-xml-validate not installed: the schema is not checked")
	}
	if _, err := exec.LookPath("xmllint"); err != nil {
		t.Skip("xmllint not installed: virt-xml-validate cannot run")
	}
	dom := "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>vm1</name><memory unit='GiB'>1</memory>" +
		frag + "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
	path := filepath.Join(t.TempDir(), "vm1.xml")
	if err := os.WriteFile(path, []byte(dom), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := exec.Command(v, path, "domain").CombinedOutput(); err != nil || !strings.Contains(string(b), "validates") {
		t.Fatalf("virt-xml-validate: %v\n%s\n%s", err, b, dom)
	}
}

func TestModeFlags(t *testing.T) {
	opts, err := parseFlags([]string{"-vm", "a", "-vm", "b", "-modes", "copy", "-vm-modes", "b=attach,copy", "-shm-size", "8388608", "-max-mapped", "4194304"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := opts.backendOptions("a")
	b, _ := opts.backendOptions("b")
	if a.Modes != abi.ModeCopy || a.ShmSize != 0 || b.Modes != abi.ModeCopy|abi.ModeAttach || b.ShmSize != 8<<20 || b.MaxMapped != 4<<20 {
		t.Fatalf("a %+v b %+v", a, b)
	}
	def, err := parseFlags([]string{"-vm", "a"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o, _ := def.backendOptions("a"); o.Modes != abi.ModeCopy|abi.ModeAttach || o.ShmSize != ismvirtio.DefaultShmSize {
		t.Fatalf("defaults %+v", o)
	}
	for _, bad := range [][]string{
		{"-vm", "a", "-max-dmbs", "0"},
		{"-vm", "a", "-max-dmbs", "1921"},
		{"-vm", "a", "-events-per-source", "0"},
		{"-vm", "a", "-events-per-source", "100000"},
		{"-vm", "a", "-signal-rate", "0"},
		{"-vm", "a", "-signal-burst", "-1"},
		{"-vm", "a", "-modes", "nocopy"},
		{"-vm", "a", "-vm-modes", "a"},
		{"-vm", "a", "-shm-size", "4097"},
	} {
		if _, err := parseFlags(bad, io.Discard); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

// TestLimitFlags: the caps reach the fabric's limits and each VM's options;
// the defaults are the packages' own.
func TestLimitFlags(t *testing.T) {
	opts, err := parseFlags([]string{"-vm", "a", "-max-dmbs", "64", "-max-attach-memory", "1048576", "-max-mapped", "4194304",
		"-events-per-source", "32", "-signal-rate", "500", "-signal-burst", "50"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if l := opts.limits(); l.DeviceDMBs != 64 || l.SignalRate != 500 || l.SignalBurst != 50 {
		t.Errorf("limits %+v", l)
	}
	if o, _ := opts.backendOptions("a"); o.MaxAttach != 1<<20 || o.MaxMapped != 4<<20 || o.EventsPerSource != 32 {
		t.Errorf("options %+v", o)
	}
	def, err := parseFlags([]string{"-vm", "a"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if l := def.limits(); l.DeviceDMBs != abi.MaxDMBs || l.SignalRate != ism.DefaultSignalRate || l.SignalBurst != ism.DefaultSignalBurst {
		t.Errorf("default limits %+v", l)
	}
	if o, _ := def.backendOptions("a"); o.MaxAttach != o.MaxMapped || o.EventsPerSource != ismvirtio.DefaultEventsPerSource {
		t.Errorf("default options %+v", o)
	}
}
