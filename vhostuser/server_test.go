package vhostuser_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/vhostuser"
	"github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
	"github.com/ism-backend/ism-backend/virtq"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// echoBackend copies each request's readable bytes into its writable part.
type echoBackend struct {
	shmem      []uint64
	maxChain   uint64
	panicOnHQ  bool
	started    atomic.Int32
	stopped    atomic.Int32
	closed     atomic.Int32
	badChains  atomic.Int32
	calls      atomic.Int32 // HandleQueue calls for queue 0
	startedDev chan *vhostuser.Guest

	// per queue: each queue has its own goroutine
	chain [numQueues]vhostuser.Chain
	buf   [numQueues][4096]byte
}

const numQueues = 2

func (b *echoBackend) Features() uint64 { return 0 }
func (b *echoBackend) NumQueues() int   { return numQueues }
func (b *echoBackend) ReadConfig(off uint32, buf []byte) error {
	if uint64(off)+uint64(len(buf)) > 64 {
		return errors.New("config out of range")
	}
	for i := range buf {
		buf[i] = byte(int(off) + i)
	}
	return nil
}
func (b *echoBackend) WriteConfig(uint32, []byte) error { return errors.New("read-only") }
func (b *echoBackend) ShmemSizes() []uint64             { return b.shmem }
func (b *echoBackend) Start(dev *vhostuser.Guest) error {
	b.started.Add(1)
	if b.maxChain != 0 {
		for i := 0; i < dev.NumQueues(); i++ {
			dev.Queue(i).SetMaxChainLen(b.maxChain)
		}
	}
	if b.startedDev != nil {
		select {
		case b.startedDev <- dev:
		default:
		}
	}
	return nil
}
func (b *echoBackend) Stop(*vhostuser.Guest) { b.stopped.Add(1) }
func (b *echoBackend) Close()                { b.closed.Add(1) }
func (b *echoBackend) HandleQueue(dev *vhostuser.Guest, q *vhostuser.Queue) {
	if q.Index() == 0 {
		b.calls.Add(1)
	}
	if b.panicOnHQ {
		panic("test panic")
	}
	c, buf := &b.chain[q.Index()], b.buf[q.Index()][:]
	for {
		ok, err := q.Next(c)
		if err != nil {
			b.badChains.Add(1)
			continue
		}
		if !ok {
			break
		}
		rd, wr := c.Reader(), c.Writer()
		n, _ := rd.Read(buf)
		w, _ := wr.Write(buf[:n])
		q.Push(c, uint32(w))
	}
	q.Notify()
}

type env struct {
	t      *testing.T
	srv    *vhostuser.Server
	dir    string
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	backs  map[string][]*echoBackend
}

func newEnv(t *testing.T) *env {
	t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	if testing.Verbose() {
		log.SetLevel(logrus.DebugLevel)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &env{t: t, srv: vhostuser.NewServer(logrus.NewEntry(log)), dir: t.TempDir(), cancel: cancel, backs: map[string][]*echoBackend{}}
	t.Cleanup(func() {
		cancel()
		e.wg.Wait()
	})
	_ = ctx
	return e
}

// serve starts a VM socket; mk makes each connection's backend.
func (e *env) serve(ctx context.Context, name string, mk func() *echoBackend) string {
	e.t.Helper()
	path := filepath.Join(e.dir, name+".sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(ctx)
	e.t.Cleanup(cancel)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		err := e.srv.Serve(ctx, name, ln, func(string) (vhostuser.Backend, error) {
			b := mk()
			e.mu.Lock()
			e.backs[name] = append(e.backs[name], b)
			e.mu.Unlock()
			return b, nil
		})
		if err != nil && !errors.Is(err, context.Canceled) {
			e.t.Errorf("Serve %s: %v", name, err)
		}
	}()
	return path
}

func (e *env) backends(name string) []*echoBackend {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]*echoBackend(nil), e.backs[name]...)
}

