package main

import (
	"encoding/binary"
	"testing"
)

func TestParseSMCDiag(t *testing.T) {
	msg := make([]byte, smcDiagMsgLen, smcDiagMsgLen+24)
	msg[0], msg[1], msg[2] = 43, 1, smcDiagModeFallback
	binary.BigEndian.PutUint16(msg[4:], 7000)
	binary.BigEndian.PutUint16(msg[6:], 40000)
	// an unknown attribute (5 bytes, padded to 8), then the fallback one
	other := []byte{5, 0, 9, 0, 0xff, 0, 0, 0}
	fb := make([]byte, 12)
	binary.NativeEndian.PutUint16(fb, 12)
	binary.NativeEndian.PutUint16(fb[2:], smcDiagFallbackAttr)
	binary.NativeEndian.PutUint32(fb[4:], 0x03030000)
	binary.NativeEndian.PutUint32(fb[8:], 0x03010000)
	d, err := parseSMCDiag(append(append(msg, other...), fb...))
	if err != nil {
		t.Fatal(err)
	}
	if d.SPort != 7000 || d.DPort != 40000 || !d.HasFallback || d.Reason != 0x03030000 || d.PeerDiagnosis != 0x03010000 {
		t.Fatalf("parsed %+v", d)
	}
	if s := d.String(); s != "mode=fallback reason=0x03030000 peer_diagnosis=0x03010000" {
		t.Fatalf("String() = %q", s)
	}
	if _, err := parseSMCDiag(msg[:20]); err == nil {
		t.Fatal("short message parsed")
	}
	bad := append(append([]byte{}, msg...), 40, 0, 5, 0)
	if _, err := parseSMCDiag(bad); err == nil {
		t.Fatal("attribute longer than the message parsed")
	}
}

func TestParseSMCDiagDMBInfo(t *testing.T) {
	msg := make([]byte, smcDiagMsgLen)
	msg[0], msg[1], msg[2] = 43, 1, smcDiagModeSMCD
	a := make([]byte, 4+smcDiagDMBInfoLen)
	binary.NativeEndian.PutUint16(a, uint16(len(a)))
	binary.NativeEndian.PutUint16(a[2:], smcDiagDMBInfoAttr)
	v := a[4:]
	binary.NativeEndian.PutUint32(v[0:], 7)       // linkid
	binary.NativeEndian.PutUint64(v[8:], 0x1111)  // peer_gid
	binary.NativeEndian.PutUint64(v[16:], 0x2222) // my_gid
	binary.NativeEndian.PutUint64(v[24:], 0x3333) // token
	binary.NativeEndian.PutUint64(v[32:], 0x4444) // peer_token
	binary.NativeEndian.PutUint64(v[40:], 0xeeee) // peer_gid_ext
	binary.NativeEndian.PutUint64(v[48:], 0xffff) // my_gid_ext
	d, err := parseSMCDiag(append(msg, a...))
	if err != nil {
		t.Fatal(err)
	}
	if !d.HasDMB || d.PeerGID != 0x1111 || d.MyGID != 0x2222 || d.Token != 0x3333 || d.PeerToken != 0x4444 {
		t.Fatalf("parsed %+v", d)
	}
	// A DMB attribute too short for the struct is not taken.
	short := append([]byte{}, a[:4+40]...)
	binary.NativeEndian.PutUint16(short, uint16(len(short)))
	if d, err := parseSMCDiag(append(msg, short...)); err != nil || d.HasDMB {
		t.Fatalf("short DMB info: %+v, %v", d, err)
	}
}
