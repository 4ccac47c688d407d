package smcnl

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"
)

// diagMsg is struct smc_diag_msg as __smc_diag_dump fills it.
func diagMsg(family, state uint8, mode Mode, src, dst netip.AddrPort) []byte {
	b := make([]byte, diagMsgLen)
	b[0], b[1], b[2] = family, state, byte(mode)
	binary.BigEndian.PutUint16(b[4:], src.Port())
	binary.BigEndian.PutUint16(b[6:], dst.Port())
	if src.Addr().Is4() {
		a, d := src.Addr().As4(), dst.Addr().As4()
		copy(b[8:], a[:])
		copy(b[24:], d[:])
	} else {
		a, d := src.Addr().As16(), dst.Addr().As16()
		copy(b[8:], a[:])
		copy(b[24:], d[:])
	}
	binary.NativeEndian.PutUint32(b[4+48:], 1000)
	binary.NativeEndian.PutUint64(b[4+48+4:], 4242)
	return b
}

func TestDecodeSocketSMCD(t *testing.T) {
	src, dst := netip.MustParseAddrPort("169.254.7.1:7000"), netip.MustParseAddrPort("169.254.7.2:40000")
	msg := diagMsg(unix.AF_SMC, 1, ModeSMCD, src, dst)
	msg = append(msg, at(diagShutdown, u8(0))...)
	msg = append(msg, at(diagFallback, append(u32(0), u32(0)...))...)
	ci := append(append(append(u32(0x11), u32(65536)...), u32(65504)...), u32(65504)...)
	ci = append(ci, make([]byte, 60)...) // the cursors, not read here
	msg = append(msg, at(diagConnInfo, ci)...)
	dmb := bytes.Join([][]byte{u32(0x01000000), u32(0), u64(0x2222), u64(0x1111), u64(0xaa), u64(0xbb), u64(0), u64(0)}, nil)
	msg = append(msg, at(diagDMBInfo, dmb)...)
	s, err := decodeSocket(msg)
	if err != nil {
		t.Fatal(err)
	}
	want := Socket{State: 1, Mode: ModeSMCD, Local: src, Peer: dst, UID: 1000, Inode: 4242,
		Fallback: &Fallback{}, Conn: &ConnInfo{Token: 0x11, SndBufSize: 65536, RMBESize: 65504, PeerRMBESize: 65504},
		DMB: &DMBInfo{LinkID: 0x01000000, GID: 0x1111, PeerGID: 0x2222, Token: 0xaa, PeerToken: 0xbb}}
	if !reflect.DeepEqual(s, want) {
		t.Fatalf("decoded\n%+v\nwant\n%+v", s, want)
	}
}

func TestDecodeSocketFallback(t *testing.T) {
	src, dst := netip.MustParseAddrPort("[fe80::1]:7000"), netip.MustParseAddrPort("[fe80::2]:40000")
	msg := diagMsg(unix.AF_SMC, 1, ModeFallbackTCP, src, dst)
	// an unknown attribute (5 bytes, padded to 8), then the fallback one
	msg = append(msg, 5, 0, 9, 0, 0xff, 0, 0, 0)
	msg = append(msg, at(diagFallback, append(u32(0x03030000), u32(0x03010000)...))...)
	s, err := decodeSocket(msg)
	if err != nil {
		t.Fatal(err)
	}
	if s.Local != src || s.Peer != dst || s.Mode != ModeFallbackTCP || s.Fallback == nil ||
		*s.Fallback != (Fallback{0x03030000, 0x03010000}) || s.DMB != nil || s.Conn != nil {
		t.Fatalf("decoded %+v", s)
	}
	if DeclineText(s.Fallback.Reason) != "no SMC device found (R or D)" {
		t.Fatalf("DeclineText = %q", DeclineText(s.Fallback.Reason))
	}
	for name, b := range map[string][]byte{
		"short message":     msg[:20],
		"attribute overrun": append(append([]byte{}, msg[:diagMsgLen]...), 40, 0, 5, 0),
		"short fallback":    append(append([]byte{}, msg[:diagMsgLen]...), at(diagFallback, u32(1))...),
		"short DMB info":    append(append([]byte{}, msg[:diagMsgLen]...), at(diagDMBInfo, make([]byte, 39))...),
		"short conn info":   append(append([]byte{}, msg[:diagMsgLen]...), at(diagConnInfo, make([]byte, 15))...),
	} {
		if _, err := decodeSocket(b); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
}
