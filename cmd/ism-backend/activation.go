package main

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Socket activation (systemd's sd_listen_fds protocol): a socket unit holds
// the listening sockets, so they exist before the backend runs (QEMU may
// start first; its connection waits in the backlog) and outlive a backend
// that is restarted. systemd passes them from fd 3 on, with LISTEN_PID (the
// process they are for) and LISTEN_FDS (how many). They are matched to the
// VMs and the control and handover sockets by the path each is bound to,
// so the socket unit names the same paths -socket-dir implies; their mode
// and group are the socket unit's (SocketMode=, SocketGroup=).

const listenFDsStart = 3 // SD_LISTEN_FDS_START

// activatedListeners returns the listening unix sockets passed by socket
// activation, by path, or none when the environment passes none to this
// process (pid). first is the first fd (listenFDsStart but in tests). The
// variables are unset, so that nothing this process starts takes them
// for its own.
func activatedListeners(getenv func(string) string, pid, first int) (map[string]*net.UnixListener, error) {
	pidStr, nStr := getenv("LISTEN_PID"), getenv("LISTEN_FDS")
	if pidStr == "" && nStr == "" {
		return nil, nil
	}
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	if p, err := strconv.Atoi(pidStr); err != nil || p != pid {
		// For another process (we were started by one that got
		// them): not ours to take.
		return nil, nil
	}
	n, err := strconv.Atoi(nStr)
	if err != nil || n < 0 || n > 1024 {
		return nil, fmt.Errorf("socket activation: LISTEN_FDS=%q", nStr)
	}
	lns := map[string]*net.UnixListener{}
	fail := func(err error) (map[string]*net.UnixListener, error) {
		for _, ln := range lns {
			ln.Close()
		}
		return nil, err
	}
	for fd := first; fd < first+n; fd++ {
		unix.CloseOnExec(fd)
		path, err := listeningUnixPath(fd)
		if err != nil {
			unix.Close(fd)
			return fail(fmt.Errorf("socket activation: fd %d: %w", fd, err))
		}
		if _, dup := lns[path]; dup {
			unix.Close(fd)
			return fail(fmt.Errorf("socket activation: %s passed twice", path))
		}
		f := os.NewFile(uintptr(fd), path)
		l, err := net.FileListener(f) // a dup of fd
		f.Close()
		if err != nil {
			return fail(fmt.Errorf("socket activation: %s: %w", path, err))
		}
		ln := l.(*net.UnixListener)
		// The socket file is the socket unit's: never unlink it.
		ln.SetUnlinkOnClose(false)
		lns[path] = ln
	}
	return lns, nil
}

// listeningUnixPath returns the path a listening unix stream socket is
// bound to, or why fd is not one.
func listeningUnixPath(fd int) (string, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return "", err
	}
	acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return "", err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return "", err
	}
	u, ok := sa.(*unix.SockaddrUnix)
	if !ok || typ != unix.SOCK_STREAM || acc != 1 {
		return "", errors.New("not a listening unix stream socket (the socket unit wants ListenStream=/path)")
	}
	if u.Name == "" || strings.HasPrefix(u.Name, "@") {
		return "", errors.New("an abstract or unnamed socket: want a path")
	}
	return u.Name, nil
}

// activated hands out the socket-activated listeners by path; what is left
// at the end matches nothing the backend serves.
type activated map[string]*net.UnixListener

// take returns the listener bound to path and forgets it, or nil.
func (a activated) take(path string) *net.UnixListener {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	ln := a[path]
	delete(a, path)
	return ln
}

// unused is an error naming the listeners nobody took, or nil. It closes
// them.
func (a activated) unused() error {
	if len(a) == 0 {
		return nil
	}
	paths := slices.Sorted(maps.Keys(a))
	a.close()
	return fmt.Errorf("socket activation: %s is not the socket of a -vm, the control socket or the handover socket (want DIR/NAME.sock with -socket-dir DIR)", strings.Join(paths, ", "))
}

// close closes the listeners nobody took.
func (a activated) close() {
	for p, ln := range a {
		ln.Close()
		delete(a, p)
	}
}
