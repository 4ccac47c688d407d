// Package handover is the socket protocol by which a running ism-backend
// hands its state and fds to a new process (docs/handover.md), as nginx's
// binary upgrade or systemd's fd store do: a unix SOCK_SEQPACKET socket,
// SCM_RIGHTS for the fds, in chunks (the kernel passes at most 253 fds per
// message). It knows nothing of what the state says.
//
// The exchange, new process N, old process O:
//
//	N -> O  hello    (the versions of the state N can read)
//	O -> N  state    (chunks of the state, fds in chunks of their own, then
//	                 the end: format version, total bytes, total fds)
//	N -> O  ready    (every VM rebuilt and held: N runs nothing yet)
//	O -> N  commit   (O has let go: it never serves those VMs again)
//
// or, instead of ready or commit, abort with a one-line reason from either
// side. O takes the VMs back (Thaw) only after it sent abort, or saw N's
// abort or N's end of the connection; N runs the VMs only after commit. So
// the two never run a VM at the same time.
package handover

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Message types.
const (
	msgHello  = 'H'
	msgData   = 'D'
	msgFDs    = 'F'
	msgEnd    = 'E'
	msgReady  = 'R'
	msgCommit = 'C'
	msgAbort  = 'A'
)

// Limits of one message and of one state.
const (
	maxChunk     = 32 << 10 // state bytes per message
	maxFDsPerMsg = 250      // below the kernel's SCM_MAX_FD (253)
	// MaxStateBytes and MaxFDs bound what a receiver accepts.
	MaxStateBytes = 256 << 20
	MaxFDs        = 1 << 20
)

// ErrAborted wraps the reason the peer gave for an abort.
var ErrAborted = errors.New("handover aborted by the peer")

// Conn is one side of a handover.
type Conn struct {
	c *net.UnixConn
}

// Listen creates the handover socket at path, mode 0600 whatever the umask
// (only the backend's own user, or root, may take its VMs over). A file
// already there is replaced only if it is a socket no one listens on.
func Listen(path string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unixpacket", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another backend is listening there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale handover socket: %w", err)
		}
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: socket: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	if err := unix.Fchmod(fd, 0o600); err != nil {
		return nil, fmt.Errorf("%s: fchmod: %w", path, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return nil, fmt.Errorf("%s: bind: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		os.Remove(path)
		return nil, err
	}
	if err := unix.Listen(fd, 4); err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("%s: listen: %w", path, err)
	}
	l, err := net.FileListener(f)
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	ln := l.(*net.UnixListener)
	ln.SetUnlinkOnClose(true)
	return ln, nil
}

// Accept takes the next connection on ln and checks that its process
// runs as this process's user or as root (SO_PEERCRED).
func Accept(ln *net.UnixListener) (*Conn, error) {
	c, err := ln.AcceptUnix()
	if err != nil {
		return nil, err
	}
	if err := CheckPeer(c); err != nil {
		c.Close()
		return nil, err
	}
	return &Conn{c: c}, nil
}

// Dial connects to the handover socket of the running process at path,
// which must run as this process's user or as root.
func Dial(path string) (*Conn, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	if err := CheckPeer(c); err != nil {
		c.Close()
		return nil, err
	}
	return &Conn{c: c}, nil
}

// CheckPeer lets through a peer that runs as this process's user or as
// root (SO_PEERCRED): the handover socket's rule, and the control
// socket's.
func CheckPeer(c *net.UnixConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("handover: SO_PEERCRED: %w", cerr)
	}
	if cred.Uid != 0 && cred.Uid != uint32(os.Geteuid()) {
		return fmt.Errorf("handover: peer pid %d runs as uid %d", cred.Pid, cred.Uid)
	}
	return nil
}

// Close closes the connection.
func (c *Conn) Close() error { return c.c.Close() }

// SetDeadline bounds every exchange from now on.
func (c *Conn) SetDeadline(t time.Time) error { return c.c.SetDeadline(t) }

