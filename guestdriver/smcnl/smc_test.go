package smcnl

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// unhex reads a fixture written as hex with spaces and line breaks.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Fixtures below are written out from the kernel's definitions
// (include/uapi/linux/smc.h, genetlink.h, netlink.h), little-endian (x86).

func TestEncodeGetFamily(t *testing.T) {
	got := appendMessage(nil, unix.GENL_ID_CTRL, unix.NLM_F_REQUEST|unix.NLM_F_ACK, 7, encodeGetFamily(familyName))
	want := unhex(t, `
		28000000 1000 0500 07000000 00000000
		03 01 0000
		1400 0200 534d435f47454e5f4e45544c494e4b00`) // "SMC_GEN_NETLINK\0"
	if !bytes.Equal(got, want) {
		t.Fatalf("GETFAMILY request\n got % x\nwant % x", got, want)
	}
}

func TestEncodeAddUEID(t *testing.T) {
	p, err := ValidateUEID("ISM-TEST")
	if err != nil {
		t.Fatal(err)
	}
	got := appendMessage(nil, 0x1d, unix.NLM_F_REQUEST|unix.NLM_F_ACK, 7, genlPayload(cmdAddUEID, familyVer, encodeUEID(p)))
	// nla_len 37: the 32-byte blank-padded EID and its NUL, which is the
	// exact length smc_nl_add_ueid insists on; then 3 bytes of padding.
	want := unhex(t, `
		3c000000 1d00 0500 07000000 00000000
		0a 01 0000
		2500 0100 4953 4d2d 5445 5354
		20202020 20202020 20202020 20202020 20202020 20202020
		00 000000`)
	if !bytes.Equal(got, want) {
		t.Fatalf("ADD_UEID request\n got % x\nwant % x", got, want)
	}
}

func TestEncodeDiagRequest(t *testing.T) {
	got := appendMessage(nil, unix.SOCK_DIAG_BY_FAMILY, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, 1, encodeDiagRequest())
	want := unhex(t, `
		44000000 1400 0103 01000000 00000000
		2b 0000 19
		0000 0000 00000000000000000000000000000000 00000000000000000000000000000000
		00000000 ffffffff ffffffff`)
	if !bytes.Equal(got, want) {
		t.Fatalf("smc_diag request\n got % x\nwant % x", got, want)
	}
}

