package smcd

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// goldenProposal is a v1 SMC-D Proposal with an IPv4 prefix, written out by
// hand from Linux's struct smc_clc_msg_proposal (hdr, smc_clc_msg_local,
// iparea_offset), struct smc_clc_msg_smcd (ism.gid, ism.chid,
// v2_ext_offset, vendor_oui, vendor_exp_options, reserved) and struct
// smc_clc_msg_proposal_prefix, then struct smc_clc_msg_trail.
const goldenProposal = `
e2d4c3d9 01 005c 11                 hdr: SMCR, proposal, length 92, version 1, typev1 D
0000000000000000                    lcl.id_for_peer (SMC-R only)
00000000000000000000000000000000    lcl.gid (SMC-R only)
000000000000                        lcl.mac (SMC-R only)
0028                                iparea_offset = sizeof(struct smc_clc_msg_smcd)
0102030405060708 ff00 0000          ism.gid, ism.chid, v2_ext_offset
000000 0000000000                   vendor_oui, vendor_exp_options
0000000000000000000000000000000000000000 reserved[20]
0a000200 18 0000 00                 outgoing_subnet, prefix_len, reserved, ipv6_prefixes_cnt
e2d4c3d9                            trailer`

// goldenAccept is struct smc_clc_msg_accept_confirm for SMC-D v1 (d0 =
// struct smcd_clc_msg_accept_confirm_common, then the 12 bytes d1 reserves
// in v1), SMCD_CLC_ACCEPT_CONFIRM_LEN = 48 bytes.
const goldenAccept = `
e2d4c3c4 02 0030 19                 hdr: SMCD, accept, length 48, version 1, first contact, typev1 D
1122334455667788                    d0.gid
a1a2a3a4a5a6a7a8                    d0.token
00 20 0000                          d0.dmbe_idx, dmbe_size 2 (64 KiB) in the high nibble, reserved4
deadbeef                            d0.linkid
000000000000000000000000            reserved d1 (v2 only)
e2d4c3c4                            trailer`

// goldenDecline is struct smc_clc_msg_decline (v1, 28 bytes).
const goldenDecline = `
e2d4c3d9 04 001c 10                 hdr: SMCR, decline, length 28, version 1
0102030405060708                    id_for_peer
03030001                            peer_diagnosis = SMC_CLC_DECL_NOSMCDDEV
00 000000                           os_type nibble (0 in v1), reserved2
e2d4c3d9                            trailer`

// stripComments drops the annotation after the hex on each golden line.
func stripComments(s string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		var hexPart []string
		for _, f := range strings.Fields(line) {
			if _, err := hex.DecodeString(f); err != nil {
				break
			}
			hexPart = append(hexPart, f)
		}
		out = append(out, strings.Join(hexPart, ""))
	}
	return strings.Join(out, "")
}

func golden(t testing.TB, s string) []byte { return unhex(t, stripComments(s)) }

func sampleProposal() *Proposal {
	return &Proposal{
		Version:   1,
		TypeV1:    SMCTypeD,
		SMCDArea:  true,
		GID:       0x0102030405060708,
		CHID:      0xFF00,
		Subnet:    [4]byte{10, 0, 2, 0},
		PrefixLen: 24,
	}
}

func sampleAccept() *AcceptConfirm {
	return &AcceptConfirm{Type: CLCAccept, Version: 1, FirstContact: true, GID: 0x1122334455667788,
		Token: 0xA1A2A3A4A5A6A7A8, DMBESize: 2, LinkID: 0xDEADBEEF}
}

func sampleDecline() *Decline {
	return &Decline{Version: 1, PeerID: [8]byte{1, 2, 3, 4, 5, 6, 7, 8}, Diagnosis: DeclineNoSMCDDev}
}

func TestProposalGolden(t *testing.T) {
	want := golden(t, goldenProposal)
	if len(want) != ProposalLenV4 || ProposalLenV4 != 92 {
		t.Fatalf("golden is %d bytes, ProposalLenV4 %d", len(want), ProposalLenV4)
	}
	got, err := sampleProposal().Encode()
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
	if !reflect.DeepEqual(p, sampleProposal()) {
		t.Fatalf("decode: %+v", p)
	}
}

