package guestdriver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/pci"
	"github.com/ism-backend/ism-backend/virtq/virtqtest"
)

// The tests run the driver against a fake ISM device that reads the rings
// and the SBA only through guest-physical addresses, as the real backend
// does, with heap memory standing in for huge pages.

const fakeBase = 0x7_0000_0000

type guestMem struct {
	mu    sync.Mutex
	pages [][]byte
}

func (g *guestMem) page() ([]byte, uint64, error) {
	p := unsafe.Slice((*byte)(unsafe.Pointer(&make([]uint64, pci.HugePageSize/8)[0])), pci.HugePageSize)
	g.mu.Lock()
	defer g.mu.Unlock()
	g.pages = append(g.pages, p)
	return p, fakeBase + uint64(len(g.pages)-1)*pci.HugePageSize, nil
}

// at returns guest memory [gpa, gpa+n), or nil when outside it.
func (g *guestMem) at(gpa, n uint64) []byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	if gpa < fakeBase || n > pci.HugePageSize {
		return nil
	}
	i := (gpa - fakeBase) / pci.HugePageSize
	o := (gpa - fakeBase) % pci.HugePageSize
	if i >= uint64(len(g.pages)) || o+n > pci.HugePageSize {
		return nil
	}
	return g.pages[i][o : o+n]
}

type fakeDMB struct {
	index uint32
	mem   []byte
	rgid  uint64
}

// fakeISM is one device on a one-device fabric: its GID is the only
// sender, so MOVEs into DMBs with rgid == gid are allowed.
type fakeISM struct {
	g         *guestMem
	gid       uint64
	req, ev   *virtqtest.Device
	sba       uint64
	dmbs      map[uint64]*fakeDMB
	nextTok   uint64
	events    []abi.Event
	evChains  []*virtqtest.Chain
	tamper    func(r abi.Request, resp []byte, n *uint32)  // hostile hooks
	attach    func(r abi.Request, resp *abi.Response) bool // attach-mode requests (attach_test.go)
	served    atomic.Int64
	stop      chan struct{}
	stopped   chan struct{}
	serveLock sync.Mutex
}

func (f *fakeISM) handle(c *virtqtest.Chain) uint32 {
	r, err := abi.DecodeRequest(c.In)
	if err != nil || len(c.Outs) == 0 || len(c.Outs[len(c.Outs)-1]) < abi.ResponseSize {
		return 0
	}
	data := c.In[abi.RequestSize:]
	resp := abi.Response{}
	if f.attach != nil && f.attach(r, &resp) {
		r.Op = 0 // handled
	}
	switch r.Op {
	case 0:
	case abi.OpSetSBA:
		f.sba = r.Addr
	case abi.OpRegisterDMB:
		mem := f.g.at(r.Addr, r.Len)
		if mem == nil {
			resp.Status = abi.StatusFault
			break
		}
		f.nextTok += 0x1001
		f.dmbs[f.nextTok] = &fakeDMB{index: r.Index, mem: mem, rgid: r.GID}
		resp.Index, resp.Value = r.Index, f.nextTok
	case abi.OpUnregisterDMB:
		if f.dmbs[r.Token] == nil {
			resp.Status = abi.StatusNoEntry
		}
		delete(f.dmbs, r.Token)
	case abi.OpMove:
		m := f.dmbs[r.Token]
		switch {
		case uint64(len(data)) != r.Len:
			resp.Status = abi.StatusInvalid
		case m == nil:
			resp.Status = abi.StatusNoEntry
		case m.rgid != f.gid:
			resp.Status = abi.StatusPermission
		case r.Offset+r.Len > uint64(len(m.mem)) || r.Index >= 32:
			resp.Status = abi.StatusRange
		default:
			copy(m.mem[r.Offset:], data)
			if r.Flags&abi.FlagSignal != 0 {
				sba, err := abi.NewSBA(f.g.at(f.sba, abi.SBASize))
				if err != nil {
					panic(err)
				}
				sba.Signal(m.index, r.Index)
			}
		}
	case abi.OpSignal:
		f.events = append(f.events, abi.Event{Type: abi.EventSWR, Code: uint16(r.Index), GID: f.gid, Info: r.Offset})
	case abi.OpQueryRGID:
		if r.GID != f.gid {
			resp.Status = abi.StatusNoEntry
		}
	default:
		resp.Status = abi.StatusUnsupported
	}
	out := c.Outs[len(c.Outs)-1]
	resp.Encode(out)
	n := uint32(abi.ResponseSize)
	if f.tamper != nil {
		f.tamper(r, out, &n)
	}
	return n
}