func TestValidateUEID(t *testing.T) {
	pad := func(s string) string { return s + strings.Repeat(" ", EIDLen-len(s)) }
	for _, c := range []struct {
		in, want string // want "" means rejected
	}{
		{"ISM-TEST", pad("ISM-TEST")},
		{"A", pad("A")},
		{"0.1-X", pad("0.1-X")},
		{"SEID  ", pad("SEID")},
		{strings.Repeat("Z", 32), strings.Repeat("Z", 32)},
		{strings.Repeat("Z", 33), ""},
		{"", ""},
		{"   ", ""},
		{"-ABC", ""},
		{".ABC", ""},
		{" ABC", ""},
		{"AB C", ""},
		{"ism-test", ""},
		{"ABc", ""},
		{"AB_C", ""},
		{"AB\tC", ""},
		{"ABC\t", ""},
		{"ABC\x00", ""},
		{"\xc0BC", ""},
	} {
		got, err := ValidateUEID(c.in)
		if c.want == "" {
			if err == nil {
				t.Errorf("ValidateUEID(%q) = %q, want an error", c.in, got)
			} else if !errors.Is(err, unix.EINVAL) {
				t.Errorf("ValidateUEID(%q): %v does not wrap EINVAL", c.in, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ValidateUEID(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	// Bad names never reach the kernel.
	if err := AddUEID("lower"); !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "lower case") {
		t.Errorf("AddUEID(lower) = %v", err)
	}
}

// genlMsg builds a reply as the kernel's genlmsg_put would.
func genlMsg(family uint16, cmd uint8, seq uint32, flags uint16, attrs []byte) []byte {
	return appendMessage(nil, family, flags, seq, genlPayload(cmd, familyVer, attrs))
}

func u8(v uint8) []byte   { return []byte{v} }
func u16(v uint16) []byte { return binary.NativeEndian.AppendUint16(nil, v) }
func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }
func cstr(s string) []byte {
	return append([]byte(s), 0)
}
func nest(typ uint16, attrs ...[]byte) []byte {
	return appendAttr(nil, typ|unix.NLA_F_NESTED, bytes.Join(attrs, nil))
}
func at(typ uint16, data []byte) []byte { return appendAttr(nil, typ, data) }

func replyAttrs(t *testing.T, msg []byte) [][]attr {
	t.Helper()
	msgs, err := parseMessages(msg)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]attr
	for _, m := range msgs {
		_, a, err := splitGenl(m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

func TestDecodeSystem(t *testing.T) {
	// An x86 kernel with one v2-capable ISM device: the SEID is 32 NULs,
	// the host name is blank-padded to 32.
	msg := genlMsg(0x1d, cmdGetSysInfo, 3, unix.NLM_F_MULTI, nest(genSysInfo,
		at(sysVer, u8(2)), at(sysRel, u8(1)), at(sysIsISMv2, u8(1)), at(sysIsSMCRv2, u8(1)),
		at(sysHost, cstr("guest1"+strings.Repeat(" ", 26))),
		at(sysSEID, cstr(""))))
	sys, err := decodeSystem(replyAttrs(t, msg))
	if err != nil {
		t.Fatal(err)
	}
	want := System{Version: 2, Release: 1, ISMv2: true, SMCRv2: true, Host: "guest1"}
	if !reflect.DeepEqual(sys, want) {
		t.Fatalf("decoded %+v, want %+v", sys, want)
	}
	bad := genlMsg(0x1d, cmdGetSysInfo, 3, unix.NLM_F_MULTI, nest(genSysInfo, at(sysVer, u8(2)), at(sysRel, []byte{1, 2, 3})))
	if _, err := decodeSystem(replyAttrs(t, bad)); err == nil {
		t.Fatal("a 3-byte release decoded")
	}
	if _, err := decodeSystem(nil); err == nil {
		t.Fatal("no SYS_INFO nest decoded")
	}
}

func TestDecodeSMCDDevice(t *testing.T) {
	// One reply as smc_nl_handle_smcd_dev sends it on x86: no FID or PCHID,
	// the parent's PCI name and ids, the port nest with an empty PNETID.
	msg := unhex(t, `
		70000000 1d00 0200 03000000 00000000
		05 01 0000
		5c00 0580
		  0800 0100 02000000
		  0500 0200 01000000
		  0800 0300 00000000
		  0600 0400 0000 0000
		  0600 0500 f41a 0000
		  0600 0600 ff10 0000
		  1100 0700 303030303a30303a30342e3000 000000
		  1400 0880
		    0500 0100 00000000
		    0500 0200 00000000`)
	got := replyAttrs(t, msg)
	dev, ok, err := decodeSMCDDevice(got[0])
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	want := SMCDDevice{PCIID: "0000:00:04.0", Vendor: 0x1af4, Device: 0x10ff, UseCount: 2, Critical: true}
	if dev != want {
		t.Fatalf("decoded %+v, want %+v", dev, want)
	}
	// A nest whose last attribute runs past it is refused.
	msg[len(msg)-8] = 0x09
	if _, _, err := decodeSMCDDevice(replyAttrs(t, msg)[0]); err == nil {
		t.Fatal("an attribute longer than its nest decoded")
	}
}

func TestDecodeSMCDLinkGroup(t *testing.T) {
	msg := genlMsg(0x1d, cmdGetLGRSMCD, 3, unix.NLM_F_MULTI, nest(genLGRSMCD,
		at(lgrID, u32(0x01000000)),
		at(lgrGID, u64(0x1111)), at(lgrExtGID, u64(0)),
		at(lgrPeerGID, u64(0x2222)), at(lgrPeerExtGID, u64(0)),
		at(lgrVLAN, u8(0)), at(lgrConns, u32(3)),
		at(lgrCHID, u32(0xff00)), // declared u16, sent with nla_put_u32
		at(lgrSndbufAll, u64(3<<16)), at(lgrDMBAlloc, u32(3*(65536+32))),
		at(lgrPNETID, cstr("")),
		nest(lgrV2Common, at(v2Ver, u8(2)), at(v2Rel, u8(1)), at(v2OS, u8(3)),
			at(v2PeerHost, cstr("peer"+strings.Repeat(" ", 28))),
			at(v2NegEID, cstr("ISM-TEST"+strings.Repeat(" ", 24))))))
	lg, ok, err := decodeSMCDLinkGroup(replyAttrs(t, msg)[0])
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	want := SMCDLinkGroup{ID: 0x01000000, GID: 0x1111, PeerGID: 0x2222, CHID: 0xff00, Conns: 3,
		SndBufAlloc: 3 << 16, DMBAlloc: 3 * (65536 + 32),
		V2: &LinkGroupV2{Version: 2, PeerRelease: 1, PeerOS: 3, PeerHost: "peer", NegotiatedEID: "ISM-TEST"}}
	if !reflect.DeepEqual(lg, want) {
		t.Fatalf("decoded %+v %+v, want %+v %+v", lg, lg.V2, want, want.V2)
	}
	over := genlMsg(0x1d, cmdGetLGRSMCD, 3, unix.NLM_F_MULTI, nest(genLGRSMCD, at(lgrCHID, u32(0x10000))))
	if _, _, err := decodeSMCDLinkGroup(replyAttrs(t, over)[0]); err == nil {
		t.Fatal("a CHID of 17 bits decoded")
	}
}

func TestDecodeUEIDs(t *testing.T) {
	var b []byte
	for _, n := range []string{"ISM-TEST", "B"} {
		b = append(b, genlMsg(0x1d, cmdDumpUEID, 3, unix.NLM_F_MULTI, at(eidEntry, cstr(n+strings.Repeat(" ", 32-len(n)))))...)
	}
	if got := decodeUEIDs(replyAttrs(t, b)); !reflect.DeepEqual(got, []string{"ISM-TEST", "B"}) {
		t.Fatalf("decoded %q", got)
	}
	seid := genlMsg(0x1d, cmdDumpSEID, 3, unix.NLM_F_MULTI, append(at(seidEntry, cstr("")), at(seidEnabled, u8(1))...))
	if on, err := decodeSEIDEnabled(replyAttrs(t, seid)); err != nil || !on {
		t.Fatalf("SEID enabled = %v, %v", on, err)
	}
}

func TestParseAttrsBounds(t *testing.T) {
	for _, c := range []struct {
		name string
		b    []byte
		ok   bool
	}{
		{"empty", nil, true},
		{"last unpadded", []byte{5, 0, 1, 0, 7}, true},
		{"padded", []byte{5, 0, 1, 0, 7, 0, 0, 0, 4, 0, 2, 0}, true},
		{"short header", []byte{4, 0, 1}, false},
		{"length below header", []byte{3, 0, 1, 0}, false},
		{"length past end", []byte{9, 0, 1, 0, 1, 2, 3, 4}, false},
		{"trailing bytes", []byte{4, 0, 1, 0, 0, 0}, false},
	} {
		_, err := parseAttrs(c.b)
		if (err == nil) != c.ok {
			t.Errorf("%s: err %v", c.name, err)
		}
	}
	if _, err := (attr{Data: []byte{1, 2, 3}}).uint(32); err == nil {
		t.Error("3-byte integer read")
	}
	if v, err := (attr{Data: u16(0x1234)}).uint(16); err != nil || v != 0x1234 {
		t.Errorf("u16 = %#x, %v", v, err)
	}
	if _, err := (attr{Data: u32(0x100)}).uint(8); err == nil {
		t.Error("0x100 read as u8")
	}
}

func TestParseMessagesBounds(t *testing.T) {
	ok := genlMsg(0x1d, 1, 1, 0, nil)
	if m, err := parseMessages(append(ok, ok...)); err != nil || len(m) != 2 {
		t.Fatalf("two messages: %d, %v", len(m), err)
	}
	short := append([]byte(nil), ok...)
	binary.NativeEndian.PutUint32(short, 8)
	long := append([]byte(nil), ok...)
	binary.NativeEndian.PutUint32(long, uint32(len(ok)+4))
	for name, b := range map[string][]byte{"below header": short, "past end": long, "tail": append(ok, 1, 2, 3, 4, 5, 6, 7, 8)} {
		if _, err := parseMessages(b); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

// errno is an NLMSG_ERROR code: the negative errno.
func errno(e unix.Errno) []byte { return u32(uint32(-int32(e))) }

func TestParseError(t *testing.T) {
	req := appendMessage(nil, 0x1d, unix.NLM_F_REQUEST|unix.NLM_F_ACK, 9, genlPayload(cmdAddUEID, 1, nil))
	ack := message{Type: unix.NLMSG_ERROR, Data: append(u32(0), req[:nlHdrLen]...)}
	if err := parseError(ack); err != nil {
		t.Fatalf("ACK: %v", err)
	}
	// -EINVAL, capped, with an extended ACK message (NLMSGERR_ATTR_MSG).
	capped := message{Type: unix.NLMSG_ERROR, Flags: unix.NLM_F_CAPPED | unix.NLM_F_ACK_TLVS,
		Data: append(append(errno(unix.EINVAL), req[:nlHdrLen]...), at(unix.NLMSGERR_ATTR_MSG, cstr("Attribute failed policy validation"))...)}
	err := parseError(capped)
	var ke *Error
	if !errors.As(err, &ke) || ke.Errno != unix.EINVAL || ke.Message != "Attribute failed policy validation" {
		t.Fatalf("capped error: %#v", err)
	}
	// Uncapped: the whole request is echoed before the TLVs.
	full := message{Type: unix.NLMSG_ERROR, Flags: unix.NLM_F_ACK_TLVS,
		Data: append(append(errno(unix.EPERM), req...), at(unix.NLMSGERR_ATTR_MSG, cstr("no"))...)}
	if err := parseError(full); !errors.As(err, &ke) || ke.Errno != unix.EPERM || ke.Message != "no" {
		t.Fatalf("uncapped error: %#v", err)
	}
	if err := parseError(message{Data: []byte{1, 2}}); err == nil {
		t.Fatal("short error message parsed")
	}
	if err := parseError(message{Data: append(u32(5), req[:nlHdrLen]...)}); err == nil || errors.As(err, &ke) {
		t.Fatalf("positive error code: %v", err)
	}
}
