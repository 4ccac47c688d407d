package vmharness

import (
	"strings"
	"testing"
	"time"
)

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

func TestQEMUArgs(t *testing.T) {
	r := &Run{Cfg: Config{Accel: "tcg", Kernel: "k", Initrd: "i"}}
	has := func(a []string, seq ...string) bool {
		for i := 0; i+len(seq) <= len(a); i++ {
			if strings.Join(a[i:i+len(seq)], "\x00") == strings.Join(seq, "\x00") {
				return true
			}
		}
		return false
	}
	one := r.qemuArgs(VMConfig{MemMB: 512}, "s", "q", "")
	if !has(one, "-smp", "1") || has(one, "-chardev", "socket,id=ctl0,path=,server=on,wait=off") {
		t.Errorf("default: %q", one)
	}
	two := r.qemuArgs(VMConfig{MemMB: 512, CPUs: 2, Control: true}, "s", "q", "/d/a.ctl")
	if !has(two, "-smp", "2") || !has(two, "-chardev", "socket,id=ctl0,path=/d/a.ctl,server=on,wait=off", "-serial", "chardev:ctl0") {
		t.Errorf("CPUs 2 with control: %q", two)
	}
	srv, cli := NetEnd{Port: 4000, Server: true, MAC: "52:54:00:00:00:01"}, NetEnd{Port: 4000, MAC: "52:54:00:00:00:02", Model: NICE1000}
	a := r.qemuArgs(VMConfig{MemMB: 512, Net: &srv}, "s", "q", "")
	if !has(a, "-netdev", "stream,id=n0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=4000", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01") {
		t.Errorf("default NIC: %q", a)
	}
	b := r.qemuArgs(VMConfig{MemMB: 512, Net: &cli}, "s", "q", "")
	if !has(b, "-netdev", "stream,id=n0,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port=4000", "-device", "e1000,netdev=n0,mac=52:54:00:00:00:02") {
		t.Errorf("e1000: %q", b)
	}
}

func TestScaled(t *testing.T) {
	c := Config{TimeoutScale: 2.5}
	if got := c.Scaled(4 * time.Second); got != 10*time.Second {
		t.Errorf("Scaled(4s) at 2.5 = %v", got)
	}
	if got := (Config{}).Scaled(time.Second); got != time.Second {
		t.Errorf("Scaled with no scale = %v", got)
	}
	t.Setenv("ISM_TIMEOUT_SCALE", "3")
	if s, _, err := timeoutScale(); err != nil || s != 3 {
		t.Errorf("ISM_TIMEOUT_SCALE=3: %v, %v", s, err)
	}
	t.Setenv("ISM_TIMEOUT_SCALE", "-1")
	if _, _, err := timeoutScale(); err == nil {
		t.Error("ISM_TIMEOUT_SCALE=-1 accepted")
	}
	t.Setenv("ISM_TIMEOUT_SCALE", "")
	if s, src, err := timeoutScale(); err != nil || s < 1 || s > 4 {
		t.Errorf("default scale %v (%s), %v; want within [1, 4]", s, src, err)
	}
}
