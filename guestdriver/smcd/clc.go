package smcd

// CLC: the SMC connection-layer-control handshake carried over the TCP
// connection before data moves to the DMBs. Only what SMC-D version 1 needs is
// implemented: Proposal (IPv4 and IPv6 prefixes), Accept and Confirm (SMC-D
// layout), and Decline (v1, and v2 on receipt). All fields are big-endian.
//
// Layouts follow Linux net/smc/smc_clc.h: struct smc_clc_msg_hdr,
// smc_clc_msg_proposal, smc_clc_msg_smcd, smc_clc_msg_proposal_prefix,
// smc_clc_ipv6_prefix, smc_clc_msg_accept_confirm (d0/d1),
// smc_clc_msg_decline and smc_clc_msg_decline_v2.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// CLC message types (SMC_CLC_PROPOSAL..SMC_CLC_DECLINE).
const (
	CLCProposal uint8 = 1
	CLCAccept   uint8 = 2
	CLCConfirm  uint8 = 3
	CLCDecline  uint8 = 4
)

// SMC types in the header's typev1/typev2 fields (SMC_TYPE_R..SMC_TYPE_B).
const (
	SMCTypeR uint8 = 0
	SMCTypeD uint8 = 1
	SMCTypeN uint8 = 2
	SMCTypeB uint8 = 3
)

// Eyecatchers: "SMCR" and "SMCD" in EBCDIC. Linux sends Proposal and Decline
// with SMCR and SMC-D Accept/Confirm with SMCD, and accepts either anywhere.
var (
	EyecatcherR = [4]byte{0xE2, 0xD4, 0xC3, 0xD9}
	EyecatcherD = [4]byte{0xE2, 0xD4, 0xC3, 0xC4}
)

// Decline diagnosis codes (SMC_CLC_DECL_*) this stack sends or understands.
const (
	DeclineMem         uint32 = 0x01010000 // SMC_CLC_DECL_MEM: out of memory
	DeclineTimeout     uint32 = 0x02000000 // SMC_CLC_DECL_TIMEOUT (older Linux): CLC wait timed out
	DeclineCnfErr      uint32 = 0x03000000 // SMC_CLC_DECL_CNFERR: configuration error; we also use it for a malformed CLC message
	DeclinePeerNoSMC   uint32 = 0x03010000 // SMC_CLC_DECL_PEERNOSMC
	DeclineNoSMCDev    uint32 = 0x03030000 // SMC_CLC_DECL_NOSMCDEV
	DeclineNoSMCDDev   uint32 = 0x03030001 // SMC_CLC_DECL_NOSMCDDEV: no common CHID, or peer GID unreachable
	DeclineModeUnsupp  uint32 = 0x03040000 // SMC_CLC_DECL_MODEUNSUPP: peer offered no SMC-D
	DeclineDiffPrefix  uint32 = 0x03070000 // SMC_CLC_DECL_DIFFPREFIX
	DeclineVersMismat  uint32 = 0x030c0000 // SMC_CLC_DECL_VERSMISMAT
	DeclineMaxDMB      uint32 = 0x030d0000 // SMC_CLC_DECL_MAX_DMB: DMB limit reached
	DeclineSyncErr     uint32 = 0x04000000 // SMC_CLC_DECL_SYNCERR
	DeclinePeerDecline uint32 = 0x05000000 // SMC_CLC_DECL_PEERDECL
	DeclineIntErr      uint32 = 0x09990000 // SMC_CLC_DECL_INTERR
)

// Sizes of the fixed parts.
const (
	clcHeaderLen   = 8  // struct smc_clc_msg_hdr
	clcTrailerLen  = 4  // struct smc_clc_msg_trail
	clcLocalLen    = 30 // struct smc_clc_msg_local: id_for_peer[8], gid[16], mac[6]
	clcSMCDAreaLen = 40 // struct smc_clc_msg_smcd
	clcPrefixLen   = 8  // struct smc_clc_msg_proposal_prefix
	clcIPv6PfxLen  = 17 // struct smc_clc_ipv6_prefix (packed)
	clcMaxIPv6Pfx  = 8  // SMC_CLC_MAX_V6_PREFIX

	// ProposalLenV4 is a v1 SMC-D Proposal with an IPv4 prefix:
	// hdr 8 + local 30 + iparea_offset 2 + smcd 40 + prefix 8 + trailer 4.
	ProposalLenV4 = clcHeaderLen + clcLocalLen + 2 + clcSMCDAreaLen + clcPrefixLen + clcTrailerLen
	// AcceptConfirmLen is SMCD_CLC_ACCEPT_CONFIRM_LEN (v1).
	AcceptConfirmLen = 48
	// DeclineLen and DeclineLenV2 are sizeof(struct smc_clc_msg_decline) and
	// sizeof(struct smc_clc_msg_decline_v2).
	DeclineLen   = 28
	DeclineLenV2 = 44

	// clcMaxLen bounds what ReadCLC accepts: large enough for a Linux v2
	// Proposal (which we then decline), small enough to bound memory.
	clcMaxLen = 1024
)

