package main

// smc-kernel: our SMC-D stack (with the SMC TCP option program) against the
// Linux kernel's own SMC (smc.ko, AF_SMC sockets), in one guest over
// 127.0.0.1. The kernel has no SMC device it could use with our GID, so it
// declines and both ends fall back to TCP on the same connection.
//
//	kernel_client: an AF_SMC client connects to our Listener and speaks
//	               first; our server reports the option record (the
//	               kernel's SYN carried the option, ours echoed it) and the
//	               Decline the kernel sent instead of a Proposal.
//	kernel_server: our Dial to an AF_SMC listener; our client reports the
//	               record (the kernel's SYN-ACK echoed our option) and the
//	               kernel's Decline of our Proposal.
//
// Each case reports <case>=ok after byte-exact streams both ways (talk,
// endStream), <case>_reason (our fallback reason), <case>_record and
// <case>_kernel (the kernel's view from smc_diag: mode, fallback reason, the
// peer's diagnosis).
// The AF_SMC sockets are plain x/sys/unix calls; net.FileConn takes them
// because their getsockname answers with the TCP address.

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

func init() { register("smc-kernel", smcKernel) }

// smcProtoIPv4 is SMCPROTO_SMC: AF_SMC over IPv4 (SMCPROTO_SMC6 is 1).
const smcProtoIPv4 = 0

// smcConn turns a connected AF_SMC socket into a net.Conn.
func smcConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "af_smc")
	defer f.Close() // FileConn dups it
	return net.FileConn(f)
}

// smcDial connects an AF_SMC socket to addr.
func smcDial(addr *net.TCPAddr) (net.Conn, error) { return smcDialBuf(addr, 0) }

// smcSocket makes an AF_SMC socket. buf > 0 sets SO_SNDBUF and SO_RCVBUF:
// the kernel's SMC sizes a connection's send buffer and RMB (its DMB) as
// half of sk_sndbuf and sk_rcvbuf, which the kernel sets to twice what is
// asked (capped by net.core.wmem_max/rmem_max), so the DMB is buf bytes.
func smcSocket(buf int) (int, error) {
	fd, err := unix.Socket(unix.AF_SMC, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, smcProtoIPv4)
	if err != nil {
		return -1, fmt.Errorf("socket(AF_SMC): %w", err)
	}
	if buf > 0 {
		for _, opt := range []int{unix.SO_SNDBUF, unix.SO_RCVBUF} {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, buf); err != nil {
				unix.Close(fd)
				return -1, fmt.Errorf("AF_SMC buffer size %d: %w", buf, err)
			}
		}
	}
	return fd, nil
}

// smcDialBuf is smcDial with smcSocket's buffer size.
func smcDialBuf(addr *net.TCPAddr, buf int) (net.Conn, error) {
	fd, err := smcSocket(buf)
	if err != nil {
		return nil, err
	}
	sa := &unix.SockaddrInet4{Port: addr.Port}
	copy(sa.Addr[:], addr.IP.To4())
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("AF_SMC connect %v: %w", addr, err)
	}
	return smcConn(fd)
}

// smcListen listens with an AF_SMC socket on addr (IPv4; port 0 picks
// one) and returns its fd and port. buf: as smcSocket (accepted
// connections inherit it).
func smcListen(addr *net.TCPAddr, buf int) (int, int, error) {
	fd, err := smcSocket(buf)
	if err != nil {
		return -1, 0, err
	}
	// A server guest restarted on its port must not wait out TIME_WAIT.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		unix.Close(fd)
		return -1, 0, err
	}
	bind := &unix.SockaddrInet4{Port: addr.Port}
	if ip := addr.IP.To4(); ip != nil {
		copy(bind.Addr[:], ip)
	}
	if err := unix.Bind(fd, bind); err != nil {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("AF_SMC bind %v: %w", addr, err)
	}
	if err := unix.Listen(fd, 64); err != nil {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("AF_SMC listen: %w", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return -1, 0, err
	}
	in, ok := sa.(*unix.SockaddrInet4)
	if !ok {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("AF_SMC getsockname: %T", sa)
	}
	return fd, in.Port, nil
}