func newMem(t *testing.T, sizes ...uint64) *vhostusertest.GuestMemory {
	t.Helper()
	if len(sizes) == 0 {
		sizes = []uint64{1 << 20, 1 << 20}
	}
	m, err := vhostusertest.NewGuestMemory(0x10000, sizes...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

func dial(t *testing.T, path string, mem *vhostusertest.GuestMemory) *vhostusertest.Frontend {
	t.Helper()
	f, err := vhostusertest.Dial(path, mem)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return f
}

// started connects, does the realize handshake and the start sequence.
func started(t *testing.T, path string, opt vhostusertest.StartOptions) *vhostusertest.Frontend {
	t.Helper()
	f := dial(t, path, newMem(t))
	if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
		t.Fatal("handshake:", err)
	}
	if err := f.Start(opt); err != nil {
		t.Fatal("start:", err)
	}
	return f
}

// echo sends one request of n bytes on queue qi and checks the echo.
func echo(t *testing.T, f *vhostusertest.Frontend, qi int, n uint32, indirect bool) {
	t.Helper()
	q := f.Queues[qi]
	in, inHost, err := f.Mem.Alloc(uint64(n), 8)
	if err != nil {
		t.Fatal(err)
	}
	out, outHost, err := f.Mem.Alloc(uint64(n), 8)
	if err != nil {
		t.Fatal(err)
	}
	for i := range inHost {
		inHost[i] = byte(i*7 + 1)
	}
	bufs := []vhostusertest.Buf{{GPA: in, Len: n}, {GPA: out, Len: n, Write: true}}
	var head uint16
	if indirect {
		head, err = q.AddIndirect(bufs)
		if err != nil {
			t.Fatal(err)
		}
	} else {
		head = q.AddChain(bufs)
	}
	q.Publish(head)
	if err := q.Kick(); err != nil {
		t.Fatal(err)
	}
	u, err := q.WaitUsed()
	if err != nil {
		t.Fatal("wait used:", err)
	}
	if u.ID != head || u.Len != n {
		t.Fatalf("used %+v, want id %d len %d", u, head, n)
	}
	if !bytes.Equal(inHost, outHost) {
		t.Fatal("echoed data differs")
	}
}

func TestNegotiationQEMUOrder(t *testing.T) {
	for _, shm := range []bool{false, true} {
		e := newEnv(t)
		var sizes []uint64
		if shm {
			sizes = []uint64{1 << 24}
		}
		path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{shmem: sizes} })
		f := dial(t, path, newMem(t))
		if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
			t.Fatal(err)
		}
		for _, bit := range []uint{vhostuser.FeatureVersion1, vhostuser.FeatureRingEventIdx, vhostuser.FeatureRingIndirectDesc, vhostuser.FeatureProtocolFeatures} {
			if f.OfferedFeatures&(1<<bit) == 0 {
				t.Errorf("feature bit %d not offered: %#x", bit, f.OfferedFeatures)
			}
		}
		for _, bit := range []uint{vhostuser.ProtocolMQ, vhostuser.ProtocolReplyAck, vhostuser.ProtocolConfig, vhostuser.ProtocolBackendReq,
			vhostuser.ProtocolBackendSendFD, vhostuser.ProtocolConfigureMemSlots, vhostuser.ProtocolResetDevice, vhostuser.ProtocolStatus} {
			if f.OfferedProtocol&(1<<bit) == 0 {
				t.Errorf("protocol bit %d not offered: %#x", bit, f.OfferedProtocol)
			}
		}
		if got := f.OfferedProtocol&(1<<vhostuser.ProtocolShmem) != 0; got != shm {
			t.Errorf("SHMEM offered %v, want %v", got, shm)
		}
		if shm && (len(f.ShmemSizes) != 1 || f.ShmemSizes[0] != 1<<24) {
			t.Errorf("shmem sizes %v", f.ShmemSizes)
		}
		if f.QueueNum != numQueues || f.MaxMemSlots != vhostuser.MaxMemSlots {
			t.Errorf("queue num %d, max mem slots %d", f.QueueNum, f.MaxMemSlots)
		}
		cfg, err := f.GetConfig(0, 64)
		if err != nil {
			t.Fatal(err)
		}
		if cfg[0] != 0 || cfg[63] != 63 {
			t.Errorf("config % x", cfg[:8])
		}
		if _, err := f.GetConfig(32, 64); err == nil {
			t.Error("GET_CONFIG beyond the config space answered")
		}
		dev := e.srv.Guest("vm")
		if dev == nil || dev.Started() {
			t.Fatal("device missing or started before DRIVER_OK")
		}
		if err := f.Start(vhostusertest.StartOptions{}); err != nil {
			t.Fatal(err)
		}
		if !dev.Started() || e.backends("vm")[0].started.Load() != 1 {
			t.Fatal("device not started after DRIVER_OK and rings")
		}
		if dev.AckedProtocolFeatures() != f.Protocol {
			t.Errorf("acked protocol %#x, front-end acked %#x", dev.AckedProtocolFeatures(), f.Protocol)
		}
		echo(t, f, 0, 64, false)
		echo(t, f, 1, 64, true)
		// The refused GET_CONFIG is the one bad message.
		if s := dev.Stats(); s.BadMessages != 1 || s.BadChains != 0 || s.Messages == 0 {
			t.Errorf("stats %+v", s)
		}
		e.cancel()
	}
}

func TestStartWithDriverOKStatus(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{DriverOKStatus: true})
	echo(t, f, 0, 64, false)
}

// Without CONFIGURE_MEM_SLOTS QEMU sends SET_MEM_TABLE.
func TestStartWithSetMemTable(t *testing.T) {
	f := startedWithout(t, vhostuser.ProtocolConfigureMemSlots)
	echo(t, f, 0, 64, false)
	echo(t, f, 1, 64, true)
}

