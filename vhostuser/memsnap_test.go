package vhostuser_test

import (
	"bufio"
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/vhostuser"
	"github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// sparseRegion is a region of size bytes at gpa backed by a sparse memfd;
// the front-end maps only its first page (Host gives the user address).
func sparseRegion(t *testing.T, gpa, size uint64) *vhostusertest.Region {
	t.Helper()
	fd, err := unix.MemfdCreate("sparse", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		t.Skipf("cannot make a sparse memfd of %d bytes: %v", size, err)
	}
	host, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(host); unix.Close(fd) })
	return &vhostusertest.Region{GPA: gpa, Size: size, FD: fd, Host: host}
}

func tableRegions(dev *vhostuser.Guest) int {
	var n int
	dev.WithMemoryLock(func() { n = len(dev.Memory().Regions()) })
	return n
}

// A connection's memory table is capped in bytes and in regions. A
// SET_MEM_TABLE or ADD_MEM_REG beyond a cap is refused before anything is
// mapped, and the table in use stays as it was: the queues go on.
func TestMemoryCapsRefuse(t *testing.T) {
	e := newEnv(t)
	e.srv.MaxMemBytes = 4 << 20 // the test guest has 2 MiB in two regions
	e.srv.MaxMemRegions = 3
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{})
	if f.MaxMemSlots != 3 {
		t.Errorf("GET_MAX_MEM_SLOTS answered %d, want the region cap 3", f.MaxMemSlots)
	}
	dev := e.srv.Guest("vm")
	end := f.Mem.End()
	refused := func(what string, err error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: accepted", what)
		}
		if n := tableRegions(dev); n != 2 && what != "fourth region" {
			t.Fatalf("%s: the table has %d regions after the refusal, want 2", what, n)
		}
		echo(t, f, 0, 64, false) // the old table still serves
	}
	// 125 TiB of sparse memory, as a hostile front-end sent.
	refused("huge ADD_MEM_REG", f.AddMemReg(sparseRegion(t, end, 125<<40)))
	refused("huge SET_MEM_TABLE", f.SetMemTable(sparseRegion(t, end, 125<<40)))
	// Bytes: 2 MiB + 3 MiB > 4 MiB, in a table or added.
	refused("ADD_MEM_REG past the byte cap", f.AddMemReg(sparseRegion(t, end, 3<<20)))
	refused("SET_MEM_TABLE past the byte cap", f.SetMemTable(sparseRegion(t, end, 3<<20)))
	// Regions: a third fits, a fourth does not.
	if err := f.AddMemReg(sparseRegion(t, end, 1<<20)); err != nil {
		t.Fatal("third region refused:", err)
	}
	refused("fourth region", f.AddMemReg(sparseRegion(t, end+2<<20, 4096)))
	if n := tableRegions(dev); n != 3 {
		t.Fatalf("%d regions after the fourth was refused, want 3", n)
	}
	if err := f.SetMemTable(sparseRegion(t, end, 1<<20), sparseRegion(t, end+2<<20, 4096)); err == nil {
		t.Fatal("SET_MEM_TABLE of 4 regions accepted")
	}
	if n := tableRegions(dev); n != 3 {
		t.Fatalf("%d regions after a refused SET_MEM_TABLE, want 3", n)
	}
	echo(t, f, 0, 64, false)
	if st := dev.Stats(); st.BadMessages != 6 {
		t.Errorf("%d bad messages counted, want the 6 refusals", st.BadMessages)
	}
}

// memfdMappings counts this process's mappings of the file behind fd (the
// test front-end's own and the back-end's).
func memfdMappings(t *testing.T, fd int) int {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	s := bufio.NewScanner(f)
	for s.Scan() {
		// address perms offset dev inode path
		fields := strings.Fields(s.Text())
		if len(fields) < 6 || !strings.Contains(fields[5], "memfd:") {
			continue
		}
		if ino, err := strconv.ParseUint(fields[4], 10, 64); err == nil && ino == st.Ino {
			n++
		}
	}
	return n
}

// holdBackend is VM b's device: its first request chain on queue 0 holds a
// reference to VM a's memory table and stays in HandleQueue (b's batch in
// progress) until release; then it writes through the reference and
// releases it, as a MOVE into a's RAM does.
type holdBackend struct {
	echoBackend
	srv     *vhostuser.Server
	gpa     uint64 // in a's RAM
	held    atomic.Bool
	entered chan error
	release chan struct{}
}

