package smcd

// CLC version 2 for SMC-D (SMC-Dv2): the Proposal's v2 extension, the EIDs
// both ends must share, and the Accept/Confirm first-contact extension.
// Layouts follow Linux net/smc/smc_clc.h: struct smc_clnt_opts_area_hdr,
// smc_clc_v2_extension, smc_clc_smcd_v2_extension, smc_clc_smcd_gid_chid,
// smc_clc_first_contact_ext and smc_clc_first_contact_ext_v2x.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// Decline codes of SMC-Dv2 negotiation (SMC_CLC_DECL_*).
const (
	DeclineNoISM2Supp uint32 = 0x03030003 // SMC_CLC_DECL_NOISM2SUPP: no ISMv2 support here
	DeclineNoV2Ext    uint32 = 0x03030004 // SMC_CLC_DECL_NOV2EXT: peer sent no v2 extension
	DeclineNoV2DExt   uint32 = 0x03030005 // SMC_CLC_DECL_NOV2DEXT: peer sent no SMC-Dv2 extension
	DeclineNoSMCD2Dev uint32 = 0x03030007 // SMC_CLC_DECL_NOSMCD2DEV: no proposed GID/CHID usable here
	DeclineNoUEID     uint32 = 0x03030008 // SMC_CLC_DECL_NOUEID: peer sent no UEID (and no SEID)
	DeclineReleaseErr uint32 = 0x03030009 // SMC_CLC_DECL_RELEASEERR: release negotiation failed
	clcEIDLen                = 32         // SMC_MAX_EID_LEN
	clcV2ExtLen              = 40         // struct smc_clc_v2_extension without the EIDs
	clcSMCDv2ExtLen          = 48         // struct smc_clc_smcd_v2_extension without the entries
	clcGIDCHIDLen            = 10         // struct smc_clc_smcd_gid_chid (packed)
	clcMaxUEIDs              = 8          // SMC_CLC_MAX_UEID
	clcMaxGIDEntries         = 8          // SMCD_CLC_MAX_V2_GID_ENTRIES
	fceLen                   = 36         // struct smc_clc_first_contact_ext
	fceV2xLen                = 52         // struct smc_clc_first_contact_ext_v2x
	hostnameLen              = 32         // SMC_MAX_HOSTNAME_LEN
)

// SMC release (SMC_RELEASE) and supplemental features (SMC_FEATURE_MASK)
// this stack offers, and Linux's OS type in the first-contact extension.
const (
	SMCRelease         uint8  = 1
	FeatureEmulatedISM uint16 = 1 << 0 // SMC_SPF_EMULATED_ISM_DEV
	SMCFeatureMask            = FeatureEmulatedISM
	OSTypeLinux        uint8  = 2 // SMC_CLC_OS_LINUX
)

// IsEmulatedCHID reports whether chid is in Linux's range for emulated ISM
// devices (0xFF00..0xFFFF, __smc_ism_is_emulated), whose GID is 128 bits:
// the second 64 bits travel as gid_ext.
func IsEmulatedCHID(chid uint16) bool { return chid&0xFF00 == 0xFF00 }

// EID is an SMC Enterprise ID: 32 bytes, a user EID padded with blanks.
type EID [clcEIDLen]byte

// ParseUEID checks s as Linux's smc_clc_ueid_valid does (A-Z, 0-9, '.'
// and '-', starting with a letter or digit, at most 32 characters) and pads
// it with blanks, as `smcd ueid add` (smc-tools) does before handing it to
// the kernel.
func ParseUEID(s string) (EID, error) {
	var e EID
	if s == "" || len(s) > clcEIDLen {
		return e, fmt.Errorf("smcd: UEID %q: 1 to %d characters", s, clcEIDLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '-') {
			return e, fmt.Errorf("smcd: UEID %q: only A-Z, 0-9, '.' and '-', starting with A-Z or 0-9", s)
		}
	}
	copy(e[:], s)
	for i := len(s); i < len(e); i++ {
		e[i] = ' '
	}
	return e, nil
}

// String is the EID without its padding.
func (e EID) String() string { return strings.TrimRight(string(e[:]), " \x00") }

