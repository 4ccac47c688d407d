package abi

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzDecodeRequest: any bytes decode without panic; short input is
// StatusInvalid; otherwise the header re-encodes to exactly its 48 bytes.
func FuzzDecodeRequest(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if len(b) < RequestSize {
			if !errors.Is(err, StatusInvalid) {
				t.Fatalf("%d bytes: err %v, want StatusInvalid", len(b), err)
			}
			return
		}
		if err != nil {
			t.Fatalf("%d bytes: %v", len(b), err)
		}
		out := make([]byte, RequestSize)
		r.Encode(out)
		if !bytes.Equal(out, b[:RequestSize]) {
			t.Fatalf("re-encoded %x, want %x", out, b[:RequestSize])
		}
		if r2, _ := DecodeRequest(out); r2 != r {
			t.Fatalf("round trip %+v != %+v", r2, r)
		}
		_ = r.Op.String()
	})
}