// startedWithout starts an echo device whose front-end does not ack
// protocol feature bit.
func startedWithout(t *testing.T, bit uint) *vhostusertest.Frontend {
	t.Helper()
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := dial(t, path, newMem(t))
	if err := f.Handshake(vhostusertest.HandshakeOptions{ProtocolMask: ^uint64(1 << bit)}); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(vhostusertest.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	return f
}

// Guest reset as QEMU 11.1.3 does it: rings disabled, then GET_VRING_BASE.
// The device stops, and starts again on the next start sequence.
func TestGuestResetAndRestart(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{Queues: []int{0}})
	echo(t, f, 0, 64, false)
	dev := e.srv.Guest("vm")
	b := e.backends("vm")[0]
	if err := f.Stop(); err != nil {
		t.Fatal(err)
	}
	if dev.Started() || b.stopped.Load() != 1 {
		t.Fatal("device not stopped by the rings being disabled")
	}
	// The driver sets up fresh rings (same addresses) before DRIVER_OK;
	// QEMU sends base 0 again.
	f.Queues[0].Reset()
	if err := f.Start(vhostusertest.StartOptions{Queues: []int{0}}); err != nil {
		t.Fatal(err)
	}
	if !dev.Started() || b.started.Load() != 2 {
		t.Fatal("device not restarted")
	}
	echo(t, f, 0, 64, false)
}

func TestStartWithoutStatus(t *testing.T) {
	f := startedWithout(t, vhostuser.ProtocolStatus)
	echo(t, f, 0, 64, false)
}

func TestEchoAcrossRegions(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{})
	q := f.Queues[0]
	// 256 bytes that start 100 bytes before the end of region 0.
	in, err := f.Mem.AllocAcross(0, 100, 256)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 256)
	for i := range data {
		data[i] = byte(i)
	}
	f.Mem.Write(in, data)
	out, outHost, err := f.Mem.Alloc(256, 8)
	if err != nil {
		t.Fatal(err)
	}
	for _, indirect := range []bool{false, true} {
		clear(outHost)
		bufs := []vhostusertest.Buf{{GPA: in, Len: 256}, {GPA: out, Len: 256, Write: true}}
		var head uint16
		if indirect {
			head, err = q.AddIndirect(bufs)
			if err != nil {
				t.Fatal(err)
			}
		} else {
			head = q.AddChain(bufs)
		}
		q.Publish(head)
		q.Kick()
		u, err := q.WaitUsed()
		if err != nil || u.Len != 256 {
			t.Fatalf("used %+v %v", u, err)
		}
		if !bytes.Equal(outHost, data) {
			t.Fatal("data across regions not echoed")
		}
	}
}

