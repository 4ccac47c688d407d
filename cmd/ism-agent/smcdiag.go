package main

// The kernel's own view of its AF_SMC sockets, from smc_diag (through
// guestdriver/smcnl): whether a connection fell back to TCP, why, and the
// peer's decline code.

import (
	"fmt"

	"github.com/ism-backend/ism-backend/guestdriver/smcnl"
)

// kernelView formats a socket as the scenarios report it (test/vm matches
// "mode=fallback reason=<code> ").
func kernelView(s smcnl.Socket) string {
	mode := map[smcnl.Mode]string{smcnl.ModeSMCR: "smcr", smcnl.ModeFallbackTCP: "fallback", smcnl.ModeSMCD: "smcd"}[s.Mode]
	var fb smcnl.Fallback
	if s.Fallback != nil {
		fb = *s.Fallback
	}
	return fmt.Sprintf("mode=%s reason=%#08x peer_diagnosis=%#08x", mode, fb.Reason, fb.PeerDiagnosis)
}

// smcDiagOf finds the kernel's AF_SMC socket with these ports.
func smcDiagOf(sport, dport int) (smcnl.Socket, error) {
	all, err := smcnl.Sockets()
	if err != nil {
		return smcnl.Socket{}, err
	}
	for _, s := range all {
		if int(s.Local.Port()) == sport && int(s.Peer.Port()) == dport {
			return s, nil
		}
	}
	return smcnl.Socket{}, fmt.Errorf("smc_diag: no AF_SMC socket %d->%d among %d", sport, dport, len(all))
}
