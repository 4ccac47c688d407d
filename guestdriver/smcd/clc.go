package smcd

// CLC: the SMC connection-layer-control handshake carried over the TCP
// connection before data moves to the DMBs. What SMC-D versions 1 and 2
// need is implemented: Proposal (IPv4 and IPv6 prefixes; in v2 the v2
// extension with EIDs and GID/CHID entries), Accept and Confirm (SMC-D
// layout; in v2 with CHID, EID, gid_ext and the first-contact extension),
// and Decline (v1 and v2). All fields are big-endian.
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
	// AcceptConfirmLen and AcceptConfirmLenV2 are
	// SMCD_CLC_ACCEPT_CONFIRM_LEN and SMCD_CLC_ACCEPT_CONFIRM_LEN_V2 (the
	// latter without the first-contact extension).
	AcceptConfirmLen   = 48
	AcceptConfirmLenV2 = 78
	// DeclineLen and DeclineLenV2 are sizeof(struct smc_clc_msg_decline) and
	// sizeof(struct smc_clc_msg_decline_v2).
	DeclineLen   = 28
	DeclineLenV2 = 44

	// clcMaxLen bounds what ReadCLC accepts: large enough for the largest
	// v2 Proposal (652 bytes), small enough to bound memory.
	clcMaxLen = 1024
)

// byte 7 of the header: version (4 bits), typev2 (2 bits), typev1 (2 bits).
// SMC_FIRST_CONTACT_MASK (0b10 in typev2) is 0x08 in the byte: first contact
// in Accept/Confirm, out-of-sync in Decline.
const clcFlagFirstContact = 0x08

// ErrCLC is wrapped by every CLC decoding error.
var ErrCLC = errors.New("smcd: malformed CLC message")

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

// Proposal is a CLC Proposal: struct smc_clc_msg_proposal followed by struct
// smc_clc_msg_smcd, struct smc_clc_msg_proposal_prefix, the IPv6 prefixes,
// and in version 2 the v2 extension (struct smc_clc_v2_extension, its EIDs,
// struct smc_clc_smcd_v2_extension and its GID/CHID entries), then the
// trailer.
type Proposal struct {
	// Version is the header's version: 0 or 1 encodes the v1 layout; 2
	// (Linux >= 5.10) the v2 layout, where the SMC-D area is always there
	// and the v2 extension follows when TypeV2 is not N.
	Version uint8
	TypeV1  uint8    // SMCTypeD for this stack; SMCTypeN in a v2-only offer
	TypeV2  uint8    // version 2 only: SMCTypeN, or SMCTypeD for SMC-Dv2
	PeerID  [8]byte  // id_for_peer; Linux fills it only when SMC-R is offered
	RoCEGID [16]byte // SMC-R only
	MAC     [6]byte  // SMC-R only
	// SMC-D area: present when SMCDArea (iparea_offset 40 in v1; always in
	// v2, zero when TypeV1 offers no SMC-D).
	SMCDArea bool
	GID      uint64
	CHID     uint16
	// IP prefix area; absent in a v2 proposal with TypeV1 N.
	Subnet       [4]byte // IPv4 outgoing subnet (masked), zero for IPv6
	PrefixLen    uint8
	IPv6Prefixes []IPv6Prefix
	// V2 is the v2 extension, present exactly when Version >= 2 and TypeV2
	// is not N.
	V2 *ProposalV2
}

func (p *Proposal) v2Layout() bool { return p.Version >= 2 }

// prefixLen is the encoded length of the IP prefix area.
func (p *Proposal) prefixLen() int {
	if p.v2Layout() && p.TypeV1 == SMCTypeN {
		return 0
	}
	return clcPrefixLen + len(p.IPv6Prefixes)*clcIPv6PfxLen
}

// Len is the encoded length.
func (p *Proposal) Len() int {
	n := clcHeaderLen + clcLocalLen + 2 + p.prefixLen() + clcTrailerLen
	if p.SMCDArea || p.v2Layout() {
		n += clcSMCDAreaLen
	}
	if p.V2 != nil {
		n += p.V2.len(smcdIndicated(p.TypeV2))
	}
	return n
}