// hostile chains: each is refused (used len 0, counted), and the queue, the
// connection and another VM on the same Server go on working.
func TestHostileChains(t *testing.T) {
	e := newEnv(t)
	mk := func() *echoBackend { return &echoBackend{maxChain: 1 << 20} }
	pathA := e.serve(context.Background(), "a", mk)
	pathB := e.serve(context.Background(), "b", mk)
	fa := started(t, pathA, vhostusertest.StartOptions{})
	fb := started(t, pathB, vhostusertest.StartOptions{})
	q := fa.Queues[0]
	buf, _, _ := fa.Mem.Alloc(64, 8)
	cases := []struct {
		name  string
		build func() uint16
	}{
		{"address outside guest RAM", func() uint16 {
			return q.AddChain([]vhostusertest.Buf{{GPA: fa.Mem.End() + 4096, Len: 64}})
		}},
		{"address wraps", func() uint16 {
			return q.AddChain([]vhostusertest.Buf{{GPA: ^uint64(0) - 8, Len: 64}})
		}},
		{"crosses the end of guest RAM", func() uint16 {
			return q.AddChain([]vhostusertest.Buf{{GPA: fa.Mem.End() - 8, Len: 64}})
		}},
		{"loop", func() uint16 {
			return q.AddRaw(virtq.Desc{Addr: buf, Len: 8, Next: 1}, virtq.Desc{Addr: buf, Len: 8, Next: 0})
		}},
		{"next out of range", func() uint16 {
			// Outside the free list: every chain before came back, so
			// descriptor 0 is free.
			q.PutDesc(0, buf, 8, virtq.DescFNext, 60000)
			return 0
		}},
		{"oversized", func() uint16 {
			return q.AddChain([]vhostusertest.Buf{{GPA: buf, Len: 1 << 21}})
		}},
		{"readable after writable", func() uint16 {
			return q.AddChain([]vhostusertest.Buf{{GPA: buf, Len: 8, Write: true}, {GPA: buf, Len: 8}})
		}},
		{"indirect in indirect", func() uint16 {
			tgpa, table, _ := fa.Mem.Alloc(32, 16)
			_ = virtq.EncodeDescs(table, []virtq.Desc{{Addr: buf, Len: 8, Next: 1}, {Addr: tgpa, Len: 32, Indirect: true, Next: -1}})
			return q.AddRaw(virtq.Desc{Addr: tgpa, Len: 32, Indirect: true, Next: -1})
		}},
		{"indirect loop", func() uint16 {
			tgpa, table, _ := fa.Mem.Alloc(32, 16)
			_ = virtq.EncodeDescs(table, []virtq.Desc{{Addr: buf, Len: 8, Next: 1}, {Addr: buf, Len: 8, Next: 0}})
			return q.AddRaw(virtq.Desc{Addr: tgpa, Len: 32, Indirect: true, Next: -1})
		}},
		{"indirect table outside guest RAM", func() uint16 {
			return q.AddRaw(virtq.Desc{Addr: fa.Mem.End(), Len: 32, Indirect: true, Next: -1})
		}},
		{"indirect table length not a multiple of 16", func() uint16 {
			return q.AddRaw(virtq.Desc{Addr: buf, Len: 20, Indirect: true, Next: -1})
		}},
	}
	dev := e.srv.Guest("a")
	for i, c := range cases {
		head := c.build()
		q.Publish(head)
		q.Kick()
		u, err := q.WaitUsed()
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if u.ID != head || u.Len != 0 {
			t.Errorf("%s: used %+v, want id %d len 0", c.name, u, head)
		}
		if got := dev.Stats().BadChains; got != uint64(i+1) {
			t.Errorf("%s: bad chains %d, want %d", c.name, got, i+1)
		}
		echo(t, fa, 0, 64, false)
		echo(t, fb, 0, 64, false)
	}
	// A head index out of range in the avail ring.
	before := dev.Stats().BadChains
	q.Publish(q.Size() + 3)
	q.Kick()
	if u, err := q.WaitUsed(); err != nil || u.Len != 0 {
		t.Fatalf("out-of-range head: %+v %v", u, err)
	}
	if dev.Stats().BadChains != before+1 {
		t.Error("out-of-range head not counted")
	}
	echo(t, fa, 0, 64, false)

	// An avail idx jump beyond the queue size breaks the queue until reset
	// (counted as a bad chain); queue 1 and VM b go on.
	before = dev.Stats().BadChains
	q.CorruptAvailIdx(q.Size() + 1) // every chain published was used
	q.Kick()
	deadline := time.Now().Add(vhostusertest.Timeout)
	for dev.Stats().BadChains == before && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	var broken bool
	dev.WithMemoryLock(func() { broken = dev.Queue(0).Broken() })
	if !broken {
		t.Error("queue 0 not broken after an avail idx jump")
	}
	echo(t, fa, 1, 64, false)
	echo(t, fb, 0, 64, false)
}

// bad messages close that connection only.
func TestBadMessages(t *testing.T) {
	e := newEnv(t)
	mk := func() *echoBackend { return &echoBackend{} }
	pathA := e.serve(context.Background(), "a", mk)
	pathB := e.serve(context.Background(), "b", mk)
	fb := started(t, pathB, vhostusertest.StartOptions{})
	efd, _ := unix.Eventfd(0, unix.EFD_CLOEXEC)
	defer unix.Close(efd)
	cases := []struct {
		name string
		raw  []byte
		fds  []int
		half bool // close the write side after sending (truncation)
	}{
		{"truncated payload", vhostusertest.RawMessage(vhostuser.ReqSetFeatures, 1, 8, []byte{1, 2, 3, 4}), nil, true},
		{"truncated header", []byte{1, 0, 0, 0, 1, 0}, nil, true},
		{"oversize", vhostusertest.RawMessage(vhostuser.ReqSetFeatures, 1, 1<<20, nil), nil, false},
		{"wrong payload size", vhostusertest.RawMessage(vhostuser.ReqSetFeatures, 1, 4, []byte{0, 0, 0, 0}), nil, false},
		{"kick without fd", vhostusertest.RawMessage(vhostuser.ReqSetVringKick, 1, 8, make([]byte, 8)), nil, false},
		{"get_features with fd", vhostusertest.RawMessage(vhostuser.ReqGetFeatures, 1, 0, nil), []int{efd}, false},
		{"mem table fd count", memTableOneRegionTwoFDs(efd), []int{efd, efd}, false},
		{"bad version", vhostusertest.RawMessage(vhostuser.ReqGetFeatures, 2, 0, nil), nil, false},
		{"reply flag from the front-end", vhostusertest.RawMessage(vhostuser.ReqGetFeatures, 5, 0, nil), nil, false},
		{"config size mismatch", vhostusertest.RawMessage(vhostuser.ReqGetConfig, 1, 12, []byte{0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0}), nil, false},
	}
	for _, c := range cases {
		f := dial(t, pathA, newMem(t))
		if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := f.SendRaw(c.raw, c.fds); err != nil {
			t.Fatal(err)
		}
		if c.half {
			f.Conn().CloseWrite()
		}
		if !f.WaitClosed() {
			t.Errorf("%s: connection not closed", c.name)
		}
		f.Close()
		echo(t, fb, 0, 64, false)
	}
	// Unknown request with NEED_REPLY: error status, connection stays.
	f := started(t, pathA, vhostusertest.StartOptions{})
	if _, err := f.Request(99, nil, nil, true); err == nil {
		t.Error("unknown request acked as success")
	}
	echo(t, f, 0, 64, false)
}

