package main

// smc-netlink: the kernel SMC's netlink interface, through smcctl (the
// guest tool, run from the image as a user would) and guestdriver/smcnl
// directly, in one guest with smc.ko and smc_diag.ko and no ISM device.
//
//	ueid_add, ueid_add_again, ueid_add_bad, ueid_list, ueid_del,
//	ueid_list_after, info, devices, ss: smcctl's output (lines joined by
//	" | ") and <key>_exit, its exit status;
//	api_ueids, api_flushed: smcnl.UEIDs after AddUEID, after FlushUEID;
//	api_system: smcnl.SystemInfo; api_devices: len(smcnl.SMCDDevices());
//	linkgroups (smcctl), api_linkgroups and api_linkgroup_<i>:
//	smcnl.SMCDLinkGroups while the connection is open;
//	api_listen, api_client, api_server: smcnl.Sockets' view of an AF_SMC
//	listener and of a kernel-to-kernel AF_SMC connection over 127.0.0.1
//	(on Debian's 6.1 both ends fall back: there is no SMC device; on the
//	SMC kernel they use loopback-ism).

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/guestdriver/smcnl"
)

func init() { register("smc-netlink", smcNetlink) }

// smcctlPath is where images/build.sh (u-root) puts guest tools.
const smcctlPath = "/bbin/smcctl"

func smcNetlink(e *Env) error {
	for _, m := range []string{"smc", "smc_diag"} {
		if err := loadModule(m); err != nil {
			return err
		}
	}
	var errs []error
	tool := func(key string, wantExit int, args ...string) string {
		var out bytes.Buffer
		cmd := exec.CommandContext(e.Ctx, smcctlPath, args...)
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			errs = append(errs, fmt.Errorf("smcctl %s: %w", strings.Join(args, " "), err))
			return ""
		}
		text := strings.Join(strings.Split(strings.TrimRight(out.String(), "\n"), "\n"), " | ")
		e.Result(key, text)
		e.Result(key+"_exit", code)
		if code != wantExit {
			errs = append(errs, fmt.Errorf("smcctl %s: exit %d, want %d: %s", strings.Join(args, " "), code, wantExit, text))
		}
		return text
	}

	const name = "ISM-SMCNL.TEST"
	tool("ueid_add", 0, "ueid", "add", name)
	tool("ueid_add_again", 1, "ueid", "add", name)
	tool("ueid_add_bad", 1, "ueid", "add", "bad name")
	if got := tool("ueid_list", 0, "ueid", "list"); got != name {
		errs = append(errs, fmt.Errorf("ueid list after add: %q", got))
	}
	tool("info", 0, "info")
	tool("devices", 0, "devices")

	// An AF_SMC listener and a kernel-to-kernel connection to it, open
	// while smcctl ss and Sockets look.
	lfd, port, err := smcListenLoopback()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer unix.Close(lfd)
	client, err := smcDial(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer client.Close()
	sfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("AF_SMC accept: %w", err))...)
	}
	defer unix.Close(sfd)
	// Both connect and accept have returned: each end's mode is decided.
	tool("ss", 0, "ss")
	socks, err := smcnl.Sockets()
	if err != nil {
		errs = append(errs, err)
	}
	cport := client.LocalAddr().(*net.TCPAddr).Port
	for _, s := range socks {
		var key string
		switch {
		case int(s.Local.Port()) == port && s.State == 10:
			key = "api_listen"
		case int(s.Local.Port()) == cport && int(s.Peer.Port()) == port:
			key = "api_client"
		case int(s.Local.Port()) == port && int(s.Peer.Port()) == cport:
			key = "api_server"
		default:
			continue
		}
		v := fmt.Sprintf("state=%s mode=%s local=%s peer=%s", smcnl.StateName(s.State), s.Mode, s.Local, s.Peer)
		if s.Fallback != nil {
			v += fmt.Sprintf(" reason=%#08x peer_diagnosis=%#08x", s.Fallback.Reason, s.Fallback.PeerDiagnosis)
		}
		e.Result(key, v)
	}

	tool("linkgroups", 0, "linkgroups")
	lgs, err := smcnl.SMCDLinkGroups()
	if err != nil {
		errs = append(errs, err)
	}
	e.Result("api_linkgroups", len(lgs))
	for i, l := range lgs {
		v := fmt.Sprintf("chid=%#04x gid=%#x peer_gid=%#x conns=%d", l.CHID, l.GID, l.PeerGID, l.Conns)
		if l.V2 != nil {
			v += fmt.Sprintf(" v2 eid=%q", l.V2.NegotiatedEID)
		}
		e.Result(fmt.Sprintf("api_linkgroup_%d", i), v)
	}

	tool("ueid_del", 0, "ueid", "del", name)
	if got := tool("ueid_list_after", 0, "ueid", "list"); got != "" {
		errs = append(errs, fmt.Errorf("ueid list after del: %q", got))
	}

	// The API as the other scenarios call it.
	for _, n := range []string{"ISM-A", "ISM-B"} {
		if err := smcnl.AddUEID(n); err != nil {
			errs = append(errs, err)
		}
	}
	ids, err := smcnl.UEIDs()
	if err != nil {
		errs = append(errs, err)
	}
	e.Result("api_ueids", strings.Join(ids, ","))
	if !slices.Equal(ids, []string{"ISM-A", "ISM-B"}) {
		errs = append(errs, fmt.Errorf("UEIDs() = %q", ids))
	}
	if err := smcnl.AddUEID("ISM-A"); !errors.Is(err, unix.EEXIST) {
		errs = append(errs, fmt.Errorf("second AddUEID: %v, want EEXIST", err))
	}
	if err := smcnl.FlushUEID(); err != nil {
		errs = append(errs, err)
	}
	ids, err = smcnl.UEIDs()
	e.Result("api_flushed", fmt.Sprintf("%d %v", len(ids), err))
	sys, err := smcnl.SystemInfo()
	if err != nil {
		errs = append(errs, err)
	}
	e.Result("api_system", fmt.Sprintf("version=%d.%d ismv2=%v smcrv2=%v host=%q seid=%q", sys.Version, sys.Release, sys.ISMv2, sys.SMCRv2, sys.Host, sys.SEID))
	devs, err := smcnl.SMCDDevices()
	if err != nil {
		errs = append(errs, err)
	}
	e.Result("api_devices", len(devs))
	return errors.Join(errs...)
}

// smcListenLoopback is an AF_SMC listener on 127.0.0.1 (port picked by the
// kernel); its fd and port.
func smcListenLoopback() (int, int, error) {
	fd, err := unix.Socket(unix.AF_SMC, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, smcProtoIPv4)
	if err != nil {
		return -1, 0, fmt.Errorf("socket(AF_SMC): %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err == nil {
		err = unix.Listen(fd, 8)
	} else {
		err = fmt.Errorf("AF_SMC bind: %w", err)
	}
	if err != nil {
		unix.Close(fd)
		return -1, 0, err
	}
	sa, err := unix.Getsockname(fd)
	in, ok := sa.(*unix.SockaddrInet4)
	if err != nil || !ok {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("AF_SMC getsockname: %v %T", err, sa)
	}
	return fd, in.Port, nil
}
