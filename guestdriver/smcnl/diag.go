package smcnl

// The kernel's AF_SMC sockets from smc_diag (sock_diag netlink, what smcss
// uses): mode, fallback reason and the peer's decline code, and for SMC-D
// the DMB tokens and GIDs.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// From include/uapi/linux/smc_diag.h.
const (
	diagConnInfo = 1 // SMC_DIAG_CONNINFO: struct smc_diag_conninfo
	diagShutdown = 3 // SMC_DIAG_SHUTDOWN: u8
	diagDMBInfo  = 4 // SMC_DIAG_DMBINFO: struct smcd_diag_dmbinfo
	diagFallback = 5 // SMC_DIAG_FALLBACK: {u32 reason, u32 peer_diagnosis}

	diagReqLen = 4 + 48         // struct smc_diag_req: family, pad[2], ext, inet_diag_sockid
	diagMsgLen = 4 + 48 + 4 + 8 // struct smc_diag_msg: ..., id, uid, inode (8-aligned at 56)
	// struct smcd_diag_dmbinfo: linkid u32 (then padding), peer_gid,
	// my_gid, token, peer_token; kernels since 6.9 add the two _ext GIDs.
	dmbInfoLenV1 = 40
	dmbInfoLen   = 56
	connInfoLen  = 16 // the part of struct smc_diag_conninfo read here
)

// Mode is how an SMC socket carries its data.
type Mode uint8

// SMC_DIAG_MODE_*
const (
	ModeSMCR        Mode = 0
	ModeFallbackTCP Mode = 1
	ModeSMCD        Mode = 2
)

func (m Mode) String() string {
	switch m {
	case ModeSMCR:
		return "SMCR"
	case ModeFallbackTCP:
		return "TCP"
	case ModeSMCD:
		return "SMCD"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// Socket is one AF_SMC socket as smc_diag reports it.
type Socket struct {
	State    uint8 // enum smc_state: StateName
	Mode     Mode
	Shutdown uint8 // SHUT_RD/SHUT_WR bits: 1 receive, 2 send
	// Local and Peer are the addresses of the TCP connection SMC runs on.
	Local, Peer netip.AddrPort
	Interface   uint32 // bound interface index, 0 for none
	UID         uint32
	Inode       uint64
	// Fallback is the reason SMC fell back to TCP (a CLC decline code, 0
	// while SMC holds) and the peer's diagnosis; nil from kernels without
	// SMC_DIAG_FALLBACK.
	Fallback *Fallback
	Conn     *ConnInfo // nil before a connection exists
	DMB      *DMBInfo  // SMC-D connections only
}

// Fallback is SMC_DIAG_FALLBACK.
type Fallback struct {
	Reason, PeerDiagnosis uint32
}

// ConnInfo is the start of SMC_DIAG_CONNINFO.
type ConnInfo struct {
	Token        uint32 // the connection's alert token
	SndBufSize   uint32
	RMBESize     uint32 // our receive buffer (DMB element)
	PeerRMBESize uint32
}

// DMBInfo is SMC_DIAG_DMBINFO: an SMC-D connection's link group and DMBs.
type DMBInfo struct {
	LinkID              uint32
	GID, GIDExt         uint64 // ours
	PeerGID, PeerGIDExt uint64
	Token               uint64 // our DMB
	PeerToken           uint64 // the peer's DMB we write into
}

// StateName names an SMC socket state (enum smc_state in net/smc/smc.h) as
// smcss does.
func StateName(s uint8) string {
	switch s {
	case 1:
		return "ACTIVE"
	case 2:
		return "INIT"
	case 7:
		return "CLOSED"
	case 10:
		return "LISTEN"
	case 20:
		return "PEERCLW1"
	case 21:
		return "PEERCLW2"
	case 22:
		return "APPCLW1"
	case 23:
		return "APPCLW2"
	case 24:
		return "APPFINCLW"
	case 25:
		return "PEERFINCLW"
	case 26:
		return "PEERABORTW"
	case 27:
		return "PROCESSABORT"
	}
	return fmt.Sprintf("state(%d)", s)
}

// declineText is the kernel's SMC_CLC_DECL_* table (net/smc/smc_clc.h).
var declineText = map[uint32]string{
	0x01010000: "insufficient memory resources",
	0x02010000: "timeout waiting for QP confirm link",
	0x02020000: "timeout waiting for QP add link",
	0x03000000: "configuration error",
	0x03010000: "peer did not indicate SMC",
	0x03020000: "IPsec usage",
	0x03030000: "no SMC device found (R or D)",
	0x03030001: "no SMC-D device found",
	0x03030002: "no SMC-R device found",
	0x03030003: "hardware has no ISMv2 support",
	0x03030004: "peer sent no CLC v2 extension",
	0x03030005: "peer sent no CLC SMC-Dv2 extension",
	0x03030006: "peer sent no SEID",
	0x03030007: "no SMC-Dv2 device found",
	0x03030008: "peer sent no UEID",
	0x03030009: "release version negotiation failed",
	0x0303000a: "max connections negotiation failed",
	0x0303000b: "max links negotiation failed",
	0x03040000: "SMC modes do not match (R or D)",
	0x03050000: "peer has eyecatcher in RMBE",
	0x03060000: "fastopen sockopt not supported",
	0x03070000: "IP prefix / subnet mismatch",
	0x03080000: "error getting VLAN id of IP device",
	0x03090000: "error registering VLAN id on ISM device",
	0x030a0000: "no active SMC-R link in link group",
	0x030b0000: "SMC-R link from server not found",
	0x030c0000: "SMC version mismatch",
	0x030d0000: "SMC-D DMB limit exceeded",
	0x030e0000: "SMC-Rv2 connection: no route to peer",
	0x030f0000: "SMC-Rv2 connection: indirect mismatch",
	0x04000000: "synchronization error",
	0x05000000: "peer declined during handshake",
	0x09990000: "internal error",
	0x09990001: "rtoken handling failed",
	0x09990002: "ib ready link failed",
	0x09990003: "register RDMA buffers failed",
}

// DeclineText says what a CLC decline (fallback reason) code means, per the
// kernel's table; "" for 0 and unknown codes.
func DeclineText(code uint32) string { return declineText[code] }

// Sockets lists the kernel's AF_SMC sockets.
func Sockets() ([]Socket, error) {
	c, err := dial(unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("smc_diag: %w", err)
	}
	defer c.close()
	msgs, err := c.execute(unix.SOCK_DIAG_BY_FAMILY, unix.NLM_F_DUMP, encodeDiagRequest())
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			err = fmt.Errorf("%w (is smc_diag loaded?)", err)
		}
		return nil, fmt.Errorf("smc_diag: %w", err)
	}
	out := make([]Socket, 0, len(msgs))
	for _, m := range msgs {
		s, err := decodeSocket(m.Data)
		if err != nil {
			return nil, fmt.Errorf("smc_diag: %w", err)
		}
		out = append(out, s)
	}
	return out, nil
}