func smcKernel(e *Env) error {
	for _, m := range []string{"smc", "smc_diag"} {
		if err := loadModule(m); err != nil {
			return err
		}
	}
	a, dev, closeDev, err := setupSMC(e, "send")
	if err != nil {
		return err
	}
	defer closeDev()
	if smcd.SYNOption() == nil {
		return errors.New("smc-kernel needs the SMC TCP option program, and it did not load")
	}
	greet, answer := seededBytes(a.seed, greetBytes), seededBytes(a.seed+1, answerBytes)

	// The kernel's client to our Listener.
	kernelClient := func() error {
		srv := &smcd.Server{DMBSize: a.dmbSize, HandshakeTimeout: a.clc, Logf: e.Logf}
		ln, err := srv.Listen(dev, "tcp4", "127.0.0.1:0")
		if err != nil {
			return err
		}
		defer ln.Close()
		done := make(chan error, 1)
		go func() {
			c, err := smcDial(ln.Addr().(*net.TCPAddr))
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			err = talk(c, true, greet, answer)
			if err == nil {
				err = endStream(c)
			}
			done <- err
		}()
		c, err := ln.Accept()
		if err != nil {
			return errors.Join(err, <-done)
		}
		defer c.Close()
		reportKernelCase(e, "kernel_client", c)
		err = talk(c, false, answer, greet)
		if err == nil {
			// The kernel client sent its stream after its connect()
			// returned: its fallback is decided.
			err = reportKernelView(e, "kernel_client", c.RemoteAddr(), c.LocalAddr())
		}
		if err == nil {
			err = endStream(c)
		}
		return errors.Join(err, <-done)
	}

	// Our Dial to the kernel's server.
	kernelServer := func() error {
		lfd, port, err := smcListen(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, 0)
		if err != nil {
			return err
		}
		defer unix.Close(lfd)
		done := make(chan error, 1)
		go func() {
			fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
			if err != nil {
				done <- fmt.Errorf("AF_SMC accept: %w", err)
				return
			}
			c, err := smcConn(fd)
			unix.Close(fd)
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			err = talk(c, false, answer, greet)
			if err == nil {
				err = endStream(c)
			}
			done <- err
		}()
		d := &smcd.Dialer{DMBSize: a.dmbSize, HandshakeTimeout: a.clc}
		c, err := d.DialContext(e.Ctx, dev, "tcp4", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			return errors.Join(err, <-done)
		}
		defer c.Close()
		reportKernelCase(e, "kernel_server", c)
		err = talk(c, true, greet, answer)
		if err == nil {
			// The kernel server answered after its accept() returned.
			err = reportKernelView(e, "kernel_server", c.RemoteAddr(), c.LocalAddr())
		}
		if err == nil {
			err = endStream(c)
		}
		return errors.Join(err, <-done)
	}

	var errs []error
	for _, c := range []struct {
		name string
		run  func() error
	}{{"kernel_client", kernelClient}, {"kernel_server", kernelServer}} {
		if err := c.run(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.name, err))
			continue
		}
		e.Result(c.name, "ok")
	}
	return errors.Join(errs...)
}

// reportKernelView reports the kernel's own view (smc_diag) of its AF_SMC
// socket from kernel to ours: mode, fallback reason, peer's diagnosis.
func reportKernelView(e *Env, name string, kernel, ours net.Addr) error {
	k, o := kernel.(*net.TCPAddr), ours.(*net.TCPAddr)
	d, err := smcDiagOf(k.Port, o.Port)
	if err != nil {
		return err
	}
	if !d.HasFallback {
		return fmt.Errorf("smc_diag gave no fallback attribute for %v", kernel)
	}
	e.Result(name+"_kernel", d.String())
	return nil
}

// reportKernelCase reports our end's reason, the Decline code and who sent
// it, and the option record.
func reportKernelCase(e *Env, name string, c net.Conn) {
	f, ok := c.(*smcd.FallbackConn)
	if !ok {
		e.Result(name+"_reason", fmt.Sprintf("not a fallback: %T", c))
		return
	}
	e.Result(name+"_reason", f.Reason.Error())
	e.Result(name+"_decline", fmt.Sprintf("%#08x", f.Reason.Code))
	e.Result(name+"_decline_by_peer", f.Reason.Remote)
	if f.SYNOption != nil {
		e.Result(name+"_record", f.SYNOption.String())
	}
}
