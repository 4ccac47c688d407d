package vhostuser_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/vhostuser"
	"github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// hoServer is one process's side of a handover test: a Server serving
// one VM with echo backends.
type hoServer struct {
	srv  *vhostuser.Server
	done chan error // Serve's (or ServeImported's) result
}

func testLog() *logrus.Entry {
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	if testing.Verbose() {
		log.SetLevel(logrus.DebugLevel)
	}
	return logrus.NewEntry(log)
}

func echoBackends(string) (vhostuser.Backend, error) { return &echoBackend{}, nil }

func serveHO(t *testing.T, path string) *hoServer {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &hoServer{srv: vhostuser.NewServer(testLog()), done: make(chan error, 1)}
	go func() { h.done <- h.srv.Serve(ctx, "vm", ln, echoBackends) }()
	t.Cleanup(func() { cancel(); <-h.done })
	if err := h.srv.WaitServing(context.Background(), "vm"); err != nil {
		t.Fatal(err)
	}
	return h
}

// takeOver plays the new process: it rebuilds every VM of vms on a new
// Server and closes the fd table once they are served.
func takeOver(t *testing.T, vms []vhostuser.ExportedVM, fds []int) *hoServer {
	t.Helper()
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	if len(vms) != 1 {
		t.Fatalf("%d VMs exported, want 1", len(vms))
	}
	vm := vms[0]
	ln, err := vhostuser.ListenerOf(fds, vm.Listener)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &hoServer{srv: vhostuser.NewServer(testLog()), done: make(chan error, 1)}
	ready := make(chan error, 1)
	go func() {
		h.done <- h.srv.ServeImported(ctx, vm.Name, ln, vm.Conn, fds, echoBackends, func(err error) { ready <- err })
	}()
	t.Cleanup(func() { cancel(); <-h.done })
	if err := <-ready; err != nil {
		t.Fatal("import:", err)
	}
	return h
}

// stream is a driver that keeps queue 0 busy with echo requests, each
// with its own pattern, and checks every completion: in order, of the
// right head and length, echoed whole. Nothing lost or doubled.
type stream struct {
	q     *vhostusertest.VQ
	in    [][]byte
	out   [][]byte
	bufs  [][]vhostusertest.Buf
	sent  uint64
	done  uint64
	mu    sync.Mutex
	total uint64 // completions checked so far (for waiting on progress)
	ended bool
	cond  *sync.Cond
}

const streamSlots = 32

func newStream(t *testing.T, f *vhostusertest.Frontend) *stream {
	t.Helper()
	s := &stream{q: f.Queues[0]}
	s.cond = sync.NewCond(&s.mu)
	for i := 0; i < streamSlots; i++ {
		gin, in, err := f.Mem.Alloc(64, 8)
		if err != nil {
			t.Fatal(err)
		}
		gout, out, err := f.Mem.Alloc(64, 8)
		if err != nil {
			t.Fatal(err)
		}
		s.in, s.out = append(s.in, in), append(s.out, out)
		s.bufs = append(s.bufs, []vhostusertest.Buf{{GPA: gin, Len: 64}, {GPA: gout, Len: 64, Write: true}})
	}
	return s
}

// run sends and checks n requests in rounds of up to streamSlots.
func (s *stream) run(n uint64) error {
	for s.done < n {
		k := min(uint64(streamSlots), n-s.sent)
		heads := make([]uint16, k)
		for i := range heads {
			seq := s.sent + uint64(i)
			slot := seq % streamSlots
			for j := range s.in[slot] {
				s.in[slot][j] = byte(seq>>(8*(j%8))) ^ byte(j)
			}
			clear(s.out[slot])
			heads[i] = s.q.AddChain(s.bufs[slot])
		}
		s.q.Publish(heads...)
		if _, err := s.q.KickIfNeeded(); err != nil {
			return err
		}
		for i := range heads {
			u, err := s.q.WaitUsed()
			if err != nil {
				return fmt.Errorf("request %d: %w", s.sent+uint64(i), err)
			}
			slot := (s.sent + uint64(i)) % streamSlots
			if u.ID != heads[i] || u.Len != 64 {
				return fmt.Errorf("request %d: used %+v, want head %d len 64", s.sent+uint64(i), u, heads[i])
			}
			if !bytes.Equal(s.in[slot], s.out[slot]) {
				return fmt.Errorf("request %d: echo differs", s.sent+uint64(i))
			}
			s.mu.Lock()
			s.total++
			s.cond.Broadcast()
			s.mu.Unlock()
		}
		s.sent += k
		s.done += k
	}
	if _, ok := s.q.Take(); ok {
		return errors.New("a completion more than requests sent")
	}
	return nil
}

// waitTotal waits until n requests completed; false if the stream ended
// first.
func (s *stream) waitTotal(n uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.total < n && !s.ended {
		s.cond.Wait()
	}
	return s.total >= n
}

