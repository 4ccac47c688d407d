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