func (f *fakeISM) run() {
	defer close(f.stopped)
	for {
		select {
		case <-f.stop:
			return
		default:
		}
		busy := false
		f.serveLock.Lock()
		for {
			c, ok := f.req.Next()
			if !ok {
				break
			}
			busy = true
			f.req.Push(uint32(c.Head), f.handle(c))
			f.served.Add(1)
		}
		for {
			c, ok := f.ev.Next()
			if !ok {
				break
			}
			f.evChains = append(f.evChains, c)
		}
		for len(f.events) > 0 && len(f.evChains) > 0 {
			busy = true
			c := f.evChains[0]
			f.evChains = f.evChains[1:]
			f.events[0].Encode(c.Outs[0])
			f.events = f.events[1:]
			f.ev.Push(uint32(c.Head), abi.EventSize)
		}
		f.serveLock.Unlock()
		if !busy {
			time.Sleep(20 * time.Microsecond)
		}
	}
}

// newFake builds a Driver wired to a fake device, started and with the SBA
// set.
func newFake(t *testing.T, qsize uint16, tamper func(abi.Request, []byte, *uint32)) (*Driver, *fakeISM) {
	t.Helper()
	g := &guestMem{}
	alloc := pci.NewAllocator(g.page, nil, 16)
	f := &fakeISM{g: g, gid: 0xabcdef, dmbs: map[uint64]*fakeDMB{}, tamper: tamper, stop: make(chan struct{}), stopped: make(chan struct{})}
	cfg := abi.Config{Magic: abi.Magic, Version: abi.Version, Modes: abi.ModeCopy, GID: f.gid, CHID: abi.DefaultCHID,
		MaxDMBs: abi.MaxDMBs, MaxDMBSize: abi.MaxDMBSize, MaxMoveLen: 64 << 10, QueueSize: qsize}
	d := &Driver{opts: Options{Timeout: 10 * time.Second, Logf: t.Logf}, cfg: cfg, alloc: alloc, maxDMBs: cfg.MaxDMBs}
	mkq := func(idx uint16) (*pci.Queue, *virtqtest.Device) {
		mem, err := alloc.Alloc(pci.QueueMemSize(int(qsize)), 4096)
		if err != nil {
			t.Fatal(err)
		}
		q, err := pci.NewQueue(idx, qsize, mem, idx == 0, func() {})
		if err != nil {
			t.Fatal(err)
		}
		return q, virtqtest.New(q.Ring, func(a uint64, n uint32) []byte { return g.at(a, uint64(n)) })
	}
	d.reqQ, f.req = mkq(0)
	d.evQ, f.ev = mkq(1)
	var err error
	n := int(qsize)
	if d.slots, err = alloc.Alloc(n*slotSize, 64); err != nil {
		t.Fatal(err)
	}
	for i := n - 1; i >= 0; i-- {
		d.freeSlots = append(d.freeSlots, i)
	}
	d.pending = make([]*waiter, n)
	if err := d.allocSBA(); err != nil {
		t.Fatal(err)
	}
	nev := min(16, n)
	if d.evBufs, err = alloc.Alloc(nev*abi.EventSize, 64); err != nil {
		t.Fatal(err)
	}
	go f.run()
	if err := d.start(nev); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Close()
		close(f.stop)
		<-f.stopped
	})
	if f.sba != d.sba.GPA() {
		t.Fatalf("SET_SBA gave %#x, want %#x", f.sba, d.sba.GPA())
	}
	return d, f
}

