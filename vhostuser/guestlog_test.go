package vhostuser

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"
)

// serveNop serves VM "vm" with nopBackends on a socket in a fresh directory
// until the test ends, on s with a fixed clock (no token comes back).
func serveNop(t *testing.T, s *Server) string {
	t.Helper()
	now := time.Unix(1700000000, 0)
	s.now = func() time.Time { return now }
	path := filepath.Join(t.TempDir(), "vm.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Serve(ctx, "vm", ln, func(string) (Backend, error) { return nopBackend{}, nil })
	}()
	t.Cleanup(func() { cancel(); <-done })
	return path
}

// getFeatures does one request with a reply: every message sent before it
// on c was handled when it returns.
func getFeatures(c *net.UnixConn) error {
	if err := WriteMessage(c, ReqGetFeatures, flagVersion, nil, nil); err != nil {
		return err
	}
	_, err := ReadMessage(c)
	return err
}

func countLines(hook *logtest.Hook, substr string) int {
	n := 0
	for _, e := range hook.AllEntries() {
		if strings.Contains(e.Message, substr) {
			n++
		}
	}
	return n
}

// TestUnknownRequestsLogRateLimited: QEMU passes no guest value as a
// request number, but a front-end that sends unknown requests in a loop
// got one warning each.
func TestUnknownRequestsLogRateLimited(t *testing.T) {
	logger, hook := logtest.NewNullLogger()
	s := NewServer(logrus.NewEntry(logger))
	path := serveNop(t, s)
	c, err := dialUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const msgs = 200
	for range msgs {
		if err := WriteMessage(c, 9999, flagVersion, []byte{1, 2, 3}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := getFeatures(c); err != nil {
		t.Fatal(err)
	}
	if n := countLines(hook, "unknown request"); n == 0 || n > logBurst {
		t.Fatalf("%d unknown requests gave %d warnings, want 1 to %d", msgs, n, logBurst)
	}
}

// TestReconnectLoopLogRateLimited: each connection logs its connect and
// teardown; a front-end that reconnects in a loop gets no fresh allowance.
func TestReconnectLoopLogRateLimited(t *testing.T) {
	logger, hook := logtest.NewNullLogger()
	s := NewServer(logrus.NewEntry(logger))
	path := serveNop(t, s)
	const conns = 40
	for range conns {
		c, err := dialUnix(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := getFeatures(c); err != nil { // accepted and served
			t.Fatal(err)
		}
		c.Close()
	}
	// The last connection may still be tearing down; what it logs later
	// only adds, and the bound below holds at every moment.
	lines := countLines(hook, "front-end connected") + countLines(hook, "front-end disconnected") +
		countLines(hook, "connection torn down")
	if lines == 0 || lines > logBurst {
		t.Fatalf("%d connections gave %d lifecycle lines, want 1 to %d", conns, lines, logBurst)
	}
}

func dialUnix(path string) (*net.UnixConn, error) {
	return net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
}

// dialAs connects to path from a thread whose effective uid is uid, so that
// SO_PEERCRED shows uid. Only this locked thread changes identity (a raw
// setresuid, not the process-wide one); it goes back to root before the
// goroutine lets go of it, or dies with the goroutine.
func dialAs(t *testing.T, path string, uid int) (*net.UnixConn, error) {
	t.Helper()
	type result struct {
		c   *net.UnixConn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			runtime.UnlockOSThread()
			ch <- result{nil, e}
			return
		}
		c, err := dialUnix(path)
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), 0, ^uintptr(0)); e == 0 {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// TestAllowUIDs: a connection from a uid not in AllowUIDs is closed at
// once with one (rate-limited) line, and the VM's listener goes on to
// serve an allowed one.
func TestAllowUIDs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to connect as another uid")
	}
	const allowed = 12345
	logger, hook := logtest.NewNullLogger()
	s := NewServer(logrus.NewEntry(logger))
	s.AllowUIDs = []uint32{allowed}
	path := serveNop(t, s)
	// Let uid 12345 reach the socket.
	for _, p := range []string{filepath.Dir(filepath.Dir(path)), filepath.Dir(path)} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}

	const refusedConns = 30
	for range refusedConns {
		c, err := dialUnix(path) // as root: not allowed
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(time.Minute)) // a hang fails, not blocks, the test
		// Closed without an answer: the request may or may not be
		// written, the read sees the end.
		_ = WriteMessage(c, ReqGetFeatures, flagVersion, nil, nil)
		var b [1]byte
		if n, err := c.Read(b[:]); n != 0 || !(errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET)) {
			t.Fatalf("root's connection: read %d bytes, %v; want it closed", n, err)
		}
		c.Close()
	}
	if n := countLines(hook, "connection refused"); n == 0 || n > logBurst {
		t.Fatalf("%d refused connections gave %d lines, want 1 to %d", refusedConns, n, logBurst)
	}
	for _, e := range hook.AllEntries() {
		if strings.Contains(e.Message, "connection refused") && e.Data["uid"] != uint32(0) {
			t.Fatalf("refusal logged uid %v, want 0", e.Data["uid"])
		}
	}

	c, err := dialAs(t, path, allowed)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := getFeatures(c); err != nil {
		t.Fatalf("allowed uid's connection: %v", err)
	}
}
