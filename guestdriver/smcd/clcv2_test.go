package smcd

import (
	"bytes"
	"errors"
	"net"
	"reflect"
	"testing"
)

// The v2 fixtures are written out by hand from Linux's struct layouts
// (net/smc/smc_clc.h) and what smc_clc_send_proposal,
// smc_clc_send_confirm_accept and smc_clc_send_decline put in them on x86:
// no SMC-R, no PNETID (so no v1 SMC-D device), no system EID, one UEID, and
// one emulated ISM device (CHID 0xFF00) whose 128-bit GID is our 64-bit GID
// followed by gid_ext 0. Offsets are from the start of the message.

// goldenKernelProposalV2 is the x86 kernel's SMC-Dv2-only Proposal.
const goldenKernelProposalV2 = `
e2d4c3d9 01 00e0 26                 0: hdr: SMCR, proposal, length 224, version 2, typev2 D, typev1 N
0000000000000000                    8: lcl.id_for_peer (SMC-R only)
00000000000000000000000000000000    16: lcl.gid
000000000000                        32: lcl.mac
0000                                38: iparea_offset 0: no prefix area (typev1 N)
0000000000000000 0000               40: pclc_smcd.ism.gid, ism.chid: no v1 device
001c                                50: v2_ext_offset 28, from offset 52 to 80
000000 0000000000                   52: vendor_oui, vendor_exp_options
0000000000000000000000000000000000000000 60: reserved[20]
01 02 00 10 0000 0040               80: v2_ext.hdr: eid_cnt 1, ism_gid_cnt 2, reserved1, flag release 1 seid 0, reserved2, smcd_v2_ext_offset 64 (from 88 to 152)
00000000000000000000000000000000    88: roce (SMC-Rv2 only)
00 00 0001                          104: max_conns, max_links (SMC-R only), feature_mask SMC_FEATURE_MASK
000000000000000000000000            108: reserved[12]
49534d2d4241434b454e442d54455354 20202020202020202020202020202020 120: user_eids[0] "ISM-BACKEND-TEST" padded with blanks
0000000000000000000000000000000000000000000000000000000000000000 152: smcd_v2_ext.system_eid (none on x86)
00000000000000000000000000000000    184: reserved[16]
00000000000a0001 ff00               200: gidchid[0]: gid, chid 0xFF00 (emulated)
0000000000000000 ff00               210: gidchid[1]: gid_ext 0, the same chid
e2d4c3d9                            220: trailer`

// goldenProposalV1V2 is our client's Proposal with a UEID: v1 SMC-D (our
// device in the SMC-D area, IPv4 prefix) and SMC-Dv2, our device not
// listed again in the v2 entries, as Linux lists its v1 device.
const goldenProposalV1V2 = `
e2d4c3d9 01 00d4 25                 0: hdr: SMCR, proposal, length 212, version 2, typev2 D, typev1 D
0000000000000000                    8: lcl.id_for_peer
00000000000000000000000000000000    16: lcl.gid
000000000000                        32: lcl.mac
0028                                38: iparea_offset 40
00000000000a0002 ff00               40: ism.gid, ism.chid
0024                                50: v2_ext_offset 36 = 28 + prefix area 8, from 52 to 88
000000 0000000000                   52: vendor_oui, vendor_exp_options
0000000000000000000000000000000000000000 60: reserved[20]
c0000201 20 0000 00                 80: outgoing_subnet 192.0.2.1/32, prefix_len, reserved, ipv6_prefixes_cnt 0
01 00 00 10 0000 0040               88: v2_ext.hdr: eid_cnt 1, ism_gid_cnt 0, flag release 1, smcd_v2_ext_offset 64 (from 96 to 160)
00000000000000000000000000000000    96: roce
00 00 0001                          112: max_conns, max_links, feature_mask
000000000000000000000000            116: reserved[12]
49534d2d4241434b454e442d54455354 20202020202020202020202020202020 128: user_eids[0]
0000000000000000000000000000000000000000000000000000000000000000 160: system_eid
00000000000000000000000000000000    192: reserved[16]
e2d4c3d9                            208: trailer`

