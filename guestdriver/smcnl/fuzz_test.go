package smcnl

import (
	"encoding/binary"
	"testing"
)

// FuzzReplies feeds one datagram to every decoder a reply can reach. The
// seed corpus (testdata/fuzz/FuzzReplies) holds kernel-shaped replies: system
// info, an SMC-D device, a link group, UEID and SEID dumps, the controller's
// family answer, an extended ACK error and smc_diag messages.
func FuzzReplies(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		msgs, err := parseMessages(b)
		if err != nil {
			return
		}
		for _, m := range msgs {
			if uint64(len(m.Data)) > uint64(len(b)) {
				t.Fatalf("message of %d bytes from %d", len(m.Data), len(b))
			}
			_ = parseError(m)
			if s, err := decodeSocket(m.Data); err == nil {
				if s.Local.Port() != binary.BigEndian.Uint16(m.Data[4:]) {
					t.Fatalf("port %d from % x", s.Local.Port(), m.Data[4:6])
				}
			}
			_, attrs, err := splitGenl(m)
			if err != nil {
				continue
			}
			for _, a := range attrs {
				if len(a.Data) > len(m.Data) {
					t.Fatalf("attribute of %d bytes in %d", len(a.Data), len(m.Data))
				}
			}
			replies := [][]attr{attrs}
			_, _ = decodeSystem(replies)
			_, _ = decodeSEIDEnabled(replies)
			_ = decodeUEIDs(replies)
			_, _ = decodeFamilyID(msgs)
			if d, ok, err := decodeSMCDDevice(attrs); ok && err != nil {
				t.Fatalf("device %+v ok with %v", d, err)
			}
			_, _, _ = decodeSMCDLinkGroup(attrs)
		}
	})
}

// FuzzValidateUEID checks that whatever ValidateUEID accepts is what the
// kernel's smc_clc_ueid_valid accepts, in the form it stores.
func FuzzValidateUEID(f *testing.F) {
	for _, s := range []string{"ISM-TEST", "A ", "-A", "a", "AB C", "0.1-X", "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		p, err := ValidateUEID(name)
		if err != nil {
			return
		}
		if len(p) != EIDLen {
			t.Fatalf("%q padded to %d bytes", name, len(p))
		}
		if !kernelUEIDValid([]byte(p)) {
			t.Fatalf("%q accepted as %q, which the kernel refuses", name, p)
		}
	})
}

// kernelUEIDValid restates smc_clc_ueid_valid for ASCII.
func kernelUEIDValid(eid []byte) bool {
	end := len(eid) - 1
	for end >= 0 && (eid[end] == ' ' || (eid[end] >= '\t' && eid[end] <= '\r')) {
		end--
	}
	if end < 0 {
		return false
	}
	upperOrDigit := func(c byte) bool { return c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' }
	if !upperOrDigit(eid[0]) {
		return false
	}
	for _, c := range eid[:end+1] {
		if !upperOrDigit(c) && c != '.' && c != '-' {
			return false
		}
	}
	return true
}