// start runs the stream on its own goroutine; its result comes on the
// channel.
func (s *stream) start(n uint64) <-chan error {
	errc := make(chan error, 1)
	go func() {
		err := s.run(n)
		s.mu.Lock()
		s.ended = true
		s.cond.Broadcast()
		s.mu.Unlock()
		errc <- err
	}()
	return errc
}

// The driver keeps its queue busy while the connection moves to another
// Server: every request completes once, in order, and the new Server
// answers a control message the front-end sent while the old one was
// frozen. The old Serve returns ErrHandedOver and leaves the socket file.
func TestHandoverMovesRunningConnection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.sock")
	old := serveHO(t, path)
	f := started(t, path, vhostusertest.StartOptions{})
	s := newStream(t, f)
	const n = 20000
	errc := s.start(n)
	if !s.waitTotal(n / 4) { // data is flowing
		t.Fatal(<-errc)
	}

	fz, err := old.srv.Freeze(context.Background())
	if err != nil {
		t.Fatal("freeze:", err)
	}
	// A control message while frozen waits in the socket for the new
	// process.
	cfgc := make(chan []byte, 1)
	go func() {
		cfg, err := f.GetConfig(0, 64)
		if err != nil {
			t.Error("GET_CONFIG across the handover:", err)
		}
		cfgc <- cfg
	}()
	vms, fds, err := fz.Export()
	if err != nil {
		fz.Thaw()
		t.Fatal("export:", err)
	}
	if vms[0].Conn == nil || !vms[0].Conn.Started || len(vms[0].Conn.Regions) == 0 {
		t.Fatalf("exported %+v", vms[0].Conn)
	}
	nw := takeOver(t, vms, fds)
	fz.Release()
	if err := <-old.done; !errors.Is(err, vhostuser.ErrHandedOver) {
		t.Fatalf("old Serve returned %v, want ErrHandedOver", err)
	}
	old.done <- nil // for the cleanup
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket file after the handover: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if cfg := <-cfgc; len(cfg) != 64 || cfg[63] != 63 {
		t.Fatalf("GET_CONFIG answered % x", cfg)
	}
	d := nw.srv.Guest("vm")
	if d == nil || !d.Started() {
		t.Fatal("new Server has no started device")
	}
	if got, want := s.q.UsedIdx(), uint16(n); got != want {
		t.Fatalf("used idx %d, want %d", got, want)
	}
	// The new Server goes on with the front-end's control messages: a
	// reset and a start again.
	if err := f.Stop(); err != nil {
		t.Fatal("stop after the handover:", err)
	}
	if d.Started() {
		t.Fatal("device still started after the reset")
	}
}

// A Freeze that is thawed changes nothing: the old Server serves on.
func TestHandoverThawGoesOn(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.sock")
	old := serveHO(t, path)
	f := started(t, path, vhostusertest.StartOptions{})
	s := newStream(t, f)
	const n = 5000
	errc := s.start(n)
	if !s.waitTotal(n / 4) {
		t.Fatal(<-errc)
	}
	fz, err := old.srv.Freeze(context.Background())
	if err != nil {
		t.Fatal("freeze:", err)
	}
	_, fds, err := fz.Export()
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	fz.Thaw()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if _, err := f.GetConfig(0, 64); err != nil {
		t.Fatal("control channel after a thaw:", err)
	}
}

