package vm

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// TestSMCNetlink: the guest kernel's SMC through its netlink interfaces,
// with no C tools: smcctl (from the image) adds, lists and removes a user
// EID, refuses a bad one and a duplicate with one line each, shows the
// system info, the SMC-D devices (none: no ISM device here) and the AF_SMC
// sockets; guestdriver/smcnl sees the same listener and a kernel-to-kernel
// connection that fell back to TCP (no SMC device).
func TestSMCNetlink(t *testing.T) {
	r := vmharness.New(t)
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smc-netlink", Timeout: 3 * time.Minute})
	o := a.RequireOK(0)
	res := o.Results
	for _, k := range []string{"ueid_add", "ueid_add_again", "ueid_add_bad", "ueid_list", "info", "devices", "ss", "ueid_list_after",
		"api_ueids", "api_flushed", "api_system", "api_devices", "api_listen", "api_client", "api_server"} {
		if code, ok := res[k+"_exit"]; ok {
			t.Logf("%s: %q (exit %s)", k, res[k], code)
		} else {
			t.Logf("%s: %q", k, res[k])
		}
	}
	want := map[string]string{
		"ueid_add": "", "ueid_add_exit": "0",
		"ueid_add_again": `smcctl: UEID "ISM-SMCNL.TEST" is already set: file exists`, "ueid_add_again_exit": "1",
		"ueid_add_bad_exit": "1",
		"ueid_list":         "ISM-SMCNL.TEST",
		"ueid_list_after":   "",
		"api_ueids":         "ISM-A,ISM-B",
		"api_flushed":       "0 <nil>",
		"api_devices":       "0",
	}
	for k, v := range want {
		if res[k] != v {
			t.Errorf("%s = %q, want %q", k, res[k], v)
		}
	}
	if !strings.HasPrefix(res["ueid_add_bad"], `smcctl: UEID "bad name": `) || strings.Contains(res["ueid_add_bad"], " | ") {
		t.Errorf("bad UEID: %q, want one line about it", res["ueid_add_bad"])
	}
	if !strings.Contains(res["info"], "SMC version:   2.") || !strings.Contains(res["info"], "UEIDs:         ISM-SMCNL.TEST") {
		t.Errorf("info: %q", res["info"])
	}
	if !strings.HasPrefix(res["api_system"], "version=2.") {
		t.Errorf("api_system: %q", res["api_system"])
	}
	if !strings.HasPrefix(res["api_listen"], "state=LISTEN ") {
		t.Errorf("listener: %q", res["api_listen"])
	}
	for _, k := range []string{"api_client", "api_server"} {
		if !strings.Contains(res[k], "mode=TCP ") || strings.Contains(res[k], "reason=0x00000000 ") {
			t.Errorf("%s: %q, want a fallback with its reason", k, res[k])
		}
	}
	if strings.Count(res["ss"], " | ") < 3 || !strings.Contains(res["ss"], "TCP 0x") {
		t.Errorf("ss: %q, want a header, the listener and both ends, fallen back", res["ss"])
	}
}

// TestSMCNetlinkSMCKernel: the same on the SMC kernel (Linux 7.3, DIBS with
// loopback-ism built in), whose netlink smcnl was written from: SMC-Dv2 is
// possible (loopback-ism), the SEID is disabled (x86), and the AF_SMC
// connection over 127.0.0.1 is SMC-D through loopback-ism (CHID 0xffff),
// with its DMB tokens in smc_diag and its link groups in
// SMC_NETLINK_GET_LGR_SMCD. SMC_NETLINK_GET_DEV_SMCD leaves loopback-ism
// out, so there are no devices.
func TestSMCNetlinkSMCKernel(t *testing.T) {
	r := vmharness.New(t)
	vmharness.NeedSMCKernel(t, r.Cfg)
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smc-netlink", SMCKernel: true, Timeout: 3 * time.Minute})
	o := a.RequireOK(0)
	res := o.Results
	for _, k := range []string{"info", "ss", "linkgroups", "api_system", "api_client", "api_server", "api_linkgroups", "api_linkgroup_0", "api_linkgroup_1"} {
		t.Logf("%s: %q", k, res[k])
	}
	want := map[string]string{
		"ueid_add_exit": "0", "ueid_add_again_exit": "1", "ueid_add_bad_exit": "1",
		"ueid_list": "ISM-SMCNL.TEST", "ueid_list_after": "",
		"api_ueids": "ISM-A,ISM-B", "api_flushed": "0 <nil>", "api_devices": "0",
	}
	for k, v := range want {
		if res[k] != v {
			t.Errorf("%s = %q, want %q", k, res[k], v)
		}
	}
	if !strings.HasPrefix(res["api_system"], "version=2.1 ismv2=true ") || !strings.Contains(res["info"], "SEID:          - (disabled)") {
		t.Errorf("system: %q; info %q", res["api_system"], res["info"])
	}
	for _, k := range []string{"api_client", "api_server"} {
		if !strings.Contains(res[k], "mode=SMCD ") {
			t.Errorf("%s: %q, want SMC-D over loopback-ism", k, res[k])
		}
	}
	if strings.Count(res["ss"], "SMCD token=0x") != 2 {
		t.Errorf("ss: %q, want both ends SMC-D with their tokens", res["ss"])
	}
	n, _ := strconv.Atoi(res["api_linkgroups"])
	if n == 0 {
		t.Fatalf("no SMC-D link group while a connection is open")
	}
	for i := range n {
		if lg := res[fmt.Sprintf("api_linkgroup_%d", i)]; !strings.HasPrefix(lg, "chid=0xffff ") || !strings.Contains(lg, " conns=1") {
			t.Errorf("link group %d: %q, want loopback-ism's CHID and the one connection", i, lg)
		}
	}
}