// goldenKernelAcceptV2 is the kernel server's first-contact SMC-Dv2 Accept
// (release 1: struct smc_clc_first_contact_ext_v2x follows d1).
const goldenKernelAcceptV2 = `
e2d4c3c4 02 0082 29                 0: hdr: SMCD, accept, length 130, version 2, first contact, typev1 D
00000000000a0001                    8: d0.gid
a1a2a3a4a5a6a7a8                    16: d0.token
00 20 0000                          24: d0.dmbe_idx, dmbe_size 2 (64 KiB) high nibble, reserved4
00000101                            28: d0.linkid (lgr->id)
ff00                                32: d1.chid
49534d2d4241434b454e442d54455354 20202020202020202020202020202020 34: d1.eid, the negotiated UEID
0000000000000000                    66: d1.gid_ext (emulated CHID: the device's gid_ext, 0)
00 21 0000                          74: fce: v2_direct 0, os_type 2 (Linux) release 1, reserved2
6775657374312020202020202020202020202020202020202020202020202020 78: fce.hostname "guest1" padded with blanks
0000 0001 00000000                  110: reserved3 (max_conns/max_links: SMC-R only), feature_mask, vendor_exp_options
0000000000000000                    118: reserved4
e2d4c3c4                            126: trailer`

// goldenKernelConfirmV2 is a kernel client's Confirm that joins an existing
// link group: no first contact, so no extension (78 bytes).
const goldenKernelConfirmV2 = `
e2d4c3c4 03 004e 21                 0: hdr: SMCD, confirm, length 78, version 2, typev1 D
00000000000a0001                    8: d0.gid
b1b2b3b4b5b6b7b8                    16: d0.token
00 00 0000                          24: d0.dmbe_idx, dmbe_size 0 (16 KiB)
00000101                            28: d0.linkid
ff00                                32: d1.chid
49534d2d4241434b454e442d54455354 20202020202020202020202020202020 34: d1.eid
0000000000000000                    66: d1.gid_ext
e2d4c3c4                            74: trailer`

// goldenKernelDeclineV2 is smc_clc_send_decline for a v2 proposal on x86:
// no common UEID ends in SMC_CLC_DECL_NOSMCDDEV.
const goldenKernelDeclineV2 = `
e2d4c3d9 04 002c 20                 0: hdr: SMCR, decline, length 44, version 2
0000000000000000                    8: id_for_peer (no RoCE system id)
03030001                            16: peer_diagnosis SMC_CLC_DECL_NOSMCDDEV
20 000000                           20: os_type 2 (Linux) high nibble, reserved2
00000000 00000000 00000000 00000000 24: peer_diagnosis_v2[4]
e2d4c3d9                            40: trailer`

// fixedGID is a device with a GID of our choosing, for byte-exact fixtures.
type fixedGID struct {
	ISM
	gid uint64
}

func (f fixedGID) GID() uint64 { return f.gid }

func testUEID(t testing.TB) EID {
	e, err := ParseUEID("ISM-BACKEND-TEST")
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func kernelProposalV2(t testing.TB) *Proposal {
	return &Proposal{
		Version: 2, TypeV1: SMCTypeN, TypeV2: SMCTypeD, SMCDArea: true,
		V2: &ProposalV2{
			EIDs: []EID{testUEID(t)}, Release: 1, FeatureMask: 1,
			GIDCHIDs: []GIDCHID{{GID: 0xa0001, CHID: 0xFF00}, {GID: 0, CHID: 0xFF00}},
		},
	}
}

func kernelAcceptV2(t testing.TB) *AcceptConfirm {
	return &AcceptConfirm{
		Type: CLCAccept, Version: 2, FirstContact: true, GID: 0xa0001, Token: 0xA1A2A3A4A5A6A7A8,
		DMBESize: 2, LinkID: 0x101, CHID: 0xFF00, EID: testUEID(t),
		FCE: &FirstContactExt{OSType: OSTypeLinux, Release: 1, Hostname: hostnameField("guest1"), FeatureMask: 1},
	}
}

func TestProposalV2Golden(t *testing.T) {
	for _, c := range []struct {
		name   string
		golden string
		p      func() *Proposal
	}{
		{"kernel v2 only", goldenKernelProposalV2, func() *Proposal { return kernelProposalV2(t) }},
		{"ours v1 and v2", goldenProposalV1V2, func() *Proposal {
			dev := fixedGID{NewFabric(0xFF00).NewDevice(), 0xa0002}
			p := proposalFor(dev, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1)}, []EID{testUEID(t)}, false)
			return &p
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			want := golden(t, c.golden)
			got, err := c.p().Encode()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("encode:\n got %x\nwant %x", got, want)
			}
			p, err := DecodeProposal(want)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(p, c.p()) {
				t.Fatalf("decode:\n got %+v %+v\nwant %+v %+v", p, p.V2, c.p(), c.p().V2)
			}
		})
	}
}

