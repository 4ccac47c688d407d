package main

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// withUmask runs fn under umask mask. The umask is the process's: these
// tests do not run in parallel.
func withUmask(mask int, fn func()) {
	old := syscall.Umask(mask)
	defer syscall.Umask(old)
	fn()
}

func statSocket(t *testing.T, path string) (os.FileMode, uint32) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("%s is not a socket: %v", path, fi.Mode())
	}
	return fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid
}

// The socket is 0600 under a permissive umask, and exactly -socket-mode
// under both a permissive and a strict one.
func TestSocketMode(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		umask int
		mode  os.FileMode
	}{
		{0, defaultSocketMode},
		{0o002, defaultSocketMode},
		{0, 0o660},
		{0o077, 0o660},
		{0o022, 0o666},
	} {
		path := filepath.Join(dir, "vm.sock")
		var ln *net.UnixListener
		var err error
		withUmask(c.umask, func() { ln, err = listenUnix(path, socketAccess{mode: c.mode, gid: -1}) })
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := statSocket(t, path); got != c.mode {
			t.Errorf("umask %#o, mode %#o: socket is %#o", c.umask, c.mode, got)
		}
		if c, err := net.Dial("unix", path); err != nil {
			t.Errorf("the socket does not accept: %v", err)
		} else {
			c.Close()
		}
		ln.Close()
		if _, err := os.Lstat(path); !os.IsNotExist(err) {
			t.Fatalf("socket not removed on close: %v", err)
		}
	}
}

func TestSocketGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a file another group")
	}
	const gid = 12345
	path := filepath.Join(t.TempDir(), "vm.sock")
	var ln *net.UnixListener
	var err error
	withUmask(0, func() { ln, err = listenUnix(path, socketAccess{mode: 0o660, gid: gid}) })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if mode, g := statSocket(t, path); mode != 0o660 || g != gid {
		t.Fatalf("socket mode %#o group %d, want 0660 and %d", mode, g, gid)
	}
}

func TestSocketFlags(t *testing.T) {
	opts, err := parseFlags([]string{"-vm", "a"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if opts.socket.mode != 0o600 || opts.socket.gid != -1 || opts.allowUIDs != nil {
		t.Fatalf("defaults: %+v %v", opts.socket, opts.allowUIDs)
	}
	opts, err = parseFlags([]string{"-vm", "a", "-socket-mode", "0660", "-socket-group", "0",
		"-allow-uid", "64055,12345", "-allow-uid", "root"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if opts.socket.mode != 0o660 || opts.socket.gid != 0 || !slices.Equal(opts.allowUIDs, []uint32{64055, 12345, 0}) {
		t.Fatalf("got %+v %v", opts.socket, opts.allowUIDs)
	}
	for _, args := range [][]string{
		{"-vm", "a", "-socket-mode", "660x"},
		{"-vm", "a", "-socket-mode", "0999"},
		{"-vm", "a", "-socket-mode", "01777"},
		{"-vm", "a", "-socket-mode", "0060"},
		{"-vm", "a", "-socket-group", "no-such-group-here"},
		{"-vm", "a", "-allow-uid", "-1"},
		{"-vm", "a", "-allow-uid", "1,,2"},
		{"-vm", "a", "-allow-uid", "no-such-user-here"},
		{"-vm", "a", "-allow-uid", "4294967296"},
	} {
		var out bytes.Buffer
		if _, err := parseFlags(args, &out); err == nil {
			t.Errorf("%q: accepted", args)
		} else if strings.Contains(err.Error(), "\n") || out.Len() != 0 {
			t.Errorf("%q: error not one line (%q, printed %q)", args, err, out.String())
		} else {
			t.Logf("%q: %v", args, err)
		}
	}
}