func TestRegisterMoveSignal(t *testing.T) {
	d, _ := newFake(t, 64, nil)
	m, err := d.RegisterDMB(8192, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	if m.Token() == 0 {
		t.Fatal("token 0")
	}
	buf, err := d.AllocBuffer(4096)
	if err != nil {
		t.Fatal(err)
	}
	copy(buf.Bytes()[100:], "payload")
	if err := d.Move(m.Token(), 5, true, 1000, buf, 100, 7); err != nil {
		t.Fatal(err)
	}
	<-m.Signalled() // the poller must see the SBA counter move; the test times out otherwise
	if got := m.TakeDMBEs(); got != 1<<5 {
		t.Fatalf("DMBE bits %#x, want bit 5", got)
	}
	if !bytes.Equal(m.Bytes()[1000:1007], []byte("payload")) {
		t.Fatalf("DMB holds %q", m.Bytes()[1000:1007])
	}
	// Statuses come back as abi.Status errors.
	for name, c := range map[string]struct {
		err  error
		want abi.Status
	}{
		"forged": {d.Move(m.Token()^0xffff, 0, false, 0, buf, 0, 8), abi.StatusNoEntry},
		"range":  {d.Move(m.Token(), 0, false, 8190, buf, 0, 8), abi.StatusRange},
		"query":  {d.QueryRGID(12345), abi.StatusNoEntry},
		"dmbe":   {d.Move(m.Token(), 32, false, 0, buf, 0, 8), abi.StatusRange},
		"srcoff": {d.Move(m.Token(), 0, false, 0, buf, 4090, 8), abi.StatusRange},
		"toobig": {d.Move(m.Token(), 0, false, 0, buf, 0, 64<<10+1), abi.StatusRange},
	} {
		var st abi.Status
		if !errors.As(c.err, &st) || st != c.want {
			t.Errorf("%s: %v, want %v", name, c.err, c.want)
		}
	}
	if err := d.QueryRGID(d.GID()); err != nil {
		t.Fatal(err)
	}
	other, err := d.RegisterDMB(4096, 777)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Move(other.Token(), 0, true, 0, buf, 0, 4); !errors.Is(err, abi.StatusPermission) {
		t.Fatalf("wrong rgid: %v", err)
	}
	if other.Index() == m.Index() {
		t.Fatal("two DMBs share an index")
	}
	if err := d.Signal(d.GID(), 9, 0x55); err != nil {
		t.Fatal(err)
	}
	ev := <-d.Events()
	if ev.Type != abi.EventSWR || ev.Code != 9 || ev.Info != 0x55 {
		t.Fatalf("event %+v", ev)
	}
	if err := d.UnregisterDMB(m); err != nil {
		t.Fatal(err)
	}
	if err := d.Move(m.Token(), 0, false, 0, buf, 0, 8); !errors.Is(err, abi.StatusNoEntry) {
		t.Fatalf("dead token: %v", err)
	}
	if err := d.UnregisterDMB(m); err == nil {
		t.Fatal("second unregister succeeded")
	}
	buf.Free()
	buf.Free() // idempotent
}

// Many goroutines with requests in flight on a small ring: every MOVE lands
// in its own place and every signal is seen.
func TestConcurrentMoves(t *testing.T) {
	d, f := newFake(t, 16, nil)
	const workers, moves = 32, 40
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, err := d.RegisterDMB(4096, d.GID())
			if err != nil {
				errs <- err
				return
			}
			buf, err := d.AllocBuffer(64)
			if err != nil {
				errs <- err
				return
			}
			for i := 0; i < moves; i++ {
				s := fmt.Sprintf("w%02d-m%03d", w, i)
				copy(buf.Bytes(), s)
				if err := d.Move(m.Token(), uint32(i%32), true, uint32(8*i), buf, 0, 8); err != nil {
					errs <- err
					return
				}
				<-m.Signalled()
				m.TakeDMBEs()
				if got := string(m.Bytes()[8*i : 8*i+8]); got != s[:8] {
					errs <- fmt.Errorf("worker %d move %d: DMB holds %q", w, i, got)
					return
				}
			}
			buf.Free()
			if err := d.UnregisterDMB(m); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := f.served.Load(); n < workers*(moves+2) {
		t.Errorf("device served %d requests", n)
	}
}

func TestHostileResponses(t *testing.T) {
	for name, c := range map[string]struct {
		tamper func(abi.Request, []byte, *uint32)
		check  func(error) bool
	}{
		"unknown status": {
			func(r abi.Request, b []byte, n *uint32) {
				if r.Op == abi.OpQueryRGID {
					binary.LittleEndian.PutUint32(b, 99)
				}
			},
			func(err error) bool { return errors.Is(err, ErrBroken) },
		},
		"malformed": {
			func(r abi.Request, b []byte, n *uint32) {
				if r.Op == abi.OpQueryRGID {
					*n = 0
				}
			},
			func(err error) bool { return errors.Is(err, abi.StatusInvalid) },
		},
		"short response": {
			func(r abi.Request, b []byte, n *uint32) {
				if r.Op == abi.OpQueryRGID {
					*n = 8
				}
			},
			func(err error) bool { return errors.Is(err, ErrBroken) },
		},
	} {
		t.Run(name, func(t *testing.T) {
			d, _ := newFake(t, 8, c.tamper)
			if err := d.QueryRGID(d.GID()); !c.check(err) {
				t.Fatalf("got %v", err)
			}
		})
	}
	// A register answer with token 0 or another index is refused.
	d, _ := newFake(t, 8, func(r abi.Request, b []byte, n *uint32) {
		if r.Op == abi.OpRegisterDMB {
			binary.LittleEndian.PutUint32(b[4:], r.Index+1)
		}
	})
	if _, err := d.RegisterDMB(4096, 1); !errors.Is(err, ErrBroken) {
		t.Fatalf("register with a wrong index echoed: %v", err)
	}
}

// A device that completes a chain it was never given breaks the driver for
// good: later calls fail with the reason instead of trusting the ring.
func TestUsedIdxJump(t *testing.T) {
	d, f := newFake(t, 8, nil)
	f.serveLock.Lock()
	f.req.SetUsed(f.req.UsedIdx + 5)
	f.serveLock.Unlock()
	if err := d.QueryRGID(d.GID()); !errors.Is(err, ErrBroken) {
		t.Fatalf("got %v", err)
	}
	if _, err := d.RegisterDMB(4096, 1); !errors.Is(err, ErrBroken) {
		t.Fatalf("after breakage: %v", err)
	}
}

func TestCloseFailsLaterCalls(t *testing.T) {
	d, _ := newFake(t, 8, nil)
	m, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.QueryRGID(d.GID()); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
	if err := d.UnregisterDMB(m); err == nil {
		t.Fatal("unregister after close succeeded")
	}
	if _, ok := <-d.Events(); ok {
		t.Fatal("events channel still open")
	}
}

// More events than posted buffers: the poller must hand each back to the
// device, so all arrive, in order.
func TestEventsRepost(t *testing.T) {
	d, _ := newFake(t, 8, nil) // 8 event buffers
	const n = 100
	sent := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			if err := d.Signal(d.GID(), 3, uint64(i)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	for i := 0; i < n; i++ {
		ev := <-d.Events()
		if ev.Type != abi.EventSWR || ev.Code != 3 || ev.Info != uint64(i) {
			t.Fatalf("event %d: %+v", i, ev)
		}
	}
	// The last event can arrive before its SIGNAL's reply is harvested:
	// wait for the sender before the driver is closed.
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if d.EventDrops() != 0 {
		t.Fatalf("%d events dropped", d.EventDrops())
	}
}