// encodeDiagRequest is struct smc_diag_req for every AF_SMC socket, with
// the extensions decoded here.
func encodeDiagRequest() []byte {
	r := make([]byte, diagReqLen)
	r[0] = unix.AF_SMC
	r[3] = 1<<(diagConnInfo-1) | 1<<(diagDMBInfo-1) | 1<<(diagFallback-1)
	// id: all zero but the cookie, which is INET_DIAG_NOCOOKIE
	binary.NativeEndian.PutUint32(r[4+40:], ^uint32(0))
	binary.NativeEndian.PutUint32(r[4+44:], ^uint32(0))
	return r
}

// decodeSocket reads one struct smc_diag_msg and its attributes.
func decodeSocket(b []byte) (Socket, error) {
	if len(b) < diagMsgLen {
		return Socket{}, fmt.Errorf("message of %d bytes, want %d", len(b), diagMsgLen)
	}
	s := Socket{
		State:     b[1],
		Mode:      Mode(b[2]),
		Shutdown:  b[3],
		Interface: binary.NativeEndian.Uint32(b[4+36:]),
		UID:       binary.NativeEndian.Uint32(b[4+48:]),
		Inode:     binary.NativeEndian.Uint64(b[4+48+4:]),
	}
	sport, dport := binary.BigEndian.Uint16(b[4:]), binary.BigEndian.Uint16(b[6:])
	src, dst := [16]byte(b[8:24]), [16]byte(b[24:40])
	// AF_SMC sockets report AF_SMC: the kernel writes an IPv4 address
	// (SMCPROTO_SMC) into the first word and leaves the rest zero.
	v4 := b[0] == unix.AF_INET || (b[0] != unix.AF_INET6 && zero(src[4:]) && zero(dst[4:]))
	if v4 {
		s.Local = netip.AddrPortFrom(netip.AddrFrom4([4]byte(src[:4])), sport)
		s.Peer = netip.AddrPortFrom(netip.AddrFrom4([4]byte(dst[:4])), dport)
	} else {
		s.Local = netip.AddrPortFrom(netip.AddrFrom16(src), sport)
		s.Peer = netip.AddrPortFrom(netip.AddrFrom16(dst), dport)
	}
	attrs, err := parseAttrs(b[diagMsgLen:])
	if err != nil {
		return s, err
	}
	for _, a := range attrs {
		d := a.Data
		switch a.Type {
		case diagShutdown:
			if len(d) != 1 {
				return s, fmt.Errorf("shutdown attribute of %d bytes", len(d))
			}
			s.Shutdown = d[0]
		case diagFallback:
			if len(d) < 8 {
				return s, fmt.Errorf("fallback attribute of %d bytes", len(d))
			}
			s.Fallback = &Fallback{Reason: binary.NativeEndian.Uint32(d), PeerDiagnosis: binary.NativeEndian.Uint32(d[4:])}
		case diagConnInfo:
			if len(d) < connInfoLen {
				return s, fmt.Errorf("connection attribute of %d bytes", len(d))
			}
			s.Conn = &ConnInfo{
				Token:        binary.NativeEndian.Uint32(d),
				SndBufSize:   binary.NativeEndian.Uint32(d[4:]),
				RMBESize:     binary.NativeEndian.Uint32(d[8:]),
				PeerRMBESize: binary.NativeEndian.Uint32(d[12:]),
			}
		case diagDMBInfo:
			if len(d) < dmbInfoLenV1 {
				return s, fmt.Errorf("DMB attribute of %d bytes", len(d))
			}
			m := &DMBInfo{
				LinkID:    binary.NativeEndian.Uint32(d),
				PeerGID:   binary.NativeEndian.Uint64(d[8:]),
				GID:       binary.NativeEndian.Uint64(d[16:]),
				Token:     binary.NativeEndian.Uint64(d[24:]),
				PeerToken: binary.NativeEndian.Uint64(d[32:]),
			}
			if len(d) >= dmbInfoLen {
				m.PeerGIDExt = binary.NativeEndian.Uint64(d[40:])
				m.GIDExt = binary.NativeEndian.Uint64(d[48:])
			}
			s.DMB = m
		}
	}
	return s, nil
}

func zero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