// byte 7 of the header: version (4 bits), typev2 (2 bits), typev1 (2 bits).
// SMC_FIRST_CONTACT_MASK (0b10 in typev2) is 0x08 in the byte: first contact
// in Accept/Confirm, out-of-sync in Decline.
const clcFlagFirstContact = 0x08

// ErrCLC is wrapped by every CLC decoding error.
var ErrCLC = errors.New("smcd: malformed CLC message")

// ErrCLCVersion is returned for a well-formed SMC v2 message that this v1
// stack does not speak (answered with DeclineVersMismat).
var ErrCLCVersion = errors.New("smcd: unsupported CLC version")

func clcErr(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrCLC, fmt.Sprintf(format, a...))
}

func validEyecatcher(b []byte) bool {
	return [4]byte(b[:4]) == EyecatcherR || [4]byte(b[:4]) == EyecatcherD
}

// clcHeader is the decoded struct smc_clc_msg_hdr.
type clcHeader struct {
	Type    uint8
	Length  uint16
	Version uint8
	TypeV2  uint8
	TypeV1  uint8
}

func putHeader(b []byte, eye [4]byte, typ uint8, length int, version, typev2, typev1 uint8) {
	copy(b[0:4], eye[:])
	b[4] = typ
	binary.BigEndian.PutUint16(b[5:7], uint16(length))
	b[7] = version<<4 | (typev2&3)<<2 | typev1&3
}

func putTrailer(b []byte, eye [4]byte) { copy(b[len(b)-clcTrailerLen:], eye[:]) }

// checkFrame checks what every CLC message shares: eyecatchers at both ends,
// the type, and that the length field is exactly len(b).
func checkFrame(b []byte, typ uint8) (clcHeader, error) {
	if len(b) < clcHeaderLen+clcTrailerLen {
		return clcHeader{}, clcErr("%d bytes is shorter than header and trailer", len(b))
	}
	if !validEyecatcher(b) {
		return clcHeader{}, clcErr("bad eyecatcher % x", b[:4])
	}
	h := clcHeader{
		Type:    b[4],
		Length:  binary.BigEndian.Uint16(b[5:7]),
		Version: b[7] >> 4,
		TypeV2:  b[7] >> 2 & 3,
		TypeV1:  b[7] & 3,
	}
	if h.Type != typ {
		return h, clcErr("type %d, want %d", h.Type, typ)
	}
	if int(h.Length) != len(b) {
		return h, clcErr("length field %d but message is %d bytes", h.Length, len(b))
	}
	if !validEyecatcher(b[len(b)-clcTrailerLen:]) {
		return h, clcErr("bad trailer % x", b[len(b)-clcTrailerLen:])
	}
	return h, nil
}

// IPv6Prefix is struct smc_clc_ipv6_prefix.
type IPv6Prefix struct {
	Prefix [16]byte
	Len    uint8
}

// Proposal is a v1 CLC Proposal (struct smc_clc_msg_proposal followed by
// struct smc_clc_msg_smcd, struct smc_clc_msg_proposal_prefix, the IPv6
// prefixes and the trailer).
type Proposal struct {
	TypeV1  uint8    // SMCTypeD for this stack
	PeerID  [8]byte  // id_for_peer; Linux fills it only when SMC-R is offered
	RoCEGID [16]byte // SMC-R only
	MAC     [6]byte  // SMC-R only
	// SMC-D area, present when SMCDArea (iparea_offset 40).
	SMCDArea bool
	GID      uint64
	CHID     uint16
	// IP prefix area.
	Subnet       [4]byte // IPv4 outgoing subnet (masked), zero for IPv6
	PrefixLen    uint8
	IPv6Prefixes []IPv6Prefix
}

