// Package synopt marks the TCP handshakes of SMC-D connections with the SMC
// experimental TCP option (kind 254, ExID 0xE2D4C3D9), as Linux's SMC does,
// so that a peer without it is plain TCP from the first byte: no CLC message
// is ever sent to it.
//
// Ordinary sockets cannot write TCP options, so a BPF sock_ops program
// (prog.go) does it, attached to a cgroup v2 that the process runs in:
//   - active opens of sockets marked before connect (Program.Mark) carry the
//     option in the SYN, and the SYN-ACK is searched for it;
//   - passive opens on listeners marked before listen echo it in the SYN-ACK
//     only when the SYN had it;
//   - each connection's outcome is kept in a map by socket cookie
//     (SO_COOKIE), read back once by Program.Result.
//
// This file has what needs no kernel: the option's bytes, a parser for TCP
// headers (the saved SYN) and the decision table.
package synopt

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The SMC experimental option (RFC 6994 format; Linux include/net/tcp.h
// TCPOPT_SMC_MAGIC, TCPOLEN_EXP_SMC_BASE).
const (
	OptKind  = 254
	OptLen   = 6
	OptMagic = 0xE2D4C3D9
)

// Option returns the option as it goes into a TCP header.
func Option() [OptLen]byte {
	var b [OptLen]byte
	b[0], b[1] = OptKind, OptLen
	binary.BigEndian.PutUint32(b[2:], OptMagic)
	return b
}

// ErrOptions reports TCP options that cannot be parsed.
var ErrOptions = errors.New("synopt: malformed TCP options")

// HasOption reports whether the TCP options opts (the bytes after the 20-byte
// fixed header) carry the SMC option. It follows Linux's tcp_parse_options
// and smc_parse_options: NOP and EOL, every other option has a length of at
// least 2 that fits, and the SMC option has kind 254, an even length of at
// least 6 and the magic. A malformed list is an error, as the kernel stops
// parsing it.
func HasOption(opts []byte) (bool, error) {
	found := false
	for i := 0; i < len(opts); {
		switch opts[i] {
		case 0: // EOL
			return found, nil
		case 1: // NOP
			i++
			continue
		}
		if len(opts)-i < 2 {
			return found, fmt.Errorf("%w: option %d at %d has no length", ErrOptions, opts[i], i)
		}
		n := int(opts[i+1])
		if n < 2 || n > len(opts)-i {
			return found, fmt.Errorf("%w: option %d at %d has length %d of %d left", ErrOptions, opts[i], i, n, len(opts)-i)
		}
		if opts[i] == OptKind && n >= OptLen && n%2 == 0 && binary.BigEndian.Uint32(opts[i+2:]) == OptMagic {
			found = true
		}
		i += n
	}
	return found, nil
}

// TCPHeaderOptions returns the options of a TCP header (data offset checked).
func TCPHeaderOptions(tcp []byte) ([]byte, error) {
	if len(tcp) < 20 {
		return nil, fmt.Errorf("%w: TCP header of %d bytes", ErrOptions, len(tcp))
	}
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || doff > len(tcp) {
		return nil, fmt.Errorf("%w: data offset %d in %d bytes", ErrOptions, doff, len(tcp))
	}
	return tcp[20:doff], nil
}

// SYNHasOption parses a SYN as TCP_SAVED_SYN returns it (the IPv4 or IPv6
// header, then the TCP header) and reports whether it carries the SMC option.
func SYNHasOption(syn []byte) (bool, error) {
	if len(syn) < 1 {
		return false, fmt.Errorf("%w: empty SYN", ErrOptions)
	}
	var ipLen int
	switch syn[0] >> 4 {
	case 4:
		ipLen = int(syn[0]&0x0f) * 4
		if ipLen < 20 || len(syn) < ipLen || syn[9] != 6 {
			return false, fmt.Errorf("%w: IPv4 header (ihl %d, %d bytes)", ErrOptions, ipLen, len(syn))
		}
	case 6:
		// Extension headers are not followed: a SYN with them is treated
		// as malformed, which callers read as "no option".
		ipLen = 40
		if len(syn) < ipLen || syn[6] != 6 {
			return false, fmt.Errorf("%w: IPv6 header (%d bytes, next header %d)", ErrOptions, len(syn), syn[min(6, len(syn)-1)])
		}
	default:
		return false, fmt.Errorf("%w: IP version %d", ErrOptions, syn[0]>>4)
	}
	tcp := syn[ipLen:]
	opts, err := TCPHeaderOptions(tcp)
	if err != nil {
		return false, err
	}
	if tcp[13]&0x02 == 0 {
		return false, fmt.Errorf("%w: not a SYN (flags %#02x)", ErrOptions, tcp[13])
	}
	return HasOption(opts)
}

// Record bits, as the BPF program stores them (a u32 per socket cookie).
const (
	RecSent   = 1 << 0 // active: our SYN carried the option
	RecPeer   = 1 << 1 // the peer's SYN-ACK (active) or SYN (passive) carried it
	RecDone   = 1 << 2 // the handshake completed under the program
	RecNoSYN  = 1 << 3 // passive: no saved SYN (SYN cookies), option unknown, not echoed
	RecActive = 1 << 4 // active open
)

// Record is what the program saw of one connection's handshake.
type Record struct {
	Cookie uint64
	Found  bool   // the program left a record for this socket
	Bits   uint32 // Rec* bits
	// SavedSYN is set on the passive side when the kernel kept the SYN
	// (TCP_SAVED_SYN); SYNOption is then what the Go parser found in it, a
	// cross-check of the program's RecPeer.
	SavedSYN  bool
	SYNOption bool
}

func (r Record) has(b uint32) bool { return r.Found && r.Bits&b != 0 }

// Sent reports whether our SYN carried the option (active side).
func (r Record) Sent() bool { return r.has(RecSent) }

// Peer reports whether the peer's handshake segment carried it.
func (r Record) Peer() bool { return r.has(RecPeer) }

func (r Record) String() string {
	if !r.Found {
		return "no record"
	}
	s := fmt.Sprintf("sent=%v peer=%v", r.Sent(), r.Peer())
	if r.Bits&RecDone == 0 {
		s += " incomplete"
	}
	if r.Bits&RecNoSYN != 0 {
		s += " syn-not-saved"
	}
	if r.SavedSYN {
		s += fmt.Sprintf(" saved-syn-option=%v", r.SYNOption)
	}
	return s
}

// Why a connection is plain TCP.
var (
	// ErrPeerNoSMC: the SYN-ACK (Dial) or SYN (Listen) had no SMC option.
	ErrPeerNoSMC = errors.New("peer did not offer SMC (no SMC option in its handshake)")
	// ErrNotSent: our SYN could not carry the option (no room in the header).
	ErrNotSent = errors.New("SMC option not sent in our SYN")
	// ErrNoRecord: the program did not see this connection (a socket
	// outside the cgroup it is attached to, or a record evicted).
	ErrNoRecord = errors.New("no SMC option record for this connection")
	// ErrSYNNotSaved: a passive open whose SYN the kernel did not keep (SYN
	// cookies); the option was not echoed, so the client sees plain TCP.
	ErrSYNNotSaved = errors.New("SYN not saved (SYN cookies): SMC option not echoed")
)

// Decide returns nil when both handshake segments carried the option and CLC
// may run, or why the connection is plain TCP. active is the Dial side.
func Decide(active bool, r Record) error {
	switch {
	case !r.Found || r.Bits&RecDone == 0:
		return ErrNoRecord
	case active && r.Bits&RecActive == 0, !active && r.Bits&RecActive != 0:
		return fmt.Errorf("%w (record of the other direction: %#x)", ErrNoRecord, r.Bits)
	case active && !r.Sent():
		return ErrNotSent
	case !active && r.Bits&RecNoSYN != 0:
		return ErrSYNNotSaved
	case !r.Peer():
		return ErrPeerNoSMC
	}
	return nil
}