func TestAcceptConfirmV2Golden(t *testing.T) {
	confirm := &AcceptConfirm{Type: CLCConfirm, Version: 2, GID: 0xa0001, Token: 0xB1B2B3B4B5B6B7B8,
		LinkID: 0x101, CHID: 0xFF00, EID: testUEID(t)}
	for _, c := range []struct {
		golden string
		a      *AcceptConfirm
	}{{goldenKernelAcceptV2, kernelAcceptV2(t)}, {goldenKernelConfirmV2, confirm}} {
		want := golden(t, c.golden)
		got, err := c.a.Encode()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("encode:\n got %x\nwant %x", got, want)
		}
		a, err := DecodeAcceptConfirm(want, c.a.Type)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(a, c.a) {
			t.Fatalf("decode:\n got %+v\nwant %+v", a, c.a)
		}
	}
	// Release 0: the short extension (36 bytes), 114 in all.
	a := kernelAcceptV2(t)
	a.FCE.Release, a.FCE.FeatureMask = 0, 0
	b, err := a.Encode()
	if err != nil || len(b) != AcceptConfirmLenV2+36 {
		t.Fatalf("release 0: %d bytes, %v", len(b), err)
	}
	if q, err := DecodeAcceptConfirm(b, CLCAccept); err != nil || !reflect.DeepEqual(q, a) {
		t.Fatalf("release 0 round trip: %v %+v", err, q)
	}
}

func TestDeclineV2Golden(t *testing.T) {
	want := golden(t, goldenKernelDeclineV2)
	d := &Decline{Version: 2, Diagnosis: DeclineNoSMCDDev, OSType: OSTypeLinux}
	got, err := d.Encode()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("encode %v:\n got %x\nwant %x", err, got, want)
	}
	q, err := DecodeDecline(want)
	if err != nil || !reflect.DeepEqual(q, d) {
		t.Fatalf("decode %v: %+v", err, q)
	}
}

