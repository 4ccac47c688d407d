package main

import (
	"net"
	"reflect"
	"testing"
	"time"
)

func TestParseCmdline(t *testing.T) {
	got := parseCmdline(`console=ttyS0 ism.scenario=hello ism.ip=169.254.7.1/24 ism.msg="a b" ism.flag quiet ism.=x` + "\n")
	want := map[string]string{"scenario": "hello", "ip": "169.254.7.1/24", "msg": "a b", "flag": "true"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("parseCmdline = %v, want %v", got, want)
	}
}

func TestResultLine(t *testing.T) {
	for _, c := range []struct {
		k string
		v any
		w string
	}{
		{"rtt_us", 42, "ISM-RESULT rtt_us=42"},
		{"bad key", "x\ny", `ISM-RESULT bad_key=x\ny`},
		{"d", 1500 * time.Microsecond, "ISM-RESULT d=1.5ms"},
	} {
		if g := resultLine(c.k, c.v); g != c.w {
			t.Errorf("resultLine(%q, %v) = %q, want %q", c.k, c.v, g, c.w)
		}
	}
}

func TestTimeoutOf(t *testing.T) {
	for in, want := range map[string]time.Duration{"90": 90 * time.Second, "2m": 2 * time.Minute, "junk": defaultLimit, "": defaultLimit} {
		args := map[string]string{}
		if in != "" {
			args["timeout"] = in
		}
		if got := timeoutOf(args); got != want {
			t.Errorf("timeoutOf(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestInetChecksum(t *testing.T) {
	// A packet with its checksum filled in sums to zero.
	b := echoRequest(0x1234, 7)
	if c := inetChecksum(b); c != 0 {
		t.Fatalf("checksum over a checksummed packet = %#x, want 0", c)
	}
}

func TestModName(t *testing.T) {
	if g := modName("kernel/drivers/virtio/virtio_pci-x.ko.xz"); g != "virtio_pci_x" {
		t.Fatal(g)
	}
}

func TestRetryableDial(t *testing.T) {
	// Nothing listens on port 1 of the loopback: refused, which must retry.
	_, err := net.Dial("tcp", "127.0.0.1:1")
	if err == nil || !retryableDial(err) {
		t.Fatalf("dial of a closed port: %v; want a retryable error", err)
	}
}