func smcdIndicated(t uint8) bool { return t == SMCTypeD || t == SMCTypeB }

// Encode returns the Proposal's bytes, laid out as Linux sends them.
func (p *Proposal) Encode() ([]byte, error) {
	if len(p.IPv6Prefixes) > clcMaxIPv6Pfx {
		return nil, fmt.Errorf("smcd: %d IPv6 prefixes, at most %d", len(p.IPv6Prefixes), clcMaxIPv6Pfx)
	}
	if p.Version > 15 {
		return nil, fmt.Errorf("smcd: proposal version %d", p.Version)
	}
	v2 := p.v2Layout()
	switch {
	case p.TypeV1 > SMCTypeB || p.TypeV2 > SMCTypeB:
		return nil, fmt.Errorf("smcd: proposal types %d/%d", p.TypeV1, p.TypeV2)
	case !v2 && (p.TypeV1 == SMCTypeN || p.TypeV2 != 0 || p.V2 != nil):
		return nil, errors.New("smcd: a v1 proposal offers v1 only")
	case v2 && p.TypeV1 == SMCTypeN && p.TypeV2 == SMCTypeN:
		return nil, errors.New("smcd: proposal offers nothing")
	case v2 && (p.TypeV2 != SMCTypeN) != (p.V2 != nil):
		return nil, errors.New("smcd: v2 proposal: the v2 extension goes with a v2 type")
	case v2 && p.TypeV1 == SMCTypeN && len(p.IPv6Prefixes) > 0:
		return nil, errors.New("smcd: v2-only proposal has no prefix area")
	case smcdIndicated(p.TypeV1) && !p.SMCDArea:
		return nil, errors.New("smcd: proposal offers SMC-D without the SMC-D area")
	}
	if p.V2 != nil {
		if err := p.V2.check(smcdIndicated(p.TypeV2)); err != nil {
			return nil, err
		}
	}
	b := make([]byte, p.Len())
	version := max(p.Version, 1)
	// A version-1 kernel leaves the typev2 bits (its flag and reserved
	// bits) zero.
	putHeader(b, EyecatcherR, CLCProposal, len(b), version, p.TypeV2, p.TypeV1)
	o := clcHeaderLen
	o += copy(b[o:], p.PeerID[:])
	o += copy(b[o:], p.RoCEGID[:])
	o += copy(b[o:], p.MAC[:])
	if p.SMCDArea || v2 {
		if !v2 || p.TypeV1 != SMCTypeN {
			binary.BigEndian.PutUint16(b[o:], clcSMCDAreaLen) // iparea_offset
		}
		o += 2
		binary.BigEndian.PutUint64(b[o:], p.GID)
		binary.BigEndian.PutUint16(b[o+8:], p.CHID)
		if p.V2 != nil {
			// v2_ext_offset counts from the end of the field itself.
			binary.BigEndian.PutUint16(b[o+10:], uint16(clcSMCDAreaLen-12+p.prefixLen()))
		}
		// vendor_oui, vendor_exp_options, reserved: zero.
		o += clcSMCDAreaLen
	} else {
		o += 2
	}
	if p.prefixLen() > 0 {
		copy(b[o:], p.Subnet[:])
		b[o+4] = p.PrefixLen
		b[o+7] = uint8(len(p.IPv6Prefixes))
		o += clcPrefixLen
		for _, x := range p.IPv6Prefixes {
			copy(b[o:], x.Prefix[:])
			b[o+16] = x.Len
			o += clcIPv6PfxLen
		}
	}
	if p.V2 != nil {
		p.V2.put(b[o:len(b)-clcTrailerLen], smcdIndicated(p.TypeV2))
	}
	putTrailer(b, EyecatcherR)
	return b, nil
}

