package ismvirtio

import (
	"errors"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
)

// Attach mode and the device lock.
//
// A SHMEM_MAP waits for QEMU's reply, and QEMU sends a SET_MEM_TABLE (which
// takes the vhostuser device's lock exclusively) before it replies. The
// request queue's goroutine holds that lock shared in HandleQueue, so it
// must never wait for a map: it would deadlock against that SET_MEM_TABLE. So
// each start of the device has a session with a mapping worker goroutine:
//
//   - An attach-mode REGISTER_DMB or an ATTACH_DMB is taken off the ring by
//     the queue goroutine, which hands the header and the chain's head to
//     the worker and stops taking chains (Backend.async). The worker runs
//     ism.Device.Handle, which blocks in session.Map with no lock held,
//     then, inside Guest.WithMemoryLock, takes the chain again through the
//     current memory table (Queue.Retake: the table may have changed during
//     the map), writes the response, pushes it, and wakes the queue. Only
//     one request is ever with the worker, and chains complete in order, as
//     the ABI says; the queue stalls for one map round trip (well under a
//     millisecond with QEMU).
//   - Unmaps (DETACH_DMB, UNREGISTER_DMB, a peer gone) are queued to the
//     worker from any goroutine and carried out in order after the request
//     it may be serving, so a revoked attach is unmapped after its map.
//   - DETACH_DMB and UNREGISTER_DMB go to the worker too, which carries out
//     every unmap queued so far (the request's own, and revocations of this
//     device's attachments by peers) before it answers. A driver that has
//     closed its connections and then resets the device has no unmap of
//     its region in flight: QEMU 11.1.3 crashed on a SHMEM_UNMAP that met
//     the reset, as it does on a map to a stopped device.
//   - Stop marks the session stopped under the device's lock. From then
//     on the worker sends no SHMEM_MAP/UNMAP (QEMU 11.1.3 crashes on a map
//     to a stopped device, and it dropped the mappings itself), completes
//     no chain (the rings are gone), and exits once idle. Stop does not wait
//     for it: a map in flight may still be waiting for its reply. Mappings
//     are not restored on the next start: the DMBs died with the stop
//     (the device left the fabric) and the peers were told.
type session struct {
	b    *Backend
	vdev *vhostuser.Guest
	dev  *ism.Device // set by Start before the worker runs

	stopped atomic.Bool

	mu      sync.Mutex
	jobs    []func()
	running bool          // a job is being carried out
	idle    *sync.Cond    // on mu: broadcast when a job ends (a handover waits for none in flight)
	wake    chan struct{} // capacity 1: there are jobs, or the session stopped
}

func newSession(b *Backend, vdev *vhostuser.Guest) *session {
	s := &session{b: b, vdev: vdev, wake: make(chan struct{}, 1)}
	s.idle = sync.NewCond(&s.mu)
	return s
}

func (s *session) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *session) enqueue(job func()) {
	s.mu.Lock()
	s.jobs = append(s.jobs, job)
	s.mu.Unlock()
	s.poke()
}

func (s *session) stop() {
	s.stopped.Store(true)
	s.poke()
}

// run is the mapping worker: it carries out jobs in order until the session
// stopped and no job is left.
func (s *session) run() {
	// A job touches guest memory (the response): a fault there (a shrunk
	// memory file) must close this VM's connection, not end the process.
	debug.SetPanicOnFault(true)
	for range s.wake {
		s.drain()
		if s.stopped.Load() {
			s.mu.Lock()
			idle := len(s.jobs) == 0
			s.mu.Unlock()
			if idle {
				return
			}
		}
	}
}

// drain carries out the jobs queued so far, in order. Inside a job it runs
// the unmaps a DETACH or UNREGISTER (or a peer) queued before it answers;
// no request job can be among them, since the queue waits for this one.
func (s *session) drain() {
	for {
		s.mu.Lock()
		if len(s.jobs) == 0 {
			s.mu.Unlock()
			return
		}
		job := s.jobs[0]
		s.jobs[0] = nil
		s.jobs = s.jobs[1:]
		nested := s.running // a request job draining its unmaps
		s.running = true
		s.mu.Unlock()
		s.runJob(job)
		if !nested {
			s.mu.Lock()
			s.running = false
			s.idle.Broadcast()
			s.mu.Unlock()
		}
	}
}

