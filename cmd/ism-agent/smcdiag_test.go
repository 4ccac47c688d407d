package main

import (
	"net/netip"
	"testing"

	"github.com/ism-backend/ism-backend/guestdriver/smcnl"
)

func TestKernelView(t *testing.T) {
	s := smcnl.Socket{Mode: smcnl.ModeFallbackTCP, Local: netip.MustParseAddrPort("169.254.7.1:7000"),
		Fallback: &smcnl.Fallback{Reason: 0x03030000, PeerDiagnosis: 0x03010000}}
	if got := kernelView(s); got != "mode=fallback reason=0x03030000 peer_diagnosis=0x03010000" {
		t.Fatalf("kernelView = %q", got)
	}
	s = smcnl.Socket{Mode: smcnl.ModeSMCD}
	if got := kernelView(s); got != "mode=smcd reason=0x00000000 peer_diagnosis=0x00000000" {
		t.Fatalf("kernelView = %q", got)
	}
}