func memTableOneRegionTwoFDs(fd int) []byte {
	p := make([]byte, 8+32)
	binary.LittleEndian.PutUint32(p, 1)
	binary.LittleEndian.PutUint64(p[8+8:], 4096)
	return vhostusertest.RawMessage(vhostuser.ReqSetMemTable, 1, uint32(len(p)), p)
}

func TestReconnect(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	for i := 0; i < 3; i++ {
		f := started(t, path, vhostusertest.StartOptions{})
		echo(t, f, 0, 64, false)
		f.Close()
		f.WaitClosed()
	}
	// The fourth connection's handshake completes only after the third is
	// torn down (one connection at a time).
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
	bs := e.backends("vm")
	if len(bs) != 4 {
		t.Fatalf("%d backends", len(bs))
	}
	for i, b := range bs[:3] {
		if b.closed.Load() != 1 || b.stopped.Load() != 1 || b.started.Load() != 1 {
			t.Errorf("backend %d: started %d stopped %d closed %d", i, b.started.Load(), b.stopped.Load(), b.closed.Load())
		}
	}
}

func TestStatusZeroStopsAndRestarts(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
	if err := f.SetStatus(0); err != nil {
		t.Fatal(err)
	}
	dev := e.srv.Guest("vm")
	b := e.backends("vm")[0]
	if dev.Started() || b.stopped.Load() != 1 {
		t.Fatal("status 0 did not stop the device")
	}
	base, err := f.GetVringBase(0)
	if err != nil || base != 1 {
		t.Fatalf("GET_VRING_BASE %d %v", base, err)
	}
}

func TestPanicInBackendClosesOnlyThatConnection(t *testing.T) {
	e := newEnv(t)
	pathA := e.serve(context.Background(), "a", func() *echoBackend { return &echoBackend{panicOnHQ: true} })
	pathB := e.serve(context.Background(), "b", func() *echoBackend { return &echoBackend{} })
	fa := dial(t, pathA, newMem(t))
	if err := fa.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
		t.Fatal(err)
	}
	fa.Start(vhostusertest.StartOptions{}) // may fail half-way: the panic closes the connection
	if !fa.WaitClosed() {
		t.Fatal("connection with a panicking backend not closed")
	}
	fb := started(t, pathB, vhostusertest.StartOptions{})
	echo(t, fb, 0, 64, false)
}

func shmemEnv(t *testing.T) (*env, string) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{shmem: []uint64{1 << 20}} })
	return e, path
}

func TestShmemMapRefusedBeforeStart(t *testing.T) {
	e, path := shmemEnv(t)
	f := dial(t, path, newMem(t))
	if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
		t.Fatal(err)
	}
	memfd, _ := unix.MemfdCreate("dmb", unix.MFD_CLOEXEC)
	defer unix.Close(memfd)
	unix.Ftruncate(memfd, 4096)
	dev := e.srv.Guest("vm")
	if err := dev.ShmemMap(0, memfd, 0, 0, 4096, true); !errors.Is(err, vhostuser.ErrNotStarted) {
		t.Fatalf("ShmemMap before start: %v", err)
	}
	if err := f.Start(vhostusertest.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.SetStatus(0); err != nil {
		t.Fatal(err)
	}
	if err := dev.ShmemMap(0, memfd, 0, 0, 4096, true); !errors.Is(err, vhostuser.ErrNotStarted) {
		t.Fatalf("ShmemMap after reset: %v", err)
	}
	if n := len(f.ShmemRequests()); n != 0 {
		t.Fatalf("%d back-end requests reached the front-end", n)
	}
}

// QEMU changes the memory table (NEED_REPLY) before it answers SHMEM_MAP:
// ADD_MEM_REG with CONFIGURE_MEM_SLOTS (seen with QEMU 11.1.3 in
// TestRealQEMU), SET_MEM_TABLE without. The back-end must serve it while
// it waits.
func TestShmemMapWithInterleavedMemTable(t *testing.T) {
	for _, slots := range []bool{true, false} {
		t.Run(fmt.Sprintf("mem_slots=%v", slots), func(t *testing.T) { testShmemInterleaved(t, slots) })
	}
}