func (b *holdBackend) HandleQueue(dev *vhostuser.Guest, q *vhostuser.Queue) {
	if q.Index() != 0 || b.held.Load() {
		b.echoBackend.HandleQueue(dev, q)
		return
	}
	c := &b.chain[0]
	ok, err := q.Next(c)
	if !ok || err != nil {
		return // the kick of the test's chain comes
	}
	b.held.Store(true)
	mem := b.srv.Guest("a").AcquireMemory()
	dst, err := mem.Bytes(b.gpa, 8)
	b.entered <- err
	<-b.release
	if err == nil {
		copy(dst, "written!") // a's table no longer has this mapping
	}
	mem.Release()
	q.Push(c, 0)
	q.Notify()
}

// VM a's memory-table changes and its queues go on while VM b's batch is in
// progress and b holds a reference to a's old table (a MOVE into a): nothing
// waits for b. The mapping a's new table dropped stays until b releases its
// reference, and goes then.
func TestMemTableSwapDoesNotWaitForOtherVMsBatch(t *testing.T) {
	e := newEnv(t)
	pathA := e.serve(context.Background(), "a", func() *echoBackend { return &echoBackend{} })
	fa := started(t, pathA, vhostusertest.StartOptions{})
	r1 := fa.Mem.Regions[1]
	hb := &holdBackend{srv: e.srv, gpa: r1.GPA + 64, entered: make(chan error), release: make(chan struct{})}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(e.dir, "b.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	serveDone := make(chan struct{})
	go func() {
		defer close(serveDone)
		e.srv.Serve(ctx, "b", ln, func(string) (vhostuser.Backend, error) { return hb, nil })
	}()
	released := false
	defer func() {
		if !released {
			close(hb.release)
		}
		cancel()
		<-serveDone
	}()
	fb := started(t, filepath.Join(e.dir, "b.sock"), vhostusertest.StartOptions{})
	if n := memfdMappings(t, r1.FD); n != 2 {
		t.Fatalf("a's region 1 is mapped %d times, want 2 (front-end, back-end)", n)
	}

	qb := fb.Queues[0]
	in, _, _ := fb.Mem.Alloc(64, 8)
	head := qb.AddChain([]vhostusertest.Buf{{GPA: in, Len: 64}})
	qb.Publish(head)
	if err := qb.Kick(); err != nil {
		t.Fatal(err)
	}
	if err := <-hb.entered; err != nil {
		t.Fatal("b's view of a's RAM:", err)
	}

	// b is inside its batch with a's table referenced. Each of these
	// waits for the back-end's reply (REPLY_ACK): with one lock for all
	// VMs they would wait for b's batch, which waits for the test.
	if err := fa.RemMemReg(r1); err != nil {
		t.Fatal("REM_MEM_REG while b's batch holds a's table:", err)
	}
	if err := fa.AddMemReg(r1); err != nil {
		t.Fatal("ADD_MEM_REG:", err)
	}
	if err := fa.SetMemTable(); err != nil {
		t.Fatal("SET_MEM_TABLE:", err)
	}
	if err := fa.SetVringEnable(1, false); err != nil {
		t.Fatal("SET_VRING_ENABLE:", err)
	}
	if err := fa.SetVringEnable(1, true); err != nil {
		t.Fatal("SET_VRING_ENABLE:", err)
	}
	echo(t, fa, 0, 256, false) // a's queue runs meanwhile
	// The old mapping (in the table b holds) is still there beside the new.
	if n := memfdMappings(t, r1.FD); n != 3 {
		t.Fatalf("a's region 1 is mapped %d times while b holds the old table, want 3", n)
	}

	close(hb.release)
	released = true
	if u, err := qb.WaitUsed(); err != nil || u.ID != head {
		t.Fatalf("b's chain: %+v, %v", u, err)
	}
	if n := memfdMappings(t, r1.FD); n != 2 {
		t.Fatalf("a's region 1 is mapped %d times after b released the old table, want 2", n)
	}
	got, err := fa.Mem.Read(hb.gpa, 8)
	if err != nil || string(got) != "written!" {
		t.Fatalf("b's write through the old table: %q, %v", got, err)
	}
	echo(t, fb, 0, 64, false)
}
