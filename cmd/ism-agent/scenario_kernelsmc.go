package main

// The Linux kernel's own SMC-D on the SMC kernel
// (scripts/provision-smc-kernel.sh: Linux 7.x with DIBS, DIBS_LO and SMC
// built in; VMConfig.SMCKernel), with AF_SMC sockets from x/sys/unix: what
// kernel-lo, kernel-smcd (scenario_kernelsmcd.go) and the bench's kernel
// transports share.
//
//	kernel-lo  server and client in this one guest over 127.0.0.1: SMC-D
//	           through the kernel's loopback-ism (DIBS_LO), ism.conns
//	           connections of ism.bytes in all
//
// kernelSMCSetup loads our DIBS driver (ism.kmod, default ism_dibs, from
// /lib/modules/<release>/extra, where images/build.sh puts
// scripts/build-kmod.sh's build, with ism.kmod_params; "none" skips it:
// kernel-lo needs none) and sets the UEID ism.ueid (default
// ISM-BACKEND-GUESTS): SMC-Dv2, the only SMC-D a non-s390 kernel does,
// proposes only with a UEID both ends share (or a system EID, which only
// s390 has). Then it waits until the kernel is SMC-Dv2 capable and, with
// the driver, lists an SMC-D device (reported as devices).
//
// Data: as smcd-server/-client's send and sink (connection index, the
// seeded stream, half-close, the SHA-256 echoed back, which the sender
// checks): the sender reports sha_<i>, the receiver recv_sha_<i>. Each end
// reports the kernel's view of its socket from smc_diag as kernel_mode_<i>
// (smcd, smcr or fallback; a fallback also fails the connection unless
// ism.allow_fallback=1).

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/guestdriver/smcnl"
)

func init() { register("kernel-lo", kernelLoopback) }

// kernelSMCDefaultUEID is what the VM tests and the bench give every guest.
const kernelSMCDefaultUEID = "ISM-BACKEND-GUESTS"

// kernelSMCSetup readies the kernel's SMC-D: our driver (kmod "none":
// not), the UEID, and then the state SMC-D needs: with the driver, an
// SMC-D device the kernel lists (loopback-ism is never listed); always,
// the kernel's SMC-Dv2 capability, which a device's add_vlan_id(0x1FFF)
// or loopback-ism gives it.
func kernelSMCSetup(e *Env, defKmod string) error {
	kmod := e.Arg("kmod", defKmod)
	if kmod != "none" {
		var u unix.Utsname
		if err := unix.Uname(&u); err != nil {
			return err
		}
		path := "/lib/modules/" + unix.ByteSliceToString(u.Release[:]) + "/extra/" + kmod + ".ko"
		if err := loadKmod(path, e.Arg("kmod_params", "")); err != nil {
			return err
		}
	}
	if err := smcnl.AddUEID(e.Arg("ueid", kernelSMCDefaultUEID)); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	for {
		devs, err := smcnl.SMCDDevices()
		var sys smcnl.System
		if err == nil {
			sys, err = smcnl.SystemInfo()
		}
		if err == nil && sys.ISMv2 && (kmod == "none" || len(devs) > 0) {
			var ids []string
			for _, d := range devs {
				ids = append(ids, d.PCIID)
			}
			e.Result("devices", strings.Join(ids, ","))
			return nil
		}
		select {
		case <-e.Ctx.Done():
			return fmt.Errorf("waiting for the kernel's SMC-Dv2 (devices %+v, system %+v, %v): %w", devs, sys, err, e.Ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// kernelView reports the kernel's smc_diag view of the AF_SMC socket of c
// (local side first) as kernel_mode_<i>, and fails on a fallback unless
// allowed.
func kernelView(e *Env, c net.Conn, i int, allowFallback bool) error {
	l, r := c.LocalAddr().(*net.TCPAddr), c.RemoteAddr().(*net.TCPAddr)
	if l == nil || r == nil {
		return fmt.Errorf("connection %d: not a TCP address pair (%v, %v)", i, c.LocalAddr(), c.RemoteAddr())
	}
	d, err := smcDiagOf(l.Port, r.Port)
	if err != nil {
		return err
	}
	e.Result(fmt.Sprintf("kernel_mode_%d", i), d.String())
	if d.Mode != smcDiagModeSMCD && !allowFallback {
		return fmt.Errorf("connection %d: the kernel says %v, want SMC-D", i, d)
	}
	return nil
}

func kernelSMCArgs(e *Env) (smcArgs, bool, error) {
	a, err := smcdArgs(e, "send")
	return a, e.Arg("allow_fallback", "0") == "1", err
}

// kernelSMCServe accepts a.conns AF_SMC connections on lfd and sinks each.
func kernelSMCServe(e *Env, lfd int, a smcArgs, allowFallback bool) error {
	var wg sync.WaitGroup
	errs := make([]error, a.conns)
	for i := range a.conns {
		fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			errs[i] = fmt.Errorf("AF_SMC accept: %w", err)
			break
		}
		c, err := smcConn(fd)
		unix.Close(fd)
		if err != nil {
			errs[i] = err
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			errs[i] = errors.Join(kernelView(e, c, i, allowFallback), sinkStream(e, c))
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// kernelSMCDial opens a.conns AF_SMC connections to addr and sends on each.
func kernelSMCDial(e *Env, addr *net.TCPAddr, a smcArgs, allowFallback bool) error {
	var wg sync.WaitGroup
	errs := make([]error, a.conns)
	per := a.bytes / a.conns
	for i := range a.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := smcDialPeer(e, addr)
			if err != nil {
				errs[i] = err
				return
			}
			defer c.Close()
			errs[i] = errors.Join(kernelView(e, c, i, allowFallback), send(e, c, i, per, a))
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func kernelLoopback(e *Env) error {
	if err := kernelSMCSetup(e, "none"); err != nil {
		return err
	}
	a, allowFallback, err := kernelSMCArgs(e)
	if err != nil {
		return err
	}
	lfd, port, err := smcListen(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, 0)
	if err != nil {
		return err
	}
	defer unix.Close(lfd)
	done := make(chan error, 1)
	go func() { done <- kernelSMCServe(e, lfd, a, allowFallback) }()
	err = kernelSMCDial(e, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}, a, allowFallback)
	return errors.Join(err, <-done)
}

// sinkStream is sink for a connection that is not our stack's: the index,
// the stream hashed until EOF, the digest written back.
func sinkStream(e *Env, c net.Conn) error {
	var idx [4]byte
	if _, err := io.ReadFull(c, idx[:]); err != nil {
		return fmt.Errorf("reading connection index: %w", err)
	}
	i := binary.BigEndian.Uint32(idx[:])
	h := sha256.New()
	n, err := io.Copy(h, c)
	e.Result(fmt.Sprintf("bytes_%d", i), n)
	if err != nil {
		return fmt.Errorf("connection %d after %d bytes: %w", i, n, err)
	}
	sum := h.Sum(nil)
	e.Result(fmt.Sprintf("recv_sha_%d", i), hex.EncodeToString(sum))
	if _, err := c.Write(sum); err != nil {
		return fmt.Errorf("connection %d: writing digest: %w", i, err)
	}
	return nil
}