// Len is the encoded length.
func (p *Proposal) Len() int {
	n := clcHeaderLen + clcLocalLen + 2 + clcPrefixLen + len(p.IPv6Prefixes)*clcIPv6PfxLen + clcTrailerLen
	if p.SMCDArea {
		n += clcSMCDAreaLen
	}
	return n
}

// Encode returns the Proposal's bytes, laid out as Linux sends them.
func (p *Proposal) Encode() ([]byte, error) {
	if len(p.IPv6Prefixes) > clcMaxIPv6Pfx {
		return nil, fmt.Errorf("smcd: %d IPv6 prefixes, at most %d", len(p.IPv6Prefixes), clcMaxIPv6Pfx)
	}
	if p.TypeV1 > SMCTypeB || p.TypeV1 == SMCTypeN {
		return nil, fmt.Errorf("smcd: proposal typev1 %d", p.TypeV1)
	}
	if (p.TypeV1 == SMCTypeD || p.TypeV1 == SMCTypeB) && !p.SMCDArea {
		return nil, errors.New("smcd: proposal offers SMC-D without the SMC-D area")
	}
	b := make([]byte, p.Len())
	// A version-1 kernel leaves the typev2 bits (its flag and reserved
	// bits) zero.
	putHeader(b, EyecatcherR, CLCProposal, len(b), 1, 0, p.TypeV1)
	o := clcHeaderLen
	o += copy(b[o:], p.PeerID[:])
	o += copy(b[o:], p.RoCEGID[:])
	o += copy(b[o:], p.MAC[:])
	if p.SMCDArea {
		binary.BigEndian.PutUint16(b[o:], clcSMCDAreaLen) // iparea_offset
		o += 2
		binary.BigEndian.PutUint64(b[o:], p.GID)
		binary.BigEndian.PutUint16(b[o+8:], p.CHID)
		// v2_ext_offset, vendor_oui, vendor_exp_options, reserved: zero in v1.
		o += clcSMCDAreaLen
	} else {
		o += 2
	}
	copy(b[o:], p.Subnet[:])
	b[o+4] = p.PrefixLen
	b[o+7] = uint8(len(p.IPv6Prefixes))
	o += clcPrefixLen
	for _, x := range p.IPv6Prefixes {
		copy(b[o:], x.Prefix[:])
		b[o+16] = x.Len
		o += clcIPv6PfxLen
	}
	putTrailer(b, EyecatcherR)
	return b, nil
}

// DecodeProposal parses a v1 Proposal strictly: the length field must match
// iparea_offset and the IPv6 prefix count exactly, as Linux's
// smc_clc_msg_prop_valid demands.
func DecodeProposal(b []byte) (*Proposal, error) {
	h, err := checkFrame(b, CLCProposal)
	if err != nil {
		return nil, err
	}
	// Linux >= 5.10 sends version 2 even when it offers only v1
	// (typev2 N); the layout is then the v1 layout with the SMC-D area.
	switch {
	case h.Version == 1:
	case h.Version >= 2 && h.TypeV2 == SMCTypeN:
	default:
		return nil, fmt.Errorf("%w: proposal version %d offering v2 type %d", ErrCLCVersion, h.Version, h.TypeV2)
	}
	if h.TypeV1 == SMCTypeN {
		return nil, clcErr("v1 proposal offers neither SMC-R nor SMC-D")
	}
	const fixed = clcHeaderLen + clcLocalLen + 2
	if len(b) < fixed+clcPrefixLen+clcTrailerLen {
		return nil, clcErr("proposal of %d bytes is too short", len(b))
	}
	p := &Proposal{TypeV1: h.TypeV1}
	o := clcHeaderLen
	o += copy(p.PeerID[:], b[o:])
	o += copy(p.RoCEGID[:], b[o:])
	o += copy(p.MAC[:], b[o:])
	ipOff := int(binary.BigEndian.Uint16(b[o:]))
	o += 2
	smcd := h.TypeV1 == SMCTypeD || h.TypeV1 == SMCTypeB
	switch {
	case smcd && ipOff != clcSMCDAreaLen:
		return nil, clcErr("SMC-D proposal with iparea_offset %d, want %d", ipOff, clcSMCDAreaLen)
	case !smcd && ipOff != 0 && ipOff != clcSMCDAreaLen:
		return nil, clcErr("iparea_offset %d", ipOff)
	}
	if len(b) < fixed+ipOff+clcPrefixLen+clcTrailerLen {
		return nil, clcErr("proposal of %d bytes is too short for iparea_offset %d", len(b), ipOff)
	}
	if ipOff == clcSMCDAreaLen {
		p.SMCDArea = true
		p.GID = binary.BigEndian.Uint64(b[o:])
		p.CHID = binary.BigEndian.Uint16(b[o+8:])
		if v2 := binary.BigEndian.Uint16(b[o+10:]); v2 != 0 {
			return nil, clcErr("v1 proposal with v2 extension offset %d", v2)
		}
	}
	o += ipOff
	copy(p.Subnet[:], b[o:])
	p.PrefixLen = b[o+4]
	n6 := int(b[o+7])
	o += clcPrefixLen
	if want := o + n6*clcIPv6PfxLen + clcTrailerLen; want != len(b) {
		return nil, clcErr("length %d does not match %d IPv6 prefixes (want %d)", len(b), n6, want)
	}
	if n6 > clcMaxIPv6Pfx {
		return nil, clcErr("%d IPv6 prefixes, at most %d", n6, clcMaxIPv6Pfx)
	}
	if n6 == 0 && p.PrefixLen > 32 {
		return nil, clcErr("IPv4 prefix length %d", p.PrefixLen)
	}
	for i := 0; i < n6; i++ {
		var x IPv6Prefix
		copy(x.Prefix[:], b[o:o+16])
		x.Len = b[o+16]
		if x.Len > 128 {
			return nil, clcErr("IPv6 prefix length %d", x.Len)
		}
		p.IPv6Prefixes = append(p.IPv6Prefixes, x)
		o += clcIPv6PfxLen
	}
	return p, nil
}