func (c *Conn) send(typ byte, payload []byte, fds []int) error {
	msg := append([]byte{typ}, payload...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.c.WriteMsgUnix(msg, oob, nil)
	if err != nil {
		return fmt.Errorf("handover: send: %w", err)
	}
	if n != len(msg) || oobn != len(oob) {
		return errors.New("handover: short send")
	}
	return nil
}

// recv reads one message. fds that came with it are returned (the caller
// owns them); a truncated message or fd list is an error, with its fds
// closed.
func (c *Conn) recv() (byte, []byte, []int, error) {
	buf := make([]byte, 1+maxChunk+1)
	oob := make([]byte, unix.CmsgSpace(4*(maxFDsPerMsg+3)))
	n, oobn, flags, _, err := c.c.ReadMsgUnix(buf, oob)
	if err != nil {
		return 0, nil, nil, fmt.Errorf("handover: receive: %w", err)
	}
	var fds []int
	if oobn > 0 {
		cmsgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr != nil {
			return 0, nil, nil, fmt.Errorf("handover: control message: %w", perr)
		}
		for _, cm := range cmsgs {
			rights, rerr := unix.ParseUnixRights(&cm)
			if rerr == nil {
				fds = append(fds, rights...)
			}
		}
	}
	closeFDs := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	if flags&unix.MSG_CTRUNC != 0 {
		// The kernel drops the fds that do not fit, the usual cause
		// being a process that may not open that many.
		closeFDs()
		return 0, nil, nil, errors.New("handover: fds lost in transit (is the new process's RLIMIT_NOFILE below the fds the running backend holds?)")
	}
	if flags&unix.MSG_TRUNC != 0 {
		closeFDs()
		return 0, nil, nil, errors.New("handover: message truncated")
	}
	if n == 0 {
		closeFDs()
		return 0, nil, nil, errors.New("handover: the peer closed the connection")
	}
	return buf[0], buf[1:n], fds, nil
}

// Hello is the new process's first message: the state versions it reads.
func (c *Conn) Hello(versions []uint32) error {
	p := make([]byte, 4*len(versions))
	for i, v := range versions {
		binary.LittleEndian.PutUint32(p[4*i:], v)
	}
	return c.send(msgHello, p, nil)
}

// ReadHello returns the versions the new process reads.
func (c *Conn) ReadHello() ([]uint32, error) {
	typ, p, fds, err := c.recv()
	if err != nil {
		return nil, err
	}
	closeAll(fds)
	if typ != msgHello || len(p)%4 != 0 || len(p) == 0 {
		return nil, fmt.Errorf("handover: expected hello, got %q (%d bytes)", typ, len(p))
	}
	var vs []uint32
	for i := 0; i < len(p); i += 4 {
		vs = append(vs, binary.LittleEndian.Uint32(p[i:]))
	}
	return vs, nil
}

// SendState sends the state (format version) and its fds. The fds stay
// the caller's.
func (c *Conn) SendState(version uint32, state []byte, fds []int) error {
	for off := 0; off < len(state); off += maxChunk {
		if err := c.send(msgData, state[off:min(off+maxChunk, len(state))], nil); err != nil {
			return err
		}
	}
	for off := 0; off < len(fds); off += maxFDsPerMsg {
		if err := c.send(msgFDs, nil, fds[off:min(off+maxFDsPerMsg, len(fds))]); err != nil {
			return err
		}
	}
	end := make([]byte, 16)
	binary.LittleEndian.PutUint32(end[0:], version)
	binary.LittleEndian.PutUint64(end[4:], uint64(len(state)))
	binary.LittleEndian.PutUint32(end[12:], uint32(len(fds)))
	return c.send(msgEnd, end, nil)
}

// ReadState receives the state, its format version and its fds (the
// caller owns them). An abort from the peer is ErrAborted.
func (c *Conn) ReadState() (version uint32, state []byte, fds []int, err error) {
	defer func() {
		if err != nil {
			closeAll(fds)
			fds = nil
		}
	}()
	for {
		typ, p, mfds, rerr := c.recv()
		if rerr != nil {
			return 0, nil, fds, rerr
		}
		fds = append(fds, mfds...)
		switch typ {
		case msgData:
			if len(mfds) > 0 || len(state)+len(p) > MaxStateBytes {
				return 0, nil, fds, errors.New("handover: state too large or with fds in its data")
			}
			state = append(state, p...)
		case msgFDs:
			if len(fds) > MaxFDs {
				return 0, nil, fds, errors.New("handover: too many fds")
			}
		case msgEnd:
			if len(p) != 16 || len(mfds) > 0 {
				return 0, nil, fds, errors.New("handover: bad end of state")
			}
			version = binary.LittleEndian.Uint32(p[0:])
			if n := binary.LittleEndian.Uint64(p[4:]); n != uint64(len(state)) {
				return 0, nil, fds, fmt.Errorf("handover: state of %d bytes, %d announced", len(state), n)
			}
			if n := binary.LittleEndian.Uint32(p[12:]); n != uint32(len(fds)) {
				return 0, nil, fds, fmt.Errorf("handover: %d fds, %d announced", len(fds), n)
			}
			return version, state, fds, nil
		case msgAbort:
			return 0, nil, fds, fmt.Errorf("%w: %s", ErrAborted, p)
		default:
			return 0, nil, fds, fmt.Errorf("handover: unexpected message %q while reading the state", typ)
		}
	}
}

// Ready says that the new process holds every VM and runs none.
func (c *Conn) Ready() error { return c.send(msgReady, nil, nil) }

// Commit says that the old process let go of every VM.
func (c *Conn) Commit() error { return c.send(msgCommit, nil, nil) }

// Abort ends the handover with a reason (one line).
func (c *Conn) Abort(reason string) error {
	if len(reason) > maxChunk {
		reason = reason[:maxChunk]
	}
	return c.send(msgAbort, []byte(reason), nil)
}

// AwaitReady waits for ready; an abort is ErrAborted, anything else an
// error.
func (c *Conn) AwaitReady() error { return c.await(msgReady) }

// AwaitCommit waits for commit; likewise.
func (c *Conn) AwaitCommit() error { return c.await(msgCommit) }

func (c *Conn) await(want byte) error {
	typ, p, fds, err := c.recv()
	if err != nil {
		return err
	}
	closeAll(fds)
	switch typ {
	case want:
		return nil
	case msgAbort:
		return fmt.Errorf("%w: %s", ErrAborted, p)
	}
	return fmt.Errorf("handover: expected %q, got %q", want, typ)
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// NetListener makes a listener of a duplicate of fd, a listening socket
// handed over (the caller keeps fd).
func NetListener(fd int) (net.Listener, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("handover: dup listener: %w", err)
	}
	f := os.NewFile(uintptr(nfd), "listener")
	defer f.Close() // net.FileListener made its own duplicate
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("handover: listener: %w", err)
	}
	return l, nil
}

// FileListener is NetListener for a unix socket: the handover and control
// sockets, handed over with the rest. Closing it does not unlink the
// socket file unless the caller says so.
func FileListener(fd int) (*net.UnixListener, error) {
	l, err := NetListener(fd)
	if err != nil {
		return nil, err
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, errors.New("handover: listener is not a unix socket")
	}
	ul.SetUnlinkOnClose(false)
	return ul, nil
}

// ListenerFD returns a duplicate of ln's fd, which the caller owns (a unix
// or a TCP listener).
func ListenerFD(ln syscall.Conn) (int, error) {
	rc, err := ln.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	return nfd, derr
}
