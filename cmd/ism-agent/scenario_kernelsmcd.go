package main

// kernel-smcd: the Linux kernel's own SMC (AF_SMC sockets) over the ISM
// device, driven by our kernel module ism_dibs.ko (guestdriver/kernel): no
// userspace driver, no SMC-D stack of ours. One guest per role; the peer
// may also be our Go stack (smcd-server, smcd-client with ism.ueid): the
// stream is the same as theirs.
//
//	ism.role=server  listen with AF_SMC on ism.listen (default :7100), accept
//	                 one connection and sink it (sinkStream: the index, the
//	                 stream hashed until EOF, the SHA-256 answered;
//	                 recv_sha_<i>, bytes_<i>)
//	ism.role=client  connect with AF_SMC to ism.connect (default
//	                 169.254.7.1:7100) and send ism.bytes of the seeded
//	                 stream as smcd-client does (send: sha_0, the digest
//	                 checked)
//
// Before that each guest readies the kernel's SMC-D (kernelSMCSetup: the
// module, ism.kmod_params its parameters; the UEID ism.ueid) and waits for
// the dibs device the module registers. Results: dibs (its name), dibs_gid,
// dibs_fabric_id; and, from smc_diag while the connection is open,
// kernel_mode (smcd, smcr or fallback), kernel_view (mode, fallback
// reason), kernel_my_gid and kernel_peer_gid (SMC-D only). The scenario
// fails unless the kernel says SMC-D and the GID it uses is the device's.
// ism.mode=stream makes the client send until a write fails
// (kernelSMCDStream). At the end the client unloads the module
// (ism.unload=0: not) and reports unloaded=1 once its dibs device is gone.

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func init() { register("kernel-smcd", kernelSMCD) }

func kernelSMCD(e *Env) error {
	if err := kernelSMCSetup(e, "ism_dibs"); err != nil {
		return err
	}
	dev, err := waitDibs(e)
	if err != nil {
		return err
	}
	e.Result("dibs", dev.name)
	e.Result("dibs_gid", fmt.Sprintf("%#x", dev.gid))
	e.Result("dibs_fabric_id", fmt.Sprintf("%#x", dev.fabricID))
	a, _, err := kernelSMCArgs(e)
	if err != nil {
		return err
	}
	switch role := e.Arg("role", ""); role {
	case "server":
		return kernelSMCDServer(e, dev, e.Arg("listen", ":7100"))
	case "client":
		if a.mode == "stream" {
			return kernelSMCDStream(e, dev, e.Arg("connect", "169.254.7.1:7100"), a.seed)
		}
		if err := kernelSMCDClient(e, dev, e.Arg("connect", "169.254.7.1:7100"), a); err != nil {
			return err
		}
		if e.Arg("unload", "1") == "0" {
			return nil
		}
		return unloadKmod(e, dev)
	default:
		return fmt.Errorf("ism.role=%q: want server or client", role)
	}
}

// loadKmod loads the kernel module at path (finit_module) with params;
// one already loaded is fine.
func loadKmod(path, params string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("load %s: %w", path, err)
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), params, 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load %s: %w", path, err)
	}
	return nil
}