// AcceptConfirm is a v1 SMC-D Accept or Confirm (struct
// smc_clc_msg_accept_confirm with the d0 part; d1 is reserved in v1).
type AcceptConfirm struct {
	Type         uint8 // CLCAccept or CLCConfirm
	FirstContact bool
	GID          uint64 // sender's ISM GID
	Token        uint64 // sender's DMB token
	DMBEIndex    uint8  // Linux sends 0
	DMBESize     uint8  // size code: DMB bytes = 1 << (code+14)
	LinkID       uint32
}

// Encode returns the 48 bytes Linux's smc_clc_send_confirm_accept sends for
// SMC-D v1.
func (a *AcceptConfirm) Encode() ([]byte, error) {
	if a.Type != CLCAccept && a.Type != CLCConfirm {
		return nil, fmt.Errorf("smcd: accept/confirm type %d", a.Type)
	}
	if a.DMBESize > 15 {
		return nil, fmt.Errorf("smcd: DMBE size code %d does not fit 4 bits", a.DMBESize)
	}
	b := make([]byte, AcceptConfirmLen)
	var typev2 uint8
	if a.FirstContact {
		typev2 = clcFlagFirstContact >> 2
	}
	putHeader(b, EyecatcherD, a.Type, len(b), 1, typev2, SMCTypeD)
	binary.BigEndian.PutUint64(b[8:], a.GID)
	binary.BigEndian.PutUint64(b[16:], a.Token)
	b[24] = a.DMBEIndex
	b[25] = a.DMBESize << 4
	binary.BigEndian.PutUint32(b[28:], a.LinkID)
	putTrailer(b, EyecatcherD)
	return b, nil
}

// DecodeAcceptConfirm parses a v1 SMC-D Accept or Confirm of type typ.
func DecodeAcceptConfirm(b []byte, typ uint8) (*AcceptConfirm, error) {
	if typ != CLCAccept && typ != CLCConfirm {
		return nil, fmt.Errorf("smcd: accept/confirm type %d", typ)
	}
	h, err := checkFrame(b, typ)
	if err != nil {
		return nil, err
	}
	if h.Version != 1 {
		return nil, clcErr("accept/confirm version %d", h.Version)
	}
	if h.TypeV1 != SMCTypeD {
		return nil, clcErr("accept/confirm for SMC type %d, want SMC-D", h.TypeV1)
	}
	if len(b) != AcceptConfirmLen {
		return nil, clcErr("SMC-D accept/confirm of %d bytes, want %d", len(b), AcceptConfirmLen)
	}
	return &AcceptConfirm{
		Type:         typ,
		FirstContact: b[7]&clcFlagFirstContact != 0,
		GID:          binary.BigEndian.Uint64(b[8:]),
		Token:        binary.BigEndian.Uint64(b[16:]),
		DMBEIndex:    b[24],
		DMBESize:     b[25] >> 4,
		LinkID:       binary.BigEndian.Uint32(b[28:]),
	}, nil
}