func TestAcceptConfirmGolden(t *testing.T) {
	want := golden(t, goldenAccept)
	got, err := sampleAccept().Encode()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("encode:\n got %x\nwant %x", got, want)
	}
	a, err := DecodeAcceptConfirm(want, CLCAccept)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, sampleAccept()) {
		t.Fatalf("decode: %+v", a)
	}
	// The same bytes are not a Confirm.
	if _, err := DecodeAcceptConfirm(want, CLCConfirm); !errors.Is(err, ErrCLC) {
		t.Fatalf("accept decoded as confirm: %v", err)
	}
	c := sampleAccept()
	c.Type, c.FirstContact = CLCConfirm, false
	b, _ := c.Encode()
	if b[4] != CLCConfirm || b[7] != 0x11 {
		t.Fatalf("confirm header %x", b[:8])
	}
}

func TestDeclineGolden(t *testing.T) {
	want := golden(t, goldenDecline)
	got, err := sampleDecline().Encode()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("encode:\n got %x\nwant %x", got, want)
	}
	d, err := DecodeDecline(want)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(d, sampleDecline()) {
		t.Fatalf("decode: %+v", d)
	}
	// struct smc_clc_msg_decline_v2: 4 more diagnosis words, 44 bytes.
	v2 := append(append([]byte{}, want[:24]...), unhex(t, "00000001 00000002 00000003 00000004 e2d4c3c4")...)
	v2[6], v2[7] = DeclineLenV2, 0x20
	d, err = DecodeDecline(v2)
	if err != nil {
		t.Fatal(err)
	}
	if d.Version != 2 || d.DiagnosisV2 != [4]uint32{1, 2, 3, 4} || d.Diagnosis != DeclineNoSMCDDev {
		t.Fatalf("v2 decline: %+v", d)
	}
}