func parseUEIDs(ss []string) ([]EID, error) {
	if len(ss) > clcMaxUEIDs {
		return nil, fmt.Errorf("smcd: %d UEIDs, at most %d", len(ss), clcMaxUEIDs)
	}
	var out []EID
	for _, s := range ss {
		e, err := ParseUEID(s)
		if err != nil {
			return nil, err
		}
		for _, x := range out {
			if x == e {
				return nil, fmt.Errorf("smcd: UEID %q twice", s)
			}
		}
		out = append(out, e)
	}
	return out, nil
}

// GIDCHID is struct smc_clc_smcd_gid_chid. An emulated device (CHID in
// 0xFF00..0xFFFF) takes two entries with the same CHID: GID, then gid_ext.
type GIDCHID struct {
	GID  uint64
	CHID uint16
}

// ProposalV2 is the Proposal's v2 extension: struct smc_clc_v2_extension
// with its user EIDs and, when SMC-Dv2 is offered, struct
// smc_clc_smcd_v2_extension with its GID/CHID entries.
type ProposalV2 struct {
	EIDs        []EID // user EIDs, at most 8
	SEID        bool  // flag.seid: SystemEID is offered
	Release     uint8 // flag.release, 0..15
	RoCEGID     [16]byte
	MaxConns    uint8 // SMC-Rv2 only
	MaxLinks    uint8 // SMC-Rv2 only
	FeatureMask uint16
	// SMC-Dv2 extension.
	SystemEID EID
	GIDCHIDs  []GIDCHID // at most 8
}

func (x *ProposalV2) len(smcd bool) int {
	n := clcV2ExtLen + len(x.EIDs)*clcEIDLen
	if smcd {
		n += clcSMCDv2ExtLen + len(x.GIDCHIDs)*clcGIDCHIDLen
	}
	return n
}

func (x *ProposalV2) check(smcd bool) error {
	switch {
	case len(x.EIDs) > clcMaxUEIDs:
		return fmt.Errorf("smcd: %d EIDs, at most %d", len(x.EIDs), clcMaxUEIDs)
	case len(x.GIDCHIDs) > clcMaxGIDEntries:
		return fmt.Errorf("smcd: %d GID/CHID entries, at most %d", len(x.GIDCHIDs), clcMaxGIDEntries)
	case !smcd && (len(x.GIDCHIDs) > 0 || x.SystemEID != EID{}):
		return errors.New("smcd: SMC-Dv2 fields without an SMC-Dv2 offer")
	case x.Release > 15:
		return fmt.Errorf("smcd: release %d", x.Release)
	}
	return nil
}

// put writes the extension into b, which is exactly x.len(smcd) bytes.
func (x *ProposalV2) put(b []byte, smcd bool) {
	b[0] = uint8(len(x.EIDs))
	if smcd {
		b[1] = uint8(len(x.GIDCHIDs))
	}
	b[3] = x.Release << 4 // big-endian bitfield: release:4, rsvd:3, seid:1
	if x.SEID {
		b[3] |= 1
	}
	if smcd {
		// smcd_v2_ext_offset counts from the end of the field (byte 8).
		binary.BigEndian.PutUint16(b[6:], uint16(clcV2ExtLen-8+len(x.EIDs)*clcEIDLen))
	}
	copy(b[8:24], x.RoCEGID[:])
	b[24] = x.MaxConns
	b[25] = x.MaxLinks
	binary.BigEndian.PutUint16(b[26:], x.FeatureMask)
	o := clcV2ExtLen
	for _, e := range x.EIDs {
		o += copy(b[o:], e[:])
	}
	if !smcd {
		return
	}
	copy(b[o:], x.SystemEID[:])
	o += clcSMCDv2ExtLen
	for _, g := range x.GIDCHIDs {
		binary.BigEndian.PutUint64(b[o:], g.GID)
		binary.BigEndian.PutUint16(b[o+8:], g.CHID)
		o += clcGIDCHIDLen
	}
}

