package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"github.com/ism-backend/ism-backend/guestdriver/smcnl"
)

// Bad command lines fail with one line (and the usage for usage errors)
// before any netlink traffic.
func TestBadInput(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{nil, 2, "no command"},
		{[]string{"frob"}, 2, `unknown command "frob"`},
		{[]string{"ueid"}, 2, "add, del, flush or list"},
		{[]string{"ueid", "add"}, 2, "takes one NAME"},
		{[]string{"ueid", "add", "A", "B"}, 2, "takes one NAME"},
		{[]string{"ueid", "flush", "X"}, 2, "takes no arguments"},
		{[]string{"ueid", "zap"}, 2, "unknown subcommand"},
		{[]string{"info", "x"}, 2, "takes 0 argument"},
		{[]string{"ueid", "add", "lower"}, 1, `UEID "lower": lower case`},
		{[]string{"ueid", "del", "-X"}, 1, "first character"},
		{[]string{"ueid", "add", strings.Repeat("A", 33)}, 1, "longer than 32"},
	} {
		var out, errb bytes.Buffer
		code := run(c.args, &out, &errb)
		lines := strings.Split(strings.TrimSuffix(errb.String(), "\n"), "\n")
		if code != c.code || !strings.HasPrefix(lines[0], "smcctl: ") || !strings.Contains(lines[0], c.msg) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d and %q", c.args, code, errb.String(), c.code, c.msg)
		}
		if want := map[int]int{1: 1, 2: 2}[c.code]; len(lines) != want {
			t.Errorf("%q: %d lines on stderr: %q", c.args, len(lines), errb.String())
		}
		if out.Len() != 0 {
			t.Errorf("%q: wrote %q to stdout", c.args, out.String())
		}
	}
}

func TestPrintSockets(t *testing.T) {
	socks := []smcnl.Socket{
		{State: 10, Local: netip.MustParseAddrPort("0.0.0.0:7000")},
		{State: 1, Mode: smcnl.ModeSMCD, UID: 0, Inode: 77,
			Local: netip.MustParseAddrPort("169.254.7.1:7000"), Peer: netip.MustParseAddrPort("169.254.7.2:40000"),
			Fallback: &smcnl.Fallback{}, DMB: &smcnl.DMBInfo{Token: 0x10, PeerToken: 0x20}},
		{State: 1, Mode: smcnl.ModeFallbackTCP,
			Local: netip.MustParseAddrPort("169.254.7.1:7001"), Peer: netip.MustParseAddrPort("169.254.7.2:40001"),
			Fallback: &smcnl.Fallback{Reason: 0x05000000, PeerDiagnosis: 0x03030001}},
	}
	var b bytes.Buffer
	if err := printSockets(&b, socks); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"LISTEN", "0.0.0.0:7000",
		"169.254.7.1:7000", "SMCD token=0x10 peer_token=0x20",
		"TCP 0x05000000/0x03030001 (peer declined during handshake)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "\n"); n != 4 {
		t.Errorf("%d lines:\n%s", n, out)
	}
}

func TestPrintDevicesAndInfo(t *testing.T) {
	var b bytes.Buffer
	devs := []smcnl.SMCDDevice{{PCIID: "0000:00:04.0", Vendor: 0x1af4, Device: 0x10ff, UseCount: 1, Critical: true}}
	if err := printDevices(&b, devs); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "0000:00:04.0  1af4:10ff") || !strings.Contains(b.String(), "yes") {
		t.Errorf("devices:\n%s", b.String())
	}
	b.Reset()
	if err := printInfo(&b, smcnl.System{Version: 2, Release: 1, ISMv2: true, Host: "g1", UEIDs: []string{"ISM-TEST"}}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"SMC version:   2.1", "SMC-D v2:      yes", "SEID:          - (disabled)", "UEIDs:         ISM-TEST"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("info lacks %q:\n%s", want, b.String())
		}
	}
}