func TestProposalIPv6RoundTrip(t *testing.T) {
	p := sampleProposal()
	p.Subnet, p.PrefixLen = [4]byte{}, 0
	for i := 0; i < 3; i++ {
		var x IPv6Prefix
		x.Prefix[0], x.Prefix[1], x.Prefix[15], x.Len = 0xfd, byte(i), 0, 64
		p.IPv6Prefixes = append(p.IPv6Prefixes, x)
	}
	b, err := p.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 92+3*17 {
		t.Fatalf("len %d", len(b))
	}
	q, err := DecodeProposal(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(p, q) {
		t.Fatalf("round trip:\n%+v\n%+v", p, q)
	}
	// A count that disagrees with the length is rejected.
	b[8+30+2+40+7] = 2
	if _, err := DecodeProposal(b); !errors.Is(err, ErrCLC) {
		t.Fatalf("count mismatch accepted: %v", err)
	}
}

// TestProposalLinuxV2Header: Linux >= 5.10 offering only v1 sends version 2
// with typev2 N; that is still a v1 offer to us. A v2 offer without the v2
// extension is malformed (Linux's smc_clc_msg_prop_valid rejects it too).
func TestProposalLinuxV2Header(t *testing.T) {
	b := golden(t, goldenProposal)
	b[7] = 0x20 | SMCTypeN<<2 | SMCTypeD
	p, err := DecodeProposal(b)
	if err != nil {
		t.Fatal(err)
	}
	if p.Version != 2 || p.TypeV2 != SMCTypeN || p.V2 != nil || p.GID != 0x0102030405060708 {
		t.Fatalf("decoded %+v", p)
	}
	b[7] = 0x20 | SMCTypeD<<2 | SMCTypeD
	if _, err := DecodeProposal(b); !errors.Is(err, ErrCLC) {
		t.Fatalf("v2 offer without the extension: %v", err)
	}
}

func TestCLCAcceptsBothEyecatchers(t *testing.T) {
	for _, g := range []string{goldenProposal, goldenAccept, goldenDecline} {
		b := golden(t, g)
		for _, eye := range [][4]byte{EyecatcherR, EyecatcherD} {
			copy(b, eye[:])
			copy(b[len(b)-4:], eye[:])
			var err error
			switch b[4] {
			case CLCProposal:
				_, err = DecodeProposal(b)
			case CLCAccept:
				_, err = DecodeAcceptConfirm(b, CLCAccept)
			case CLCDecline:
				_, err = DecodeDecline(b)
			}
			if err != nil {
				t.Errorf("type %d eyecatcher %x: %v", b[4], eye, err)
			}
		}
	}
}

func TestCLCStrictRejects(t *testing.T) {
	type tc struct {
		name   string
		golden string
		mutate func([]byte) []byte
	}
	cases := []tc{
		{"bad eyecatcher", goldenProposal, func(b []byte) []byte { b[3] = 0; return b }},
		{"bad trailer", goldenProposal, func(b []byte) []byte { b[len(b)-1] = 0; return b }},
		{"length field short", goldenProposal, func(b []byte) []byte { b[6]--; return b }},
		{"truncated", goldenProposal, func(b []byte) []byte { return b[:len(b)-1] }},
		{"trailing byte", goldenProposal, func(b []byte) []byte { b = append(b, 0); b[6]++; return b }},
		{"wrong type", goldenProposal, func(b []byte) []byte { b[4] = CLCConfirm; return b }},
		{"typev1 N", goldenProposal, func(b []byte) []byte { b[7] = 0x12; return b }},
		{"iparea_offset", goldenProposal, func(b []byte) []byte { b[39] = 0x20; return b }},
		{"v2 ext offset in v1", goldenProposal, func(b []byte) []byte { b[51] = 1; return b }},
		{"ipv4 prefix len", goldenProposal, func(b []byte) []byte { b[84] = 33; return b }},
		{"accept length", goldenAccept, func(b []byte) []byte { b = append(b[:44:44], 0, 0, 0, 0, 0xe2, 0xd4, 0xc3, 0xc4); b[6] = 52; return b }},
		{"accept SMC-R", goldenAccept, func(b []byte) []byte { b[7] = 0x10; return b }},
		{"accept version 2", goldenAccept, func(b []byte) []byte { b[7] = 0x21; return b }},
		{"decline v1 44 bytes", goldenDecline, func(b []byte) []byte {
			b = append(b[:24:24], make([]byte, 20)...)
			b[6] = 44
			copy(b[40:], EyecatcherR[:])
			return b
		}},
		{"decline trailer", goldenDecline, func(b []byte) []byte { b[27] = 0xd9 ^ 1; return b }},
	}
	for _, c := range cases {
		b := c.mutate(golden(t, c.golden))
		var err error
		switch c.golden {
		case goldenProposal:
			_, err = DecodeProposal(b)
		case goldenAccept:
			_, err = DecodeAcceptConfirm(b, CLCAccept)
		case goldenDecline:
			_, err = DecodeDecline(b)
		}
		if err == nil {
			t.Errorf("%s: accepted %x", c.name, b)
		}
	}
}

func TestReadCLC(t *testing.T) {
	p := golden(t, goldenProposal)
	d := golden(t, goldenDecline)
	stream := bytes.NewReader(append(append(append([]byte{}, p...), d...), "tail"...))
	typ, b, err := ReadCLC(stream)
	if err != nil || typ != CLCProposal || !bytes.Equal(b, p) {
		t.Fatalf("first: %d %x %v", typ, b, err)
	}
	typ, b, err = ReadCLC(stream)
	if err != nil || typ != CLCDecline || !bytes.Equal(b, d) {
		t.Fatalf("second: %d %x %v", typ, b, err)
	}
	if stream.Len() != 4 {
		t.Fatalf("ReadCLC consumed past the message: %d left", stream.Len())
	}
	if _, _, err := ReadCLC(strings.NewReader("GET / HTTP/1.1\r\n")); !errors.Is(err, ErrCLC) {
		t.Fatalf("HTTP accepted as CLC: %v", err)
	}
	huge := append([]byte{}, p[:8]...)
	huge[5], huge[6] = 0xff, 0xff
	if _, _, err := ReadCLC(bytes.NewReader(huge)); !errors.Is(err, ErrCLC) {
		t.Fatalf("64 KiB length accepted: %v", err)
	}
}

func TestDMBESizeCode(t *testing.T) {
	for c := uint8(0); c <= 6; c++ {
		n, err := DMBESize(c)
		if err != nil || n != 16384<<c {
			t.Fatalf("code %d: %d %v", c, n, err)
		}
		back, err := DMBESizeCode(n)
		if err != nil || back != c {
			t.Fatalf("size %d: %d %v", n, back, err)
		}
	}
	if _, err := DMBESize(7); err == nil {
		t.Fatal("2 MiB code accepted")
	}
	for _, n := range []int{0, 8192, 20000, 2 << 20} {
		if _, err := DMBESizeCode(n); err == nil {
			t.Fatalf("size %d accepted", n)
		}
	}
}

// The fuzz targets check that decoders never panic and that whatever they
// accept re-encodes to the same bytes (modulo fields a v1 encoder writes in
// one fixed way), so strict decoding and exact encoding agree.

func FuzzDecodeProposal(f *testing.F) {
	f.Add(golden(f, goldenProposal))
	f.Add(golden(f, goldenKernelProposalV2))
	f.Add(golden(f, goldenProposalV1V2))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := DecodeProposal(b)
		if err != nil {
			return
		}
		e, err := p.Encode()
		if err != nil {
			t.Fatalf("decoded proposal does not encode: %v", err)
		}
		if len(e) != len(b) {
			t.Fatalf("re-encoded length %d, decoded %d", len(e), len(b))
		}
		q, err := DecodeProposal(e)
		if err != nil || !reflect.DeepEqual(p, q) {
			t.Fatalf("round trip: %v\n%+v\n%+v", err, p, q)
		}
	})
}