// TestCLCV2StrictRejects: every count, offset and length of the v2 layouts
// is checked against the message.
func TestCLCV2StrictRejects(t *testing.T) {
	prop := func(f func(b []byte) []byte) []byte { return f(golden(t, goldenKernelProposalV2)) }
	acc := func(f func(b []byte) []byte) []byte { return f(golden(t, goldenKernelAcceptV2)) }
	setLen := func(b []byte) []byte { b[5], b[6] = byte(len(b)>>8), byte(len(b)); return b }
	cut := func(b []byte, n int) []byte { // drop n bytes before the trailer
		b = append(b[:len(b)-4-n], b[len(b)-4:]...)
		return setLen(b)
	}
	props := map[string][]byte{
		"eid_cnt 2":                 prop(func(b []byte) []byte { b[80] = 2; return b }),
		"eid_cnt 9":                 prop(func(b []byte) []byte { b[80] = 9; return b }),
		"eid_cnt 0":                 prop(func(b []byte) []byte { b[80] = 0; return b }),
		"ism_gid_cnt 3":             prop(func(b []byte) []byte { b[81] = 3; return b }),
		"ism_gid_cnt 9":             prop(func(b []byte) []byte { b[81] = 9; return b }),
		"ism_gid_cnt 1":             prop(func(b []byte) []byte { b[81] = 1; return b }),
		"v2_ext_offset 27":          prop(func(b []byte) []byte { b[51] = 27; return b }),
		"v2_ext_offset 0":           prop(func(b []byte) []byte { b[51] = 0; return b }),
		"v2_ext_offset 0xffff":      prop(func(b []byte) []byte { b[50], b[51] = 0xff, 0xff; return b }),
		"smcd_v2_ext_offset 63":     prop(func(b []byte) []byte { b[87] = 63; return b }),
		"smcd_v2_ext_offset 0xffff": prop(func(b []byte) []byte { b[86], b[87] = 0xff, 0xff; return b }),
		"iparea_offset 40":          prop(func(b []byte) []byte { b[39] = 40; return b }),
		"typev2 N with extension":   prop(func(b []byte) []byte { b[7] = 0x20 | SMCTypeN<<2 | SMCTypeN; return b }),
		"entry cut":                 prop(func(b []byte) []byte { return cut(b, 10) }),
		"partial entry":             prop(func(b []byte) []byte { return cut(b, 3) }),
		"extension cut":             prop(func(b []byte) []byte { return cut(b, 140) }),
		"extra byte":                prop(func(b []byte) []byte { return setLen(append(b[:len(b)-4], 0, 0xe2, 0xd4, 0xc3, 0xd9)) }),
		"length field":              prop(func(b []byte) []byte { b[6]--; return b }),
	}
	for name, b := range props {
		if _, err := DecodeProposal(b); !errors.Is(err, ErrCLC) {
			t.Errorf("proposal %s: %v", name, err)
		}
	}
	accs := map[string][]byte{
		"first contact off":  acc(func(b []byte) []byte { b[7] &^= clcFlagFirstContact; return b }),
		"release 0, 52-byte": acc(func(b []byte) []byte { b[75] = 0x20; return b }),
		"fce cut":            acc(func(b []byte) []byte { return cut(b, 16) }),
		"fce cut more":       acc(func(b []byte) []byte { return cut(b, 40) }),
		"extra":              acc(func(b []byte) []byte { return setLen(append(b[:len(b)-4], 0, 0xe2, 0xd4, 0xc3, 0xc4)) }),
		"typev1 R":           acc(func(b []byte) []byte { b[7] &^= 3; return b }),
		"version 1":          acc(func(b []byte) []byte { b[7] = 0x19; return b }),
	}
	for name, b := range accs {
		if _, err := DecodeAcceptConfirm(b, CLCAccept); !errors.Is(err, ErrCLC) {
			t.Errorf("accept %s: %v", name, err)
		}
	}
	// A 78-byte v2 message that says first contact has no room for the
	// extension Linux would read.
	c := golden(t, goldenKernelConfirmV2)
	c[7] |= clcFlagFirstContact
	if _, err := DecodeAcceptConfirm(c, CLCConfirm); !errors.Is(err, ErrCLC) {
		t.Errorf("confirm first contact without extension: %v", err)
	}
}

func TestParseUEID(t *testing.T) {
	good := map[string]string{
		"ISM-BACKEND-TEST":                 "ISM-BACKEND-TEST                ",
		"A":                                "A                               ",
		"0.1-X":                            "0.1-X                           ",
		"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345": "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
	}
	for in, want := range good {
		e, err := ParseUEID(in)
		if err != nil || string(e[:]) != want || e.String() != in {
			t.Errorf("ParseUEID(%q) = %q, %v", in, e[:], err)
		}
	}
	for _, in := range []string{"", "lower", "-LEAD", ".LEAD", "A B", "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456", "A_B", "É"} {
		if _, err := ParseUEID(in); err == nil {
			t.Errorf("ParseUEID(%q) accepted", in)
		}
	}
	if _, err := parseUEIDs([]string{"A", "A"}); err == nil {
		t.Error("duplicate UEIDs accepted")
	}
	if _, err := parseUEIDs([]string{"A", "B", "C", "D", "E", "F", "G", "H", "I"}); err == nil {
		t.Error("9 UEIDs accepted")
	}
}