func testShmemInterleaved(t *testing.T, slots bool) {
	e, path := shmemEnv(t)
	mem := newMem(t)
	f := dial(t, path, mem)
	bar, err := vhostusertest.NewGuestMemory(1<<40, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer bar.Close()
	// This test's hook is the table change (a region of its own, before
	// the reply); the front-end must not add the mapping's region too.
	f.HideShmemMaps = true
	defer func(d time.Duration) { vhostuser.MapVisibleTimeout = d }(vhostuser.MapVisibleTimeout)
	vhostuser.MapVisibleTimeout = 50 * time.Millisecond
	f.BeforeShmemReply = func(f *vhostusertest.Frontend, r vhostusertest.ShmemRequest) error {
		switch {
		case slots && r.Request == vhostuser.BackendReqShmemMap:
			return f.AddMemReg(bar.Regions[0])
		case slots:
			return f.RemMemReg(bar.Regions[0])
		case r.Request == vhostuser.BackendReqShmemMap:
			return f.SetMemTable(bar.Regions[0])
		}
		return f.SetMemTable()
	}
	mask := ^uint64(0)
	if !slots {
		mask &^= 1 << vhostuser.ProtocolConfigureMemSlots
	}
	if err := f.Handshake(vhostusertest.HandshakeOptions{ProtocolMask: mask}); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(vhostusertest.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	dev := e.srv.Guest("vm")
	memfd, _ := unix.MemfdCreate("dmb", unix.MFD_CLOEXEC)
	defer unix.Close(memfd)
	unix.Ftruncate(memfd, 1<<16)
	if err := dev.ShmemMap(0, memfd, 0, 4096, 1<<16, true); err != nil {
		t.Fatal("ShmemMap:", err)
	}
	var regions int
	dev.WithMemoryLock(func() { regions = len(dev.Memory().Regions()) })
	if regions != 3 {
		t.Errorf("%d regions after the interleaved SET_MEM_TABLE, want 3", regions)
	}
	echo(t, f, 0, 64, false) // rings re-translated in the new table
	if err := dev.ShmemUnmap(0, 4096, 1<<16); err != nil {
		t.Fatal("ShmemUnmap:", err)
	}
	dev.WithMemoryLock(func() { regions = len(dev.Memory().Regions()) })
	if regions != 2 {
		t.Errorf("%d regions after SHMEM_UNMAP, want 2", regions)
	}
	echo(t, f, 0, 64, false)
	reqs := f.ShmemRequests()
	if len(reqs) != 2 {
		t.Fatalf("%d requests", len(reqs))
	}
	m, u := reqs[0], reqs[1]
	if m.Request != vhostuser.BackendReqShmemMap || !m.HadFD || !m.NeedReply || m.ShmOffset != 4096 || m.Len != 1<<16 || m.Flags != 1 {
		t.Errorf("map %+v", m)
	}
	if u.Request != vhostuser.BackendReqShmemUnmap || u.HadFD || u.ShmOffset != 4096 || u.Len != 1<<16 {
		t.Errorf("unmap %+v", u)
	}
	if err := dev.ShmemMap(0, memfd, 0, 1<<20-4096, 8192, true); err == nil {
		t.Error("map beyond the region accepted")
	}
}

// BenchmarkEchoServer measures 64-byte requests end to end through a
// Server: the frontend publishes batches of 64 chains and kicks once, the
// queue goroutine echoes them, the frontend waits for the call eventfd.
// ns/op is per request, including eventfd round trips and both sides.
func BenchmarkEchoServer(b *testing.B) {
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	srv := vhostuser.NewServer(logrus.NewEntry(log))
	path := filepath.Join(b.TempDir(), "vm.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		srv.Serve(ctx, "vm", ln, func(string) (vhostuser.Backend, error) { return &echoBackend{}, nil })
		close(done)
	}()
	defer func() { cancel(); <-done }()
	mem, err := vhostusertest.NewGuestMemory(0x10000, 4<<20)
	if err != nil {
		b.Fatal(err)
	}
	defer mem.Close()
	f, err := vhostusertest.Dial(path, mem)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
		b.Fatal(err)
	}
	if err := f.Start(vhostusertest.StartOptions{QueueSize: 256}); err != nil {
		b.Fatal(err)
	}
	q := f.Queues[0]
	const batch = 64
	heads := make([]uint16, batch)
	for i := range heads {
		in, _, _ := mem.Alloc(64, 64)
		out, _, _ := mem.Alloc(16, 16)
		heads[i] = q.AddChain([]vhostusertest.Buf{{GPA: in, Len: 64}, {GPA: out, Len: 16, Write: true}})
	}
	b.ReportAllocs()
	b.SetBytes(64)
	b.ResetTimer()
	for n := 0; n < b.N; n += batch {
		k := min(batch, b.N-n)
		q.Publish(heads[:k]...)
		q.Kick()
		for got := 0; got < k; {
			if _, ok := q.PollUsed(); ok {
				got++
				continue
			}
			if _, err := q.WaitCall(vhostusertest.Timeout); err != nil {
				b.Fatal(err)
			}
		}
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip(err)
	}
	return len(ents)
}

// After connections come and go and Serve returns, no goroutine, fd or
// mapping of theirs is left.
func TestNoLeaks(t *testing.T) {
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	srv := vhostuser.NewServer(logrus.NewEntry(log))
	mem := newMem(t)
	goroutines, fds := runtime.NumGoroutine(), openFDs(t)

	path := filepath.Join(t.TempDir(), "vm.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		done <- srv.Serve(ctx, "vm", ln, func(string) (vhostuser.Backend, error) {
			return &echoBackend{shmem: []uint64{1 << 20}}, nil
		})
	}()
	for i := 0; i < 3; i++ {
		f, err := vhostusertest.Dial(path, mem)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := f.Start(vhostusertest.StartOptions{}); err != nil {
			t.Fatal(err)
		}
		echo(t, f, 0, 64, false)
		echo(t, f, 1, 64, true)
		f.Close()
	}
	// The last connection is still open on the server side when Serve is
	// cancelled: cancellation must tear it down too.
	f, err := vhostusertest.Dial(path, mem)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(vhostusertest.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Serve returned %v", err)
	}
	f.Close()
	deadline := time.Now().Add(vhostusertest.Timeout)
	for runtime.NumGoroutine() > goroutines || openFDs(t) > fds {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("goroutines %d (was %d), fds %d (was %d)\n%s", runtime.NumGoroutine(), goroutines,
				openFDs(t), fds, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(time.Millisecond)
	}
}

