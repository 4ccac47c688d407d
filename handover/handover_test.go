package handover

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func pair(t *testing.T) (oldSide, newSide *Conn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "h.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v (%v), want 0600", fi.Mode(), err)
	}
	acc := make(chan *Conn, 1)
	go func() {
		c, err := Accept(ln)
		if err != nil {
			t.Error(err)
		}
		acc <- c
	}()
	n, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	o := <-acc
	if o == nil {
		t.FailNow()
	}
	t.Cleanup(func() { n.Close(); o.Close() })
	return o, n
}

func inode(t *testing.T, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// A state of several chunks and more fds than one message carries
// arrives whole and in order, the fds as the same open files.
func TestStateAndFDsInChunks(t *testing.T) {
	o, n := pair(t)
	if err := n.Hello([]uint32{1, 2}); err != nil {
		t.Fatal(err)
	}
	vs, err := o.ReadHello()
	if err != nil || len(vs) != 2 || vs[1] != 2 {
		t.Fatalf("hello %v %v", vs, err)
	}
	state := make([]byte, 3*maxChunk+17)
	for i := range state {
		state[i] = byte(i * 31)
	}
	var fds []int
	for i := 0; i < 2*maxFDsPerMsg+3; i++ {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
	}
	defer closeAll(fds)
	errc := make(chan error, 1)
	go func() { errc <- o.SendState(7, state, fds) }()
	v, got, gotFDs, err := n.ReadState()
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll(gotFDs)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if v != 7 || !bytes.Equal(got, state) || len(gotFDs) != len(fds) {
		t.Fatalf("version %d, %d bytes (equal %v), %d fds", v, len(got), bytes.Equal(got, state), len(gotFDs))
	}
	for i := range fds {
		if inode(t, fds[i]) != inode(t, gotFDs[i]) {
			t.Fatalf("fd %d is another file", i)
		}
	}
	if err := n.Ready(); err != nil {
		t.Fatal(err)
	}
	if err := o.AwaitReady(); err != nil {
		t.Fatal(err)
	}
	if err := o.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := n.AwaitCommit(); err != nil {
		t.Fatal(err)
	}
}

// An abort carries its reason; the end of the connection is an error.
func TestAbortAndHangUp(t *testing.T) {
	o, n := pair(t)
	if err := n.Abort("state version 9 unknown"); err != nil {
		t.Fatal(err)
	}
	err := o.AwaitReady()
	if !errors.Is(err, ErrAborted) || !bytes.Contains([]byte(err.Error()), []byte("version 9")) {
		t.Fatalf("AwaitReady: %v", err)
	}
	n.Close()
	if err := o.AwaitReady(); err == nil {
		t.Fatal("AwaitReady after the peer closed: no error")
	}
}

// An end that does not match what came is refused, and the fds that came
// are closed.
func TestStateEndMismatch(t *testing.T) {
	o, n := pair(t)
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	go func() {
		o.send(msgData, []byte("abc"), nil)
		o.send(msgFDs, nil, []int{fd})
		end := make([]byte, 16)
		end[4] = 4 // 4 bytes announced, 3 sent
		end[12] = 1
		o.send(msgEnd, end, nil)
	}()
	if _, _, fds, err := n.ReadState(); err == nil || fds != nil {
		t.Fatalf("ReadState: %v, fds %v", err, fds)
	}
}

// A second backend cannot take the socket of a live one.
func TestListenRefusesLiveSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "h.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if l2, err := Listen(path); err == nil {
		l2.Close()
		t.Fatal("a second Listen on a live socket succeeded")
	}
}
