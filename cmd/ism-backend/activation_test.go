package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain lets a test run this binary as the backend itself (the
// socket-activation test hands it to systemd-socket-activate).
func TestMain(m *testing.M) {
	if os.Getenv("ISM_BACKEND_TEST_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// passFDs dups fds onto consecutive free fd numbers, as systemd passes
// them from 3, and returns the first.
func passFDs(t *testing.T, fds ...int) int {
	t.Helper()
	first := 200
search:
	for ; first < 1000; first++ {
		for i := range fds {
			if _, err := unix.FcntlInt(uintptr(first+i), unix.F_GETFD, 0); err == nil {
				continue search
			}
		}
		break
	}
	for i, fd := range fds {
		if err := unix.Dup3(fd, first+i, unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
	}
	return first
}

func listenerFD(t *testing.T, ln interface {
	File() (*os.File, error)
}) int {
	t.Helper()
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func env(vars map[string]string) func(string) string {
	return func(k string) string { return vars[k] }
}

func TestActivatedListeners(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.sock"), filepath.Join(dir, "ism-backend.ctl")
	la, err := net.ListenUnix("unix", &net.UnixAddr{Name: a, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer la.Close()
	lb, err := net.ListenUnix("unix", &net.UnixAddr{Name: b, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer lb.Close()
	first := passFDs(t, listenerFD(t, la), listenerFD(t, lb))
	pid := os.Getpid()

	// For another process: none taken.
	lns, err := activatedListeners(env(map[string]string{"LISTEN_PID": "1", "LISTEN_FDS": "2"}), pid, first)
	if err != nil || lns != nil {
		t.Fatalf("LISTEN_PID of another process: %v, %v", lns, err)
	}
	// None passed.
	if lns, err := activatedListeners(env(nil), pid, first); err != nil || lns != nil {
		t.Fatalf("no LISTEN_*: %v, %v", lns, err)
	}
	for _, n := range []string{"x", "-1", "100000"} {
		if _, err := activatedListeners(env(map[string]string{"LISTEN_PID": strconv.Itoa(pid), "LISTEN_FDS": n}), pid, first); err == nil {
			t.Errorf("LISTEN_FDS=%s accepted", n)
		}
	}

	lns, err = activatedListeners(env(map[string]string{"LISTEN_PID": strconv.Itoa(pid), "LISTEN_FDS": "2"}), pid, first)
	if err != nil {
		t.Fatal(err)
	}
	act := activated(lns)
	ctl := act.take(b)
	if ctl == nil || act.take(b) != nil {
		t.Fatalf("control socket taken: %v, then again", ctl)
	}
	defer ctl.Close()
	if err := act.unused(); err == nil || !strings.Contains(err.Error(), a) {
		t.Fatalf("a.sock left over: %v", err)
	}
	if len(act) != 0 {
		t.Fatalf("unused left %d listeners", len(act))
	}
	// The taken listener is the socket: a client reaches it.
	go func() {
		if c, err := net.Dial("unix", b); err == nil {
			c.Close()
		}
	}()
	c, err := ctl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	ctl.Close()
	if _, err := os.Stat(b); err != nil {
		t.Errorf("closing an activated listener removed its file: %v", err)
	}
}

func TestActivatedListenersRefuse(t *testing.T) {
	tcp, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	dir := t.TempDir()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "d.sock"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ok, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "ok.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ok.Close()
	for name, fd := range map[string]int{"tcp": listenerFD(t, tcp), "unixgram": listenerFD(t, conn)} {
		first := passFDs(t, listenerFD(t, ok), fd)
		pid := os.Getpid()
		_, err := activatedListeners(env(map[string]string{"LISTEN_PID": strconv.Itoa(pid), "LISTEN_FDS": "2"}), pid, first)
		if err == nil {
			t.Errorf("%s socket accepted", name)
		}
		for _, f := range []int{first, first + 1} {
			if _, err := unix.FcntlInt(uintptr(f), unix.F_GETFD, 0); err == nil {
				t.Errorf("%s: fd %d left open after the refusal", name, f)
				unix.Close(f)
			}
		}
	}
}

// lockedBuffer is a process's output, read while it runs.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestSocketActivation runs the backend under systemd-socket-activate, as
// a socket unit would: the sockets exist before it runs, the first
// connection starts it, it serves them, and it leaves their files alone
// when it exits. A socket that matches nothing is a clear error.
func TestSocketActivation(t *testing.T) {
	sa, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		t.Skip("systemd-socket-activate (systemd) not installed")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	vm, ctl := filepath.Join(dir, "vm1.sock"), filepath.Join(dir, controlName)
	start := func(args ...string) (*exec.Cmd, *lockedBuffer) {
		cmd := exec.Command(sa, append([]string{"-E", "ISM_BACKEND_TEST_MAIN=1"}, args...)...)
		cmd.Args = append(cmd.Args, self, "-socket-dir", dir, "-vm", "vm1")
		out := &lockedBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd, out
	}
	cmd, out := start("-l", vm, "-l", ctl)
	defer cmd.Process.Kill()
	// systemd-socket-activate binds first; the status request is the
	// connection that starts the backend.
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(ctl); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared:\n%s", ctl, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	a, err := askControl(dir, "status", time.Minute)
	if err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if len(a.Status.Devices) != 1 || a.Status.Devices[0].VM != "vm1" {
		t.Fatalf("status devices %+v", a.Status.Devices)
	}
	if !strings.Contains(out.String(), "socket activation: serving the sockets systemd passed") {
		t.Errorf("no activation log line:\n%s", out)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("backend exit: %v\n%s", err, out)
	}
	for _, p := range []string{vm, ctl} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("the backend removed the socket unit's %s: %v", p, err)
		}
	}

	// A socket for no VM: exit 1 with its path named.
	stray := filepath.Join(dir, "stray.sock")
	cmd, out = start("-l", stray)
	defer cmd.Process.Kill()
	for {
		if _, err := os.Stat(stray); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared:\n%s", stray, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if c, err := net.Dial("unix", stray); err == nil {
		c.Close()
	}
	err = cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(out.String(), stray+" is not the socket of a -vm") {
		t.Fatalf("stray socket: %v\n%s", err, out)
	}
}
