package main

import (
	"net/netip"
	"testing"

	"github.com/ism-backend/ism-backend/guestdriver/smcnl"
)

func TestSMCDiagFromSocket(t *testing.T) {
	d := newSMCDiag(smcnl.Socket{State: 1, Mode: smcnl.ModeFallbackTCP,
		Local: netip.MustParseAddrPort("169.254.7.1:7000"), Peer: netip.MustParseAddrPort("169.254.7.2:40000"),
		Fallback: &smcnl.Fallback{Reason: 0x03030000, PeerDiagnosis: 0x03010000}})
	if d.SPort != 7000 || d.DPort != 40000 || !d.HasFallback || d.Mode != smcDiagModeFallback ||
		d.Reason != 0x03030000 || d.PeerDiagnosis != 0x03010000 {
		t.Fatalf("smcDiag %+v", d)
	}
	if s := d.String(); s != "mode=fallback reason=0x03030000 peer_diagnosis=0x03010000" {
		t.Fatalf("String() = %q", s)
	}
	d = newSMCDiag(smcnl.Socket{Mode: smcnl.ModeSMCD})
	if d.HasFallback || d.Mode != smcDiagModeSMCD || d.String() != "mode=smcd reason=0x00000000 peer_diagnosis=0x00000000" {
		t.Fatalf("SMC-D without the fallback attribute: %+v %q", d, d.String())
	}
}