func FuzzDecodeAcceptConfirm(f *testing.F) {
	f.Add(golden(f, goldenAccept))
	f.Add(golden(f, goldenKernelAcceptV2))
	f.Add(golden(f, goldenKernelConfirmV2))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, typ := range []uint8{CLCAccept, CLCConfirm} {
			a, err := DecodeAcceptConfirm(b, typ)
			if err != nil {
				continue
			}
			e, err := a.Encode()
			if err != nil {
				t.Fatal(err)
			}
			// Reserved bits and the eyecatcher choice are not kept.
			q, err := DecodeAcceptConfirm(e, typ)
			if err != nil || !reflect.DeepEqual(a, q) || len(e) != len(b) {
				t.Fatalf("round trip: %v\n%+v\n%+v", err, a, q)
			}
		}
	})
}

func FuzzDecodeDecline(f *testing.F) {
	f.Add(golden(f, goldenDecline))
	f.Add(golden(f, goldenKernelDeclineV2))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := DecodeDecline(b)
		if err != nil {
			return
		}
		e, err := d.Encode()
		if err != nil {
			t.Fatal(err)
		}
		q, err := DecodeDecline(e)
		if err != nil || !reflect.DeepEqual(d, q) {
			t.Fatalf("round trip: %v\n%+v\n%+v", err, d, q)
		}
	})
}

func FuzzReadCLC(f *testing.F) {
	f.Add(golden(f, goldenProposal))
	f.Add(golden(f, goldenKernelProposalV2))
	f.Add(golden(f, goldenDecline))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		typ, msg, err := ReadCLC(r)
		if err != nil {
			return
		}
		if typ != msg[4] || len(msg) < DeclineLen || len(msg) > clcMaxLen || r.Len() != len(b)-len(msg) {
			t.Fatalf("type %d, %d bytes, %d left of %d", typ, len(msg), r.Len(), len(b))
		}
	})
}