// decodeProposalV2 parses the v2 extension at the start of b (which ends
// before the trailer) and returns it with its length.
func decodeProposalV2(b []byte, smcd bool) (*ProposalV2, int, error) {
	if len(b) < clcV2ExtLen {
		return nil, 0, clcErr("%d bytes left for a %d-byte v2 extension", len(b), clcV2ExtLen)
	}
	x := &ProposalV2{
		Release:     b[3] >> 4,
		SEID:        b[3]&1 != 0,
		MaxConns:    b[24],
		MaxLinks:    b[25],
		FeatureMask: binary.BigEndian.Uint16(b[26:]),
	}
	copy(x.RoCEGID[:], b[8:24])
	neid, ngid := int(b[0]), int(b[1])
	dOff := int(binary.BigEndian.Uint16(b[6:]))
	switch {
	case neid > clcMaxUEIDs:
		return nil, 0, clcErr("%d EIDs, at most %d", neid, clcMaxUEIDs)
	case smcd && ngid > clcMaxGIDEntries:
		return nil, 0, clcErr("%d GID/CHID entries, at most %d", ngid, clcMaxGIDEntries)
	case !smcd && (ngid != 0 || dOff != 0):
		return nil, 0, clcErr("SMC-Dv2 counts without an SMC-Dv2 offer")
	case smcd && dOff != clcV2ExtLen-8+neid*clcEIDLen:
		return nil, 0, clcErr("SMC-Dv2 extension offset %d with %d EIDs", dOff, neid)
	}
	n := clcV2ExtLen + neid*clcEIDLen
	if smcd {
		n += clcSMCDv2ExtLen + ngid*clcGIDCHIDLen
	}
	if n > len(b) {
		return nil, 0, clcErr("%d bytes left for a %d-byte v2 extension", len(b), n)
	}
	o := clcV2ExtLen
	for i := 0; i < neid; i++ {
		var e EID
		o += copy(e[:], b[o:o+clcEIDLen])
		x.EIDs = append(x.EIDs, e)
	}
	if smcd {
		copy(x.SystemEID[:], b[o:o+clcEIDLen])
		o += clcSMCDv2ExtLen
		for i := 0; i < ngid; i++ {
			x.GIDCHIDs = append(x.GIDCHIDs, GIDCHID{
				GID:  binary.BigEndian.Uint64(b[o:]),
				CHID: binary.BigEndian.Uint16(b[o+8:]),
			})
			o += clcGIDCHIDLen
		}
	}
	return x, n, nil
}

// FirstContactExt is struct smc_clc_first_contact_ext, and from release 1
// struct smc_clc_first_contact_ext_v2x (Linux sends the short one for
// SMC-D release 0 only; so do we, and we take only that pairing).
type FirstContactExt struct {
	V2Direct    bool  // SMC-R only
	OSType      uint8 // 4 bits
	Release     uint8 // 4 bits
	Hostname    [hostnameLen]byte
	FeatureMask uint16 // release >= 1
	VendorExp   uint32 // vendor_exp_options, release >= 1
}

func (f *FirstContactExt) len() int {
	if f.Release == 0 {
		return fceLen
	}
	return fceV2xLen
}

func (f *FirstContactExt) check() error {
	if f.OSType > 15 || f.Release > 15 {
		return fmt.Errorf("smcd: first-contact OS type %d, release %d", f.OSType, f.Release)
	}
	if f.Release == 0 && (f.FeatureMask != 0 || f.VendorExp != 0) {
		return errors.New("smcd: release 0 first-contact extension has no feature mask")
	}
	return nil
}

func (f *FirstContactExt) put(b []byte) {
	if f.V2Direct {
		b[0] = 0x80
	}
	b[1] = f.OSType<<4 | f.Release
	copy(b[4:4+hostnameLen], f.Hostname[:])
	if f.Release > 0 {
		// b[36:38]: max_conns/max_links, reserved for SMC-D.
		binary.BigEndian.PutUint16(b[38:], f.FeatureMask)
		binary.BigEndian.PutUint32(b[40:], f.VendorExp)
	}
}

// decodeFCE parses the extension at the start of b; b holds at least
// fceLen bytes.
func decodeFCE(b []byte) (*FirstContactExt, error) {
	f := &FirstContactExt{V2Direct: b[0]&0x80 != 0, OSType: b[1] >> 4, Release: b[1] & 15}
	copy(f.Hostname[:], b[4:4+hostnameLen])
	if f.Release > 0 {
		if len(b) < fceV2xLen {
			return nil, clcErr("release %d first-contact extension of %d bytes", f.Release, len(b))
		}
		f.FeatureMask = binary.BigEndian.Uint16(b[38:])
		f.VendorExp = binary.BigEndian.Uint32(b[40:])
	}
	return f, nil
}

// hostnameField is the host name as Linux's smc_clc_init fills
// smc_hostname: the node name, cut to 32 bytes, padded with blanks.
func hostnameField(name string) [hostnameLen]byte {
	var h [hostnameLen]byte
	for i := range h {
		h[i] = ' '
	}
	copy(h[:], name)
	return h
}
