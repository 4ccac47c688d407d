package ismvirtio

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
	fe "github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// fabricServer is one backend: a fabric, a vhost-user Server and a socket per VM.
type fabricServer struct {
	t      testing.TB
	fabric *ism.Fabric
	server *vhostuser.Server
	dir    string
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newFabricServer(t testing.TB, vms map[string]uint64) *fabricServer {
	t.Helper()
	return newWrappedFabricServer(t, vms, nil)
}

// newWrappedFabricServer is newFabricServer with each VM's Backend passed
// through wrap (nil: none), for tests that watch the Backend's calls.
func newWrappedFabricServer(t testing.TB, vms map[string]uint64, wrap func(*Backend) vhostuser.Backend) *fabricServer {
	t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	if testing.Verbose() {
		log.SetLevel(logrus.DebugLevel)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &fabricServer{
		t:      t,
		fabric: ism.NewFabric(abi.DefaultCHID, logrus.NewEntry(log)),
		server: vhostuser.NewServer(logrus.NewEntry(log)),
		dir:    t.TempDir(),
		cancel: cancel,
	}
	for name, gid := range vms {
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.socket(name), Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.server.Serve(ctx, name, ln, func(name string) (vhostuser.Backend, error) {
				b := New(s.fabric, name, gid, log.WithField("vm", name))
				if wrap != nil {
					return wrap(b), nil
				}
				return b, nil
			})
		}()
	}
	t.Cleanup(func() { cancel(); s.wg.Wait() })
	return s
}

func (s *fabricServer) socket(name string) string { return filepath.Join(s.dir, name+".sock") }

// guest plays one VM: QEMU (the frontend) plus a minimal driver of the ISM
// ABI that issues one request at a time.
type guest struct {
	t    testing.TB
	name string
	fe   *fe.Frontend
	mem  *fe.GuestMemory
	req  *fe.VQ
	ev   *fe.VQ
	cfg  abi.Config

	// One request slot, reused: header, data, response.
	hdrGPA, dataGPA, respGPA uint64
	hdr, data, resp          []byte
}

const guestDataSize = 256 << 10

// connect starts VM name against s with RAM in two regions, so buffers can
// cross a region boundary.
func (s *fabricServer) connect(name string) *guest { return s.connectQueueSize(name, 256) }

// connectQueueSize is connect with queues of qsize entries.
func (s *fabricServer) connectQueueSize(name string, qsize uint16) *guest {
	t := s.t
	t.Helper()
	mem, err := fe.NewGuestMemory(0, 4<<20, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mem.Close)
	g := &guest{t: t, name: name, mem: mem}
	g.start(s.socket(name), qsize)
	if g.hdrGPA, g.hdr, err = mem.Alloc(abi.RequestSize, 8); err != nil {
		t.Fatal(err)
	}
	if g.dataGPA, g.data, err = mem.Alloc(guestDataSize, 4096); err != nil {
		t.Fatal(err)
	}
	if g.respGPA, g.resp, err = mem.Alloc(abi.ResponseSize, 8); err != nil {
		t.Fatal(err)
	}
	return g
}

func (g *guest) start(socket string, qsize uint16) {
	t := g.t
	t.Helper()
	f, err := fe.Dial(socket, g.mem)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	if err := f.Handshake(fe.HandshakeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(fe.StartOptions{QueueSize: qsize}); err != nil {
		t.Fatal(err)
	}
	g.fe, g.req, g.ev = f, f.Queues[abi.RequestQueue], f.Queues[abi.EventQueue]
	raw, err := f.GetConfig(0, abi.ConfigSize)
	if err != nil {
		t.Fatal(err)
	}
	if g.cfg, err = abi.DecodeConfig(raw); err != nil {
		t.Fatal(err)
	}
}

// do sends one request with data (copied into the data slot) and waits for
// its response. It fails the test if the device returned no response.
func (g *guest) do(r abi.Request, data []byte) abi.Response {
	g.t.Helper()
	resp, n := g.doRaw(r, data)
	if n != abi.ResponseSize {
		g.t.Fatalf("%s %v: used len %d, want %d", g.name, r.Op, n, abi.ResponseSize)
	}
	return resp
}

func (g *guest) doRaw(r abi.Request, data []byte) (abi.Response, uint32) {
	g.t.Helper()
	r.Encode(g.hdr)
	clear(g.resp)
	bufs := []fe.Buf{{GPA: g.hdrGPA, Len: abi.RequestSize}}
	if len(data) > 0 {
		copy(g.data, data)
		bufs = append(bufs, fe.Buf{GPA: g.dataGPA, Len: uint32(len(data))})
	}
	bufs = append(bufs, fe.Buf{GPA: g.respGPA, Len: abi.ResponseSize, Write: true})
	return g.submit(g.req.AddChain(bufs))
}

// submit publishes a hand-built chain, kicks and waits for its completion.
func (g *guest) submit(head uint16) (abi.Response, uint32) {
	g.t.Helper()
	g.req.Publish(head)
	if err := g.req.Kick(); err != nil {
		g.t.Fatal(err)
	}
	u, err := g.req.WaitUsed()
	if err != nil {
		g.t.Fatalf("%s: %v", g.name, err)
	}
	if u.ID != head {
		g.t.Fatalf("%s: used id %d, want %d", g.name, u.ID, head)
	}
	resp, _ := abi.DecodeResponse(g.resp)
	return resp, u.Len
}

func (g *guest) setSBA() []byte {
	g.t.Helper()
	gpa, sba, err := g.mem.Alloc(abi.SBASize, 4096)
	if err != nil {
		g.t.Fatal(err)
	}
	if r := g.do(abi.Request{Op: abi.OpSetSBA, Addr: gpa}, nil); r.Status != abi.StatusOK {
		g.t.Fatalf("SET_SBA: %v", r.Status)
	}
	return sba
}

// register makes a DMB of size bytes for rgid at DMB index idx.
func (g *guest) register(size uint64, rgid uint64, idx uint32) (token uint64, dmb []byte) {
	g.t.Helper()
	gpa, dmb, err := g.mem.Alloc(size, 4096)
	if err != nil {
		g.t.Fatal(err)
	}
	r := g.do(abi.Request{Op: abi.OpRegisterDMB, Addr: gpa, Len: size, GID: rgid, Index: idx}, nil)
	if r.Status != abi.StatusOK || r.Value == 0 {
		g.t.Fatalf("REGISTER_DMB: %v token %#x", r.Status, r.Value)
	}
	return r.Value, dmb
}

func (g *guest) move(token uint64, offset uint64, data []byte, signal bool) abi.Status {
	g.t.Helper()
	r := abi.Request{Op: abi.OpMove, Token: token, Offset: offset, Len: uint64(len(data))}
	if signal {
		r.Flags = abi.FlagSignal
	}
	return g.do(r, data).Status
}

// postEventBuffer offers the device one event buffer and returns its view.
func (g *guest) postEventBuffer() (head uint16, buf []byte) {
	g.t.Helper()
	gpa, buf, err := g.mem.Alloc(abi.EventSize, 8)
	if err != nil {
		g.t.Fatal(err)
	}
	head = g.ev.AddChain([]fe.Buf{{GPA: gpa, Len: abi.EventSize, Write: true}})
	g.ev.Publish(head)
	if err := g.ev.Kick(); err != nil {
		g.t.Fatal(err)
	}
	return head, buf
}

func (g *guest) waitEvent(buf []byte) abi.Event {
	g.t.Helper()
	u, err := g.ev.WaitUsed()
	if err != nil {
		g.t.Fatalf("%s: waiting for an event: %v", g.name, err)
	}
	if u.Len != abi.EventSize {
		g.t.Fatalf("%s: event used len %d", g.name, u.Len)
	}
	ev, _ := abi.DecodeEvent(buf)
	return ev
}

// sbaSeq and sbaDMBE read an SBA's counters by their documented offsets.
func sbaSeq(sba []byte, idx uint32) uint32 {
	return binary.LittleEndian.Uint32(sba[abi.SBASeqOffset+4*idx:])
}

func sbaDMBE(sba []byte, idx, e uint32) uint16 {
	return binary.LittleEndian.Uint16(sba[abi.SBADMBEOffset+64*idx+2*e:])
}

func name(i int) string { return fmt.Sprintf("vm%d", i) }
