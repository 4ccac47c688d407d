package main

// The kernel's own view of its AF_SMC sockets, from smc_diag (through
// guestdriver/smcnl, which owns the request and the parsing): whether a
// connection fell back to TCP, why, and the peer's decline code.

import (
	"fmt"

	"github.com/ism-backend/ism-backend/guestdriver/smcnl"
)

// include/uapi/linux/smc_diag.h, SMC_DIAG_MODE_*
const (
	smcDiagModeFallback = uint8(smcnl.ModeFallbackTCP)
	smcDiagModeSMCD     = uint8(smcnl.ModeSMCD)
)

// smcDiag is what the scenarios report of one socket; Socket has the rest.
type smcDiag struct {
	State, Mode           uint8
	SPort, DPort          uint16
	Reason, PeerDiagnosis uint32
	HasFallback           bool
	Socket                smcnl.Socket
}

// String is the scenarios' report format (test/vm matches
// "mode=fallback reason=<code> ").
func (d smcDiag) String() string {
	mode := map[uint8]string{0: "smcr", 1: "fallback", 2: "smcd"}[d.Mode]
	return fmt.Sprintf("mode=%s reason=%#08x peer_diagnosis=%#08x", mode, d.Reason, d.PeerDiagnosis)
}

func newSMCDiag(s smcnl.Socket) smcDiag {
	d := smcDiag{State: s.State, Mode: uint8(s.Mode), SPort: s.Local.Port(), DPort: s.Peer.Port(), Socket: s}
	if s.Fallback != nil {
		d.Reason, d.PeerDiagnosis, d.HasFallback = s.Fallback.Reason, s.Fallback.PeerDiagnosis, true
	}
	return d
}

// smcDiagDump lists the kernel's AF_SMC sockets.
func smcDiagDump() ([]smcDiag, error) {
	socks, err := smcnl.Sockets()
	if err != nil {
		return nil, err
	}
	out := make([]smcDiag, len(socks))
	for i, s := range socks {
		out[i] = newSMCDiag(s)
	}
	return out, nil
}

// smcDiagOf finds the kernel's AF_SMC socket with these ports.
func smcDiagOf(sport, dport int) (smcDiag, error) {
	all, err := smcDiagDump()
	if err != nil {
		return smcDiag{}, err
	}
	for _, d := range all {
		if int(d.SPort) == sport && int(d.DPort) == dport {
			return d, nil
		}
	}
	return smcDiag{}, fmt.Errorf("smc_diag: no AF_SMC socket %d->%d among %d", sport, dport, len(all))
}