// unloadKmod removes the module (its remove path: the kernel's SMC ends its
// link groups, the driver unregisters what is left and resets the device)
// and waits until the dibs device is gone from sysfs.
func unloadKmod(e *Env, dev dibsDev) error {
	if err := unix.DeleteModule("ism_dibs", 0); err != nil {
		return fmt.Errorf("unload ism_dibs: %w", err)
	}
	for {
		if _, err := os.Stat("/sys/class/dibs/" + dev.name); errors.Is(err, os.ErrNotExist) {
			e.Result("unloaded", 1)
			return nil
		}
		select {
		case <-e.Ctx.Done():
			return fmt.Errorf("ism_dibs unloaded, and %s is still there: %w", dev.name, e.Ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

type dibsDev struct {
	name     string
	gid      uint64
	fabricID uint16
}

// waitDibs waits until the module's dibs device shows in /sys/class/dibs
// (the probe runs when the module loads, but the PCI device may bind
// later), skipping the kernel's loopback (fabric 0xffff). The wait is on a
// state, bounded only by the scenario's watchdog.
func waitDibs(e *Env) (dibsDev, error) {
	const root = "/sys/class/dibs"
	for {
		ents, _ := os.ReadDir(root)
		for _, ent := range ents {
			d, err := readDibs(filepath.Join(root, ent.Name()))
			if err != nil {
				return d, err
			}
			if d.fabricID != 0xffff {
				d.name = ent.Name()
				return d, nil
			}
		}
		select {
		case <-e.Ctx.Done():
			return dibsDev{}, fmt.Errorf("no dibs device other than the loopback in %s (%d entries): %w", root, len(ents), e.Ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// readDibs reads a dibs device's gid (a uuid whose first 8 bytes are the
// big-endian GID) and fabric_id from sysfs.
func readDibs(dir string) (dibsDev, error) {
	var d dibsDev
	b, err := os.ReadFile(dir + "/fabric_id")
	if err != nil {
		return d, err
	}
	f, err := strconv.ParseUint(strings.TrimSpace(string(b)), 0, 16)
	if err != nil {
		return d, fmt.Errorf("%s/fabric_id: %w", dir, err)
	}
	d.fabricID = uint16(f)
	if b, err = os.ReadFile(dir + "/gid"); err != nil {
		return d, err
	}
	h := strings.ReplaceAll(strings.TrimSpace(string(b)), "-", "")
	raw, err := hex.DecodeString(h)
	if err != nil || len(raw) != 16 {
		return d, fmt.Errorf("%s/gid %q: not a uuid", dir, b)
	}
	d.gid = binary.BigEndian.Uint64(raw)
	return d, nil
}

func kernelSMCDServer(e *Env, dev dibsDev, addr string) error {
	ta, err := net.ResolveTCPAddr("tcp4", addr)
	if err != nil {
		return err
	}
	lfd, _, err := smcListen(ta, 0)
	if err != nil {
		return err
	}
	defer unix.Close(lfd)
	e.Result("listening", 1)
	fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	if err != nil {
		return fmt.Errorf("AF_SMC accept: %w", err)
	}
	c, err := smcConn(fd)
	unix.Close(fd)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := reportKernelSMCD(e, dev, c); err != nil {
		return err
	}
	start := time.Now()
	if err := sinkStream(e, c); err != nil {
		return err
	}
	e.Result("server_seconds", fmt.Sprintf("%.3f", time.Since(start).Seconds()))
	return nil
}

// dialKernelSMCD connects with AF_SMC to addr (waiting for a booting peer)
// and fails unless the kernel's view of the connection is SMC-D over dev.
func dialKernelSMCD(e *Env, dev dibsDev, addr string) (net.Conn, error) {
	ta, err := net.ResolveTCPAddr("tcp4", addr)
	if err != nil {
		return nil, err
	}
	c, err := smcDialPeer(e, ta)
	if err != nil {
		return nil, err
	}
	if err := reportKernelSMCD(e, dev, c); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func kernelSMCDClient(e *Env, dev dibsDev, addr string, a smcArgs) error {
	c, err := dialKernelSMCD(e, dev, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	start := time.Now()
	if err := send(e, c, 0, a.bytes, a); err != nil {
		return err
	}
	secs := time.Since(start).Seconds()
	e.Result("client_seconds", fmt.Sprintf("%.3f", secs))
	if secs > 0 {
		e.Result("client_mbytes_per_s", fmt.Sprintf("%.2f", float64(a.bytes)/secs/1e6))
	}
	return nil
}

// kernelSMCDStream (ism.mode=stream) sends the seeded stream until a write
// fails: the host kills the backend meanwhile, the driver declares it gone
// and SMC's writes fail. It reports streaming=1 after 1 MiB and write_error.
// The module stays loaded: its device is left alone once the backend is gone.
func kernelSMCDStream(e *Env, dev dibsDev, addr string, seed uint64) error {
	c, err := dialKernelSMCD(e, dev, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	x := xfer{seed: seed}
	buf := make([]byte, 64<<10)
	for off := 0; ; off += len(buf) {
		x.fill(buf, off)
		if _, err := c.Write(buf); err != nil {
			e.Result("write_error", err.Error())
			e.Result("bytes_written", off)
			return nil
		}
		if off == 1<<20 {
			e.Result("streaming", 1)
		}
	}
}

// smcDialPeer connects with AF_SMC, retrying while the peer guest is still
// booting or not listening yet, until the watchdog.
func smcDialPeer(e *Env, addr *net.TCPAddr) (net.Conn, error) {
	for {
		c, err := smcDial(addr)
		booting := errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) ||
			errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.ETIMEDOUT)
		if err == nil || !booting || e.Ctx.Err() != nil {
			return c, err
		}
		select {
		case <-time.After(250 * time.Millisecond):
		case <-e.Ctx.Done():
			return nil, fmt.Errorf("%w (peer still not up: %w)", e.Ctx.Err(), err)
		}
	}
}

// reportKernelSMCD reports the kernel's view (smc_diag) of its AF_SMC
// socket c and fails unless it is SMC-D over dev.
func reportKernelSMCD(e *Env, dev dibsDev, c net.Conn) error {
	l, r := c.LocalAddr().(*net.TCPAddr), c.RemoteAddr().(*net.TCPAddr)
	d, err := smcDiagOf(l.Port, r.Port)
	if err != nil {
		return err
	}
	mode := map[uint8]string{0: "smcr", smcDiagModeFallback: "fallback", smcDiagModeSMCD: "smcd"}[d.Mode]
	e.Result("kernel_mode", mode)
	e.Result("kernel_view", d.String())
	dmb := d.Socket.DMB
	if dmb != nil {
		e.Result("kernel_my_gid", fmt.Sprintf("%#x", dmb.GID))
		e.Result("kernel_peer_gid", fmt.Sprintf("%#x", dmb.PeerGID))
	}
	switch {
	case d.Mode != smcDiagModeSMCD:
		return fmt.Errorf("the kernel's connection is %s, not SMC-D (%s)", mode, d)
	case dmb == nil:
		return errors.New("smc_diag gave no DMB info for an SMC-D connection")
	case dmb.GID != dev.gid:
		return fmt.Errorf("the kernel's SMC-D connection uses GID %#x, the device's is %#x", dmb.GID, dev.gid)
	}
	return nil
}
