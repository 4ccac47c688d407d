package vmharness

import "testing"

func TestParseSerial(t *testing.T) {
	o := ParseSerial("junk\r\nISM-AGENT-BEGIN hello\r\n[ 1.0] kernel says\nISM-RESULT a=1\nISM-RESULT b=x=y\nISM-RESULT a=2\nISM-AGENT-END ok\r\n[ 6.1] reboot: Power down\n")
	if !o.Began || o.Scenario != "hello" || !o.Ended || !o.OK || o.Fail != "" {
		t.Fatalf("markers: %+v", o)
	}
	if o.Results["a"] != "2" || o.Results["b"] != "x=y" {
		t.Fatalf("results: %v", o.Results)
	}
	f := ParseSerial("ISM-AGENT-BEGIN x\nISM-AGENT-END fail: boom: bad\n")
	if !f.Ended || f.OK || f.Fail != "boom: bad" {
		t.Fatalf("fail: %+v", f)
	}
	if n := ParseSerial("no agent here\n"); n.Began || n.Ended {
		t.Fatalf("empty: %+v", n)
	}
}

func TestKernelArgs(t *testing.T) {
	got := kernelArgs(VMConfig{Scenario: "hello", HugePages: 8, Timeout: 90e9, Args: map[string]string{"peer": "169.254.7.2", "ip": "169.254.7.1/24", "msg": "a b"}, Append: []string{"loglevel=3"}})
	want := "console=ttyS0 panic=-1 quiet hugepages=8 ism.scenario=hello ism.timeout=90 ism.ip=169.254.7.1/24 ism.msg=\"a b\" ism.peer=169.254.7.2 loglevel=3"
	if got != want {
		t.Fatalf("kernelArgs:\n got %q\nwant %q", got, want)
	}
}