// Decline is struct smc_clc_msg_decline (v1), or smc_clc_msg_decline_v2 on
// receipt.
type Decline struct {
	Version     uint8 // 1 or 2
	OutOfSync   bool
	PeerID      [8]byte
	Diagnosis   uint32
	OSType      uint8     // high nibble of byte 20; Linux sends 0 in v1
	DiagnosisV2 [4]uint32 // v2 only
}

// Encode returns a v1 Decline (28 bytes) as Linux's smc_clc_send_decline
// builds it for version 1.
func (d *Decline) Encode() ([]byte, error) {
	if d.Version != 0 && d.Version != 1 {
		return nil, fmt.Errorf("smcd: only v1 declines are sent, not v%d", d.Version)
	}
	b := make([]byte, DeclineLen)
	var typev2 uint8
	if d.OutOfSync {
		typev2 = clcFlagFirstContact >> 2
	}
	putHeader(b, EyecatcherR, CLCDecline, len(b), 1, typev2, 0)
	copy(b[8:16], d.PeerID[:])
	binary.BigEndian.PutUint32(b[16:], d.Diagnosis)
	b[20] = d.OSType << 4
	putTrailer(b, EyecatcherR)
	return b, nil
}

// DecodeDecline parses a v1 (28-byte) or v2 (44-byte) Decline.
func DecodeDecline(b []byte) (*Decline, error) {
	h, err := checkFrame(b, CLCDecline)
	if err != nil {
		return nil, err
	}
	d := &Decline{Version: h.Version, OutOfSync: b[7]&clcFlagFirstContact != 0}
	switch {
	case h.Version == 1 && len(b) == DeclineLen:
	case h.Version == 2 && len(b) == DeclineLenV2:
		for i := range d.DiagnosisV2 {
			d.DiagnosisV2[i] = binary.BigEndian.Uint32(b[24+4*i:])
		}
	default:
		return nil, clcErr("decline version %d with %d bytes", h.Version, len(b))
	}
	copy(d.PeerID[:], b[8:16])
	d.Diagnosis = binary.BigEndian.Uint32(b[16:])
	d.OSType = b[20] >> 4
	return d, nil
}

// ReadCLC reads one CLC message from r: it reads the header, checks the
// eyecatcher and that the length is plausible, then reads exactly the rest,
// so no byte after the message is consumed. It returns the message type and
// all its bytes, for the Decode functions; on error, the bytes read so far.
func ReadCLC(r io.Reader) (uint8, []byte, error) {
	var h [clcHeaderLen]byte
	if n, err := io.ReadFull(r, h[:]); err != nil {
		return 0, h[:n], err
	}
	if !validEyecatcher(h[:]) {
		return 0, h[:], clcErr("bad eyecatcher % x", h[:4])
	}
	n := int(binary.BigEndian.Uint16(h[5:7]))
	if n < DeclineLen || n > clcMaxLen {
		return 0, h[:], clcErr("implausible length %d", n)
	}
	b := make([]byte, n)
	copy(b, h[:])
	if _, err := io.ReadFull(r, b[clcHeaderLen:]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, b, err
	}
	return h[4], b, nil
}

// DMBESizeCode returns the CLC size code for a DMB of size bytes, which must
// be a power of two from 16 KiB to 1 MiB.
func DMBESizeCode(size int) (uint8, error) {
	for c := uint8(0); c <= maxDMBESizeCode; c++ {
		if 1<<(c+14) == size {
			return c, nil
		}
	}
	return 0, fmt.Errorf("smcd: DMB size %d is not a power of two in 16 KiB..1 MiB", size)
}

// DMBESize returns the DMB size in bytes for a CLC size code
// (smc_uncompress_bufsize).
func DMBESize(code uint8) (int, error) {
	if code > maxDMBESizeCode {
		return 0, fmt.Errorf("smcd: DMBE size code %d beyond 1 MiB", code)
	}
	return 1 << (code + 14), nil
}

const maxDMBESizeCode = 6 // 1 MiB, the largest ISM DMB