// A VM with no front-end connected moves as its listener alone; the new
// Server accepts the next connection.
func TestHandoverIdleVM(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.sock")
	old := serveHO(t, path)
	fz, err := old.srv.Freeze(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	vms, fds, err := fz.Export()
	if err != nil {
		t.Fatal(err)
	}
	if vms[0].Conn != nil {
		t.Fatal("a connection exported for an idle VM")
	}
	takeOver(t, vms, fds)
	fz.Release()
	if err := <-old.done; !errors.Is(err, vhostuser.ErrHandedOver) {
		t.Fatalf("old Serve returned %v", err)
	}
	old.done <- nil
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
}

// A state that does not fit is refused with an error, and nothing of it
// is served.
func TestHandoverImportRefusesBadState(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.sock")
	old := serveHO(t, path)
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
	fz, err := old.srv.Freeze(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer fz.Thaw()
	vms, fds, err := fz.Export()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	good := *vms[0].Conn
	for name, mutate := range map[string]func(c *vhostuser.ConnState){
		"conn fd out of range": func(c *vhostuser.ConnState) { c.Conn = len(fds) },
		"negative region fd": func(c *vhostuser.ConnState) {
			c.Regions = append([]vhostuser.RegionState{{Size: 4096, FD: -5}}, c.Regions[1:]...)
		},
		"queue count": func(c *vhostuser.ConnState) { c.Queues = c.Queues[:1] },
		"queue size": func(c *vhostuser.ConnState) {
			c.Queues = append([]vhostuser.QueueState{{Size: 3, MaxChainLen: 1}}, c.Queues[1:]...)
		},
		"acked not offered":      func(c *vhostuser.ConnState) { c.AckedFeatures |= 1 << 60; c.OfferedFeatures |= 1 << 60 },
		"region beyond its file": func(c *vhostuser.ConnState) { r := c.Regions[0]; r.Size <<= 20; c.Regions = []vhostuser.RegionState{r} },
		"overlapping regions":    func(c *vhostuser.ConnState) { c.Regions = append(c.Regions, c.Regions[0]) },
		"indexes apart": func(c *vhostuser.ConnState) {
			q := c.Queues[0]
			q.LastAvail = q.UsedIdx + q.Size + 1
			c.Queues = []vhostuser.QueueState{q, c.Queues[1]}
		},
	} {
		st := good
		st.Regions = append([]vhostuser.RegionState(nil), good.Regions...)
		st.Queues = append([]vhostuser.QueueState(nil), good.Queues...)
		mutate(&st)
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "x.sock"), Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		srv := vhostuser.NewServer(testLog())
		var rerr error
		err = srv.ServeImported(context.Background(), "vm", ln, &st, fds, echoBackends, func(err error) { rerr = err })
		if err == nil || rerr == nil {
			t.Errorf("%s: imported (%v, %v)", name, err, rerr)
		}
		if srv.Guest("vm") != nil {
			t.Errorf("%s: a device is served", name)
		}
	}
}

// quiescingBackend is an echo backend that is a Quiescer: its first Idle
// after a Quiesce says no, as a backend that a control message gave work.
type quiescingBackend struct {
	echoBackend
	mu                        sync.Mutex
	quiesced, idle, unquiesce int
}

func (b *quiescingBackend) Quiesce(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.quiesced++
	return nil
}

func (b *quiescingBackend) Idle() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.idle++
	return b.idle > 1
}

func (b *quiescingBackend) Unquiesce() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.unquiesce++
}

// Freeze asks a busy backend again (with the control channel served in
// between) and Thaw unquiesces it once.
func TestFreezeAsksBusyBackendAgain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	srv := vhostuser.NewServer(testLog())
	qb := &quiescingBackend{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- srv.Serve(ctx, "vm", ln, func(string) (vhostuser.Backend, error) { return qb, nil })
	}()
	defer func() { cancel(); <-done }()
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
	fz, err := srv.Freeze(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	qb.mu.Lock()
	q, i := qb.quiesced, qb.idle
	qb.mu.Unlock()
	if q != 2 || i != 2 {
		t.Fatalf("Quiesce %d times, Idle %d times; want 2 and 2", q, i)
	}
	fz.Thaw()
	fz.Thaw() // a second Thaw does nothing
	if qb.unquiesce != 1 {
		t.Fatalf("Unquiesce %d times", qb.unquiesce)
	}
	echo(t, f, 0, 64, false)
}

// A Server held (the new process before its commit) serves nothing: a
// request waits until Unhold, then completes.
func TestHoldServesNothingUntilUnhold(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.sock")
	old := serveHO(t, path)
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
	fz, err := old.srv.Freeze(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	vms, fds, err := fz.Export()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	ln, err := vhostuser.ListenerOf(fds, vms[0].Listener)
	if err != nil {
		t.Fatal(err)
	}
	srv := vhostuser.NewServer(testLog())
	srv.Hold()
	ctx, cancel := context.WithCancel(context.Background())
	ready, done := make(chan error, 1), make(chan error, 1)
	go func() {
		done <- srv.ServeImported(ctx, "vm", ln, vms[0].Conn, fds, echoBackends, func(err error) { ready <- err })
	}()
	defer func() { cancel(); <-done }()
	if err := <-ready; err != nil {
		t.Fatal(err)
	}
	fz.Release()
	<-old.done
	old.done <- nil
	// A request now is not taken while held: its used idx stays.
	s := newStream(t, f)
	q := s.q
	before := q.UsedIdx()
	head := q.AddChain(s.bufs[0])
	q.Publish(head)
	if err := q.Kick(); err != nil {
		t.Fatal(err)
	}
	cfgc := make(chan error, 1)
	go func() { _, err := f.GetConfig(0, 64); cfgc <- err }()
	// Both wait in the kernel (eventfd, socket) for the Unhold; nothing
	// here can tell "not yet" from "never" without a clock, so the check
	// is that they complete after it, in order, once.
	if q.UsedIdx() != before {
		t.Fatal("a request completed while the Server was held")
	}
	srv.Unhold()
	u, err := q.WaitUsed()
	if err != nil || u.ID != head {
		t.Fatalf("after Unhold: used %+v, %v", u, err)
	}
	if err := <-cfgc; err != nil {
		t.Fatal("GET_CONFIG after Unhold:", err)
	}
}