// DecodeProposal parses a Proposal strictly: the length field must match
// the layout and its counts exactly, as Linux's smc_clc_msg_prop_valid
// demands, and in version 2 every extension offset must be where Linux puts
// it (Linux follows any offset up to a bound; it only ever sends these).
func DecodeProposal(b []byte) (*Proposal, error) {
	h, err := checkFrame(b, CLCProposal)
	if err != nil {
		return nil, err
	}
	if h.Version == 0 {
		return nil, clcErr("proposal version 0")
	}
	v2 := h.Version >= 2
	if !v2 && h.TypeV1 == SMCTypeN {
		return nil, clcErr("v1 proposal offers neither SMC-R nor SMC-D")
	}
	if v2 && h.TypeV1 == SMCTypeN && h.TypeV2 == SMCTypeN {
		return nil, clcErr("v2 proposal offers neither v1 nor v2")
	}
	const fixed = clcHeaderLen + clcLocalLen + 2
	if len(b) < fixed+clcTrailerLen {
		return nil, clcErr("proposal of %d bytes is too short", len(b))
	}
	p := &Proposal{Version: h.Version, TypeV1: h.TypeV1}
	if v2 {
		p.TypeV2 = h.TypeV2
	}
	o := clcHeaderLen
	o += copy(p.PeerID[:], b[o:])
	o += copy(p.RoCEGID[:], b[o:])
	o += copy(p.MAC[:], b[o:])
	ipOff := int(binary.BigEndian.Uint16(b[o:]))
	o += 2
	end := len(b) - clcTrailerLen
	smcd := smcdIndicated(h.TypeV1)
	switch {
	case v2 && h.TypeV1 == SMCTypeN && ipOff != 0:
		return nil, clcErr("v2-only proposal with iparea_offset %d", ipOff)
	case v2 && h.TypeV1 != SMCTypeN && ipOff != clcSMCDAreaLen:
		return nil, clcErr("v2 proposal with iparea_offset %d, want %d", ipOff, clcSMCDAreaLen)
	case smcd && ipOff != clcSMCDAreaLen:
		return nil, clcErr("SMC-D proposal with iparea_offset %d, want %d", ipOff, clcSMCDAreaLen)
	case ipOff != 0 && ipOff != clcSMCDAreaLen:
		return nil, clcErr("iparea_offset %d", ipOff)
	}
	var v2Off int
	if v2 || ipOff == clcSMCDAreaLen {
		if o+clcSMCDAreaLen > end {
			return nil, clcErr("proposal of %d bytes is too short for the SMC-D area", len(b))
		}
		p.SMCDArea = true
		p.GID = binary.BigEndian.Uint64(b[o:])
		p.CHID = binary.BigEndian.Uint16(b[o+8:])
		v2Off = int(binary.BigEndian.Uint16(b[o+10:]))
		o += clcSMCDAreaLen
	}
	if !v2 || h.TypeV1 != SMCTypeN {
		if o+clcPrefixLen > end {
			return nil, clcErr("proposal of %d bytes is too short for the prefix area", len(b))
		}
		copy(p.Subnet[:], b[o:])
		p.PrefixLen = b[o+4]
		n6 := int(b[o+7])
		o += clcPrefixLen
		if n6 > clcMaxIPv6Pfx {
			return nil, clcErr("%d IPv6 prefixes, at most %d", n6, clcMaxIPv6Pfx)
		}
		if o+n6*clcIPv6PfxLen > end {
			return nil, clcErr("length %d too short for %d IPv6 prefixes", len(b), n6)
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
	}
	switch {
	case !v2 || h.TypeV2 == SMCTypeN:
		if v2Off != 0 {
			return nil, clcErr("proposal without a v2 offer has v2 extension offset %d", v2Off)
		}
	default:
		want := clcSMCDAreaLen - 12 + p.prefixLen()
		if v2Off != want {
			return nil, clcErr("v2 extension offset %d, want %d", v2Off, want)
		}
		x, n, err := decodeProposalV2(b[o:end], smcdIndicated(h.TypeV2))
		if err != nil {
			return nil, err
		}
		p.V2 = x
		o += n
	}
	if o != end {
		return nil, clcErr("length %d, but the proposal's parts end at %d", len(b), o+clcTrailerLen)
	}
	return p, nil
}

// AcceptConfirm is an SMC-D Accept or Confirm (struct
// smc_clc_msg_accept_confirm with the d0 part; in version 2 also d1 and,
// with first contact, struct smc_clc_first_contact_ext(_v2x)).
type AcceptConfirm struct {
	Type         uint8 // CLCAccept or CLCConfirm
	Version      uint8 // 0 or 1: v1 (48 bytes); 2: SMC-Dv2
	FirstContact bool
	GID          uint64 // sender's ISM GID
	Token        uint64 // sender's DMB token
	DMBEIndex    uint8  // Linux sends 0
	DMBESize     uint8  // size code: DMB bytes = 1 << (code+14)
	LinkID       uint32
	// Version 2 (d1): the sender's CHID, the negotiated EID, and the
	// second half of the sender's 128-bit GID (Linux sends it for
	// emulated CHIDs only; 0 for our devices).
	CHID   uint16
	EID    EID
	GIDExt uint64
	// FCE is the first-contact extension: in version 2, present exactly
	// when FirstContact.
	FCE *FirstContactExt
}

// Len is the encoded length.
func (a *AcceptConfirm) Len() int {
	if a.Version < 2 {
		return AcceptConfirmLen
	}
	n := AcceptConfirmLenV2
	if a.FCE != nil {
		n += a.FCE.len()
	}
	return n
}

// Encode returns the bytes Linux's smc_clc_send_confirm_accept sends for
// SMC-D: 48 bytes in v1; 78 in v2, plus the first-contact extension.
func (a *AcceptConfirm) Encode() ([]byte, error) {
	if a.Type != CLCAccept && a.Type != CLCConfirm {
		return nil, fmt.Errorf("smcd: accept/confirm type %d", a.Type)
	}
	if a.DMBESize > 15 {
		return nil, fmt.Errorf("smcd: DMBE size code %d does not fit 4 bits", a.DMBESize)
	}
	if a.Version > 15 {
		return nil, fmt.Errorf("smcd: accept/confirm version %d", a.Version)
	}
	v2 := a.Version >= 2
	switch {
	case !v2 && (a.FCE != nil || a.CHID != 0 || a.EID != EID{} || a.GIDExt != 0):
		return nil, errors.New("smcd: v2 fields in a v1 accept/confirm")
	case v2 && a.FirstContact != (a.FCE != nil):
		return nil, errors.New("smcd: v2 accept/confirm: the first-contact extension goes with first contact")
	case a.FCE != nil:
		if err := a.FCE.check(); err != nil {
			return nil, err
		}
	}
	b := make([]byte, a.Len())
	var typev2 uint8
	if a.FirstContact {
		typev2 = clcFlagFirstContact >> 2
	}
	putHeader(b, EyecatcherD, a.Type, len(b), max(a.Version, 1), typev2, SMCTypeD)
	binary.BigEndian.PutUint64(b[8:], a.GID)
	binary.BigEndian.PutUint64(b[16:], a.Token)
	b[24] = a.DMBEIndex
	b[25] = a.DMBESize << 4
	binary.BigEndian.PutUint32(b[28:], a.LinkID)
	if v2 {
		binary.BigEndian.PutUint16(b[32:], a.CHID)
		copy(b[34:66], a.EID[:])
		binary.BigEndian.PutUint64(b[66:], a.GIDExt)
		if a.FCE != nil {
			a.FCE.put(b[74 : len(b)-clcTrailerLen])
		}
	}
	putTrailer(b, EyecatcherD)
	return b, nil
}

// DecodeAcceptConfirm parses an SMC-D Accept or Confirm of type typ: v1
// exactly 48 bytes; v2 exactly 78, or with first contact 78 plus the
// first-contact extension (36 bytes for release 0, 52 from release 1, as
// Linux's smc_clc_fill_fce_v2x sends it). Linux takes any v2 length >= 78
// and reads the extension wherever the flag says; we take only what it
// sends.
func DecodeAcceptConfirm(b []byte, typ uint8) (*AcceptConfirm, error) {
	if typ != CLCAccept && typ != CLCConfirm {
		return nil, fmt.Errorf("smcd: accept/confirm type %d", typ)
	}
	h, err := checkFrame(b, typ)
	if err != nil {
		return nil, err
	}
	if h.Version == 0 {
		return nil, clcErr("accept/confirm version 0")
	}
	if h.TypeV1 != SMCTypeD {
		return nil, clcErr("accept/confirm for SMC type %d, want SMC-D", h.TypeV1)
	}
	a := &AcceptConfirm{
		Type:         typ,
		Version:      h.Version,
		FirstContact: b[7]&clcFlagFirstContact != 0,
	}
	if h.Version == 1 {
		if len(b) != AcceptConfirmLen {
			return nil, clcErr("SMC-D accept/confirm of %d bytes, want %d", len(b), AcceptConfirmLen)
		}
	} else {
		want := AcceptConfirmLenV2
		if a.FirstContact {
			if len(b) < want+fceLen {
				return nil, clcErr("v2 first-contact accept/confirm of %d bytes", len(b))
			}
			fce, err := decodeFCE(b[74 : len(b)-clcTrailerLen])
			if err != nil {
				return nil, err
			}
			a.FCE = fce
			want += fce.len()
		}
		if len(b) != want {
			return nil, clcErr("v2 SMC-D accept/confirm of %d bytes, want %d", len(b), want)
		}
		a.CHID = binary.BigEndian.Uint16(b[32:])
		copy(a.EID[:], b[34:66])
		a.GIDExt = binary.BigEndian.Uint64(b[66:])
	}
	a.GID = binary.BigEndian.Uint64(b[8:])
	a.Token = binary.BigEndian.Uint64(b[16:])
	a.DMBEIndex = b[24]
	a.DMBESize = b[25] >> 4
	a.LinkID = binary.BigEndian.Uint32(b[28:])
	return a, nil
}

// Decline is struct smc_clc_msg_decline (v1) or smc_clc_msg_decline_v2.
type Decline struct {
	Version     uint8 // 1 or 2
	OutOfSync   bool
	PeerID      [8]byte
	Diagnosis   uint32
	OSType      uint8     // high nibble of byte 20; Linux sends 0 in v1
	DiagnosisV2 [4]uint32 // v2 only
}

// Encode returns a Decline as Linux's smc_clc_send_decline builds it: v1
// (28 bytes, Version 0 or 1) or v2 (44 bytes, Version 2).
func (d *Decline) Encode() ([]byte, error) {
	if d.Version > 2 {
		return nil, fmt.Errorf("smcd: decline version %d", d.Version)
	}
	if d.OSType > 15 {
		return nil, fmt.Errorf("smcd: decline OS type %d", d.OSType)
	}
	n := DeclineLen
	if d.Version == 2 {
		n = DeclineLenV2
	} else if d.DiagnosisV2 != [4]uint32{} {
		return nil, errors.New("smcd: v2 diagnosis codes in a v1 decline")
	}
	b := make([]byte, n)
	var typev2 uint8
	if d.OutOfSync {
		typev2 = clcFlagFirstContact >> 2
	}
	putHeader(b, EyecatcherR, CLCDecline, len(b), max(d.Version, 1), typev2, 0)
	copy(b[8:16], d.PeerID[:])
	binary.BigEndian.PutUint32(b[16:], d.Diagnosis)
	b[20] = d.OSType << 4
	if d.Version == 2 {
		for i, x := range d.DiagnosisV2 {
			binary.BigEndian.PutUint32(b[24+4*i:], x)
		}
	}
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