// Queue.Wake makes the queue goroutine call HandleQueue again without a
// kick from the driver.
func TestWake(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
	b := e.backends("vm")[0]
	before := b.calls.Load()
	e.srv.Guest("vm").Queue(0).Wake()
	deadline := time.Now().Add(vhostusertest.Timeout)
	for b.calls.Load() == before {
		if time.Now().After(deadline) {
			t.Fatal("Wake did not run HandleQueue")
		}
		time.Sleep(time.Millisecond)
	}
}

// RESET_DEVICE stops the device and forgets the rings and their fds; a new
// start sequence brings it back.
func TestResetDevice(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
	dev := e.srv.Guest("vm")
	if _, err := f.Request(vhostuser.ReqResetDevice, nil, nil, true); err != nil {
		t.Fatal(err)
	}
	var ready bool
	dev.WithMemoryLock(func() { ready = dev.Queue(0).Ready() })
	if dev.Started() || ready || e.backends("vm")[0].stopped.Load() != 1 {
		t.Fatal("RESET_DEVICE did not stop the device and its rings")
	}
	for _, q := range f.Queues {
		q.Reset()
	}
	if err := f.Start(vhostusertest.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	echo(t, f, 0, 64, false)
	echo(t, f, 1, 64, false)
}

// A memory table changed region by region (the rings' region removed and
// added back) does not stop the device: Stop would drop device state.
func TestMemTableChangeKeepsDeviceStarted(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)
	dev := e.srv.Guest("vm")
	if err := f.RemMemReg(f.Mem.Regions[0]); err != nil {
		t.Fatal(err)
	}
	var ready bool
	dev.WithMemoryLock(func() { ready = dev.Queue(0).Ready() })
	if ready || !dev.Started() {
		t.Fatalf("rings without memory: ready %v started %v", ready, dev.Started())
	}
	if err := f.AddMemReg(f.Mem.Regions[0]); err != nil {
		t.Fatal(err)
	}
	echo(t, f, 0, 64, false)
	if b := e.backends("vm")[0]; b.stopped.Load() != 0 || b.started.Load() != 1 {
		t.Errorf("started %d stopped %d", b.started.Load(), b.stopped.Load())
	}
}

// crossBackend copies each request's readable bytes into another VM's guest
// memory (as an ISM MOVE does) from its own queue goroutine.
type crossBackend struct {
	echoBackend
	srv    *vhostuser.Server
	target string
	gpa    uint64
	copies atomic.Int64
	misses atomic.Int64
}

func (b *crossBackend) HandleQueue(dev *vhostuser.Guest, q *vhostuser.Queue) {
	c, buf := &b.chain[q.Index()], b.buf[q.Index()][:]
	for {
		ok, err := q.Next(c)
		if err != nil {
			continue
		}
		if !ok {
			break
		}
		rd := c.Reader()
		n, _ := rd.Read(buf)
		if peer := b.srv.Guest(b.target); peer != nil {
			mem := peer.AcquireMemory()
			if dst, err := mem.Bytes(b.gpa, uint64(n)); err == nil {
				// Slowly, yielding: a table change that unmapped the
				// old region before this reference is released would
				// unmap dst under the copy.
				for i := range dst {
					dst[i] = buf[i]
					runtime.Gosched()
				}
				b.copies.Add(1)
			} else {
				b.misses.Add(1)
			}
			mem.Release()
		}
		q.Push(c, 0)
	}
	q.Notify()
}

