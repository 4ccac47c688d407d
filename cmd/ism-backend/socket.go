package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Who may reach the per-VM sockets: the file's mode and group, and,
// checked on each connection, the peer's uid (vhostuser.Server.AllowUIDs).
// By default only the backend's own user: a socket is a VM's device.
const defaultSocketMode = 0o600

// socketAccess is how listenUnix creates a socket file.
type socketAccess struct {
	mode os.FileMode
	gid  int // -1: the process's group
}

// parseSocketMode parses an octal permission mode such as 0660.
func parseSocketMode(s string) (os.FileMode, error) {
	m, err := strconv.ParseUint(s, 8, 32)
	if err != nil || m > 0o777 {
		return 0, fmt.Errorf("want octal permission bits 0000..0777, e.g. 0660")
	}
	if m&0o600 != 0o600 {
		// The backend connects to its own sockets to tell a live one from
		// a stale one; without rw for the owner that fails for non-root.
		return 0, fmt.Errorf("%04o: the owner needs read and write (0600)", m)
	}
	return os.FileMode(m), nil
}

// parseGroup parses a group name or a numeric gid.
func parseGroup(s string) (int, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return int(n), nil
	}
	g, err := user.LookupGroup(s)
	if err != nil {
		return 0, fmt.Errorf("no group %q", s)
	}
	n, err := strconv.ParseUint(g.Gid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("group %q has gid %q", s, g.Gid)
	}
	return int(n), nil
}

// parseUIDs parses a comma-separated list of numeric uids or user names.
func parseUIDs(s string) ([]uint32, error) {
	var uids []uint32
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			return nil, errors.New("empty uid in the list")
		}
		if n, err := strconv.ParseUint(f, 10, 32); err == nil {
			uids = append(uids, uint32(n))
			continue
		}
		if _, err := strconv.ParseInt(f, 10, 64); err == nil {
			return nil, fmt.Errorf("uid %s out of range", f)
		}
		u, err := user.Lookup(f)
		if err != nil {
			return nil, fmt.Errorf("no user %q", f)
		}
		n, err := strconv.ParseUint(u.Uid, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("user %q has uid %q", f, u.Uid)
		}
		uids = append(uids, uint32(n))
	}
	return uids, nil
}

// listenUnix listens on path, replacing a stale socket file left by a backend
// that died, but never a live one or a file that is not a socket. The file
// gets exactly acc's mode and group, whatever the umask, and is never wider
// than that: bind creates it with the socket's mode narrowed by the umask,
// so the socket is narrowed to acc.mode first; the group and the exact
// mode are set before listen, while no one can connect yet.
func listenUnix(path string, acc socketAccess) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another backend is listening there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket: %w", err)
		}
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: socket: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path) // closes fd on every path below
	defer f.Close()
	if err := unix.Fchmod(fd, uint32(acc.mode)); err != nil {
		return nil, fmt.Errorf("%s: fchmod: %w", path, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return nil, fmt.Errorf("%s: bind: %w", path, err)
	}
	ln, err := func() (*net.UnixListener, error) {
		if acc.gid >= 0 {
			if err := os.Lchown(path, -1, acc.gid); err != nil {
				return nil, err
			}
		}
		if err := os.Chmod(path, acc.mode); err != nil {
			return nil, err
		}
		if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
			return nil, fmt.Errorf("%s: listen: %w", path, err)
		}
		l, err := net.FileListener(f) // a dup of fd
		if err != nil {
			return nil, err
		}
		return l.(*net.UnixListener), nil
	}()
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	ln.SetUnlinkOnClose(true)
	return ln, nil
}