func (s *session) runJob(job func()) {
	defer s.b.closeOnFault(s.vdev, "in the mapping worker")
	job()
}

// Map implements ism.Mapper; it runs on the worker (inside Handle).
func (s *session) Map(fd int, off, size uint64) error {
	if s.stopped.Load() {
		return abi.StatusNotReady
	}
	err := s.vdev.ShmemMap(0, fd, 0, off, size, true)
	if errors.Is(err, vhostuser.ErrNotStarted) {
		return abi.StatusNotReady
	}
	return err
}

// Unmap implements ism.Mapper: queued to the worker, never blocking.
func (s *session) Unmap(off, size uint64, done func(bool)) {
	if s.stopped.Load() {
		done(false)
		return
	}
	s.enqueue(func() {
		if s.stopped.Load() {
			done(false)
			return
		}
		err := s.vdev.ShmemUnmap(0, off, size)
		if err != nil && !errors.Is(err, vhostuser.ErrNotStarted) {
			if e := s.b.lim.Entry(s.b.now(), s.b.log, logrus.WarnLevel); e != nil {
				e.WithError(err).Warn("SHMEM_UNMAP failed")
			}
		}
		done(err == nil)
	})
}

func (b *Backend) asyncBusy() bool {
	b.asyncMu.Lock()
	defer b.asyncMu.Unlock()
	return b.async
}

// waitsForFrontEnd reports whether chain c is a request whose answer waits
// for the front-end (attach-mode REGISTER_DMB and ATTACH_DMB for a map,
// DETACH_DMB and UNREGISTER_DMB for unmaps), and decodes it. A chain that
// cannot be one (short, no room for the response, data after the header)
// is left to serve, which refuses it.
func (b *Backend) waitsForFrontEnd(c *vhostuser.Chain) (abi.Request, bool) {
	if b.sess == nil || c.WritableLen() < abi.ResponseSize || c.ReadableLen() != abi.RequestSize {
		return abi.Request{}, false
	}
	r := &b.rd
	r.Reset(c)
	if n, _ := r.Read(b.hdr[:]); n < abi.RequestSize {
		return abi.Request{}, false
	}
	req, _ := abi.DecodeRequest(b.hdr[:])
	switch {
	case req.Op == abi.OpAttachDMB, req.Op == abi.OpDetachDMB, req.Op == abi.OpUnregisterDMB,
		req.Op == abi.OpRegisterDMB && req.Flags&abi.FlagAttach != 0:
		return req, true
	}
	return abi.Request{}, false
}

// startAsync hands the request of the chain at head to the worker; the
// queue takes no chain until the worker pushed it.
func (b *Backend) startAsync(q *vhostuser.Queue, head uint16, req abi.Request) {
	s, dev := b.sess, b.dev
	b.asyncMu.Lock()
	b.async = true
	b.asyncMu.Unlock()
	s.enqueue(func() {
		var resp abi.Response
		if req.Op == abi.OpDetachDMB || req.Op == abi.OpUnregisterDMB {
			// These do not block in the model: their unmaps are queued,
			// and run here before the answer.
			resp = dev.Handle(req, nil)
			s.drain()
		} else {
			resp = dev.Handle(req, nil) // blocks in Map: no lock held
		}
		s.vdev.WithMemoryLock(func() {
			if s.stopped.Load() {
				return // the rings are gone; Stop cleared async
			}
			var c vhostuser.Chain
			var n uint32
			if err := q.Retake(&c, head); err == nil && c.WritableLen() >= abi.ResponseSize {
				var out [abi.ResponseSize]byte
				resp.Encode(out[:])
				w := c.Writer()
				w.Write(out[:])
				n = uint32(w.Written())
			} else {
				b.warnGuest(nil, "request chain changed while its map was in flight")
			}
			q.Push(&c, n)
			q.Notify()
			b.asyncMu.Lock()
			b.async = false
			b.asyncMu.Unlock()
		})
		q.Wake()
	})
}