// One VM's queue goroutine writes into another VM's memory while that VM's
// memory table keeps changing (the target region removed, unmapped and
// mapped again). The shared memory lock must keep every copy inside a live
// mapping: a copy into an unmapped region would crash the test binary.
func TestCrossVMCopyDuringMemTableChanges(t *testing.T) {
	e := newEnv(t)
	const target = 1<<20 + 0x10000 + 4096 // in region 1 of b's guest RAM
	var cb *crossBackend
	pathA := e.serve(context.Background(), "a", func() *echoBackend { return &echoBackend{} })
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(e.dir, "x.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	serveDone := make(chan struct{})
	go func() {
		defer close(serveDone)
		e.srv.Serve(ctx, "x", ln, func(string) (vhostuser.Backend, error) {
			cb = &crossBackend{srv: e.srv, target: "a", gpa: target}
			return cb, nil
		})
	}()
	defer func() { cancel(); <-serveDone }()
	fa := started(t, pathA, vhostusertest.StartOptions{})
	fx := started(t, filepath.Join(e.dir, "x.sock"), vhostusertest.StartOptions{})

	stop := make(chan struct{})
	churn := make(chan error, 1)
	go func() {
		r := fa.Mem.Regions[1]
		for i := 0; ; i++ {
			select {
			case <-stop:
				churn <- nil
				return
			default:
			}
			if err := fa.RemMemReg(r); err != nil {
				churn <- err
				return
			}
			if err := fa.AddMemReg(r); err != nil {
				churn <- err
				return
			}
		}
	}()
	q := fx.Queues[0]
	in, inHost, _ := fx.Mem.Alloc(64, 8)
	copy(inHost, "from x to a")
	for i := 0; i < 2000; i++ {
		q.Publish(q.AddChain([]vhostusertest.Buf{{GPA: in, Len: 64}}))
		q.Kick()
		if _, err := q.WaitUsed(); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	if err := <-churn; err != nil {
		t.Fatal(err)
	}
	got, _ := fa.Mem.Read(target, 11)
	t.Logf("copies %d, misses (region absent) %d", cb.copies.Load(), cb.misses.Load())
	if cb.copies.Load() == 0 || string(got) != "from x to a" {
		t.Fatalf("no copy reached VM a: %q", got)
	}
}

// A front-end that shrinks guest RAM under a started device makes the
// device's next access fault: that connection closes, the process and the
// other VMs go on.
func TestShrunkGuestMemoryClosesOnlyThatConnection(t *testing.T) {
	e := newEnv(t)
	pathA := e.serve(context.Background(), "a", func() *echoBackend { return &echoBackend{} })
	pathB := e.serve(context.Background(), "b", func() *echoBackend { return &echoBackend{} })
	fa := started(t, pathA, vhostusertest.StartOptions{})
	fb := started(t, pathB, vhostusertest.StartOptions{})
	q := fa.Queues[0]
	// Buffers in region 1; the rings stay in region 0.
	r1 := fa.Mem.Regions[1]
	in, out := r1.GPA+0x1000, r1.GPA+0x2000
	q.Publish(q.AddChain([]vhostusertest.Buf{{GPA: in, Len: 64}, {GPA: out, Len: 64, Write: true}}))
	if err := unix.Ftruncate(r1.FD, 0); err != nil {
		t.Fatal(err)
	}
	q.Kick()
	if !fa.WaitClosed() {
		t.Fatal("connection not closed after the fault")
	}
	echo(t, fb, 0, 64, false)
}

// QEMU 11.1.3 answers SHMEM_MAP before it commits the mapping into the
// guest's address space (the ADD_MEM_REG of the mapping follows the reply),
// as the test front-end does. ShmemMap returns only once the memory table
// shows the mapping, so that the guest, told at once, finds its memory there.
func TestShmemMapWaitsUntilVisible(t *testing.T) {
	e, path := shmemEnv(t)
	f := dial(t, path, newMem(t))
	if err := f.Handshake(vhostusertest.HandshakeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(vhostusertest.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	dev := e.srv.Guest("vm")
	var base int
	dev.WithMemoryLock(func() { base = len(dev.Memory().Regions()) })
	for i := range 16 { // the region is 1 MiB
		memfd, _ := unix.MemfdCreate("dmb", unix.MFD_CLOEXEC)
		unix.Ftruncate(memfd, 1<<16)
		if err := dev.ShmemMap(0, memfd, 0, uint64(i)<<16, 1<<16, true); err != nil {
			t.Fatal("ShmemMap:", err)
		}
		unix.Close(memfd)
		var n int
		dev.WithMemoryLock(func() { n = len(dev.Memory().Regions()) })
		if n != base+i+1 {
			t.Fatalf("map %d: ShmemMap returned with %d regions in the table, want %d", i, n, base+i+1)
		}
	}
}
