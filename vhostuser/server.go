package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// DefaultReplyTimeout bounds how long a back-end request waits for the
// front-end's reply before it fails.
const DefaultReplyTimeout = 10 * time.Second

// Server serves vhost-user connections, one listening socket per VM.
//
// Locking. Each Guest (one VM's connection) has its own lock and its own
// reference-counted memory snapshots (Memory); nothing is shared between
// VMs, so one VM's control messages pause that VM's queues and nothing else.
//
//   - A device's lock, shared: each Backend.HandleQueue call (one batch) of
//     that device, and Guest.WithMemoryLock. Its queues, rings and chains,
//     and its current Memory, are valid while it is held.
//   - A device's lock, exclusive: every change of that device's memory table
//     (SET_MEM_TABLE, ADD/REM_MEM_REG, teardown), ring addresses, sizes and
//     queue fds, and its Backend.Start, Stop and Close. It waits for that
//     device's batch in progress, which Backends keep short (a work budget
//     per call, see ismvirtio).
//   - Another VM's memory (the ISM MOVE copies from the sender's chain into
//     the receiver's RAM on the sender's queue goroutine) is used through
//     Guest.AcquireMemory and Memory.Release, for one MOVE: that never
//     waits, and the receiver's table change does not wait for it either.
//     The old table's regions stay mapped until the last reference is
//     released and are unmapped then, so no region is ever touched after
//     its munmap (a fault is still recovered, see runQueue, but that is for
//     a front-end that shrinks a file under a live mapping, not for this).
//   - Another VM's queues (events posted into its event queue) are used
//     only under Guest.TryWithMemoryLock: when that VM's lock is not to be
//     had at once, its own queue goroutine delivers them (Queue.Wake).
//   - No device lock is held while waiting for a back-end request reply
//     (ShmemMap): QEMU sends SET_MEM_TABLE, which needs the lock
//     exclusively, before it answers. Nor while waiting for a queue
//     goroutine to exit: the goroutine may be waiting for the lock.
type Server struct {
	log *logrus.Entry

	// ReplyTimeout bounds waits for back-end request replies
	// (DefaultReplyTimeout if zero). Set it before Serve.
	ReplyTimeout time.Duration

	// AllowUIDs, when not empty, are the only uids whose processes may
	// connect (checked with SO_PEERCRED); others are closed at once and
	// the listener goes on. Set it before Serve.
	AllowUIDs []uint32

	// MaxMemBytes bounds the sum of the region sizes of one connection's
	// memory table (DefaultMaxMemBytes if zero); MaxMemRegions bounds its
	// regions (MaxMemSlots if zero or larger) and is what GET_MAX_MEM_SLOTS
	// answers. A SET_MEM_TABLE or ADD_MEM_REG beyond them is refused and the
	// table stays as it was. Set them before Serve.
	MaxMemBytes   uint64
	MaxMemRegions int

	mu      sync.Mutex
	devices map[string]*Guest

	// Handover (handover.go), guarded by mu: the Serve loops, whether
	// they are frozen or handed over, and cond for their state changes.
	loops    map[string]*vmLoop
	frozen   bool
	released bool
	cond     *sync.Cond

	now func() time.Time // the log rate limiters' clock; tests fix it
}

// NewServer returns a Server that logs to log.
func NewServer(log *logrus.Entry) *Server {
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	s := &Server{log: log, devices: map[string]*Guest{}, loops: map[string]*vmLoop{}, now: time.Now}
	s.cond = sync.NewCond(&s.mu)
	return s
}

// Guest returns the device currently connected for VM name, or nil.
func (s *Server) Guest(name string) *Guest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.devices[name]
}

// Stats returns the counters of VM name's current connection (zero if none).
func (s *Server) Stats(name string) Stats {
	if d := s.Guest(name); d != nil {
		return d.Stats()
	}
	return Stats{}
}

// Serve accepts connections on ln for VM name, one at a time: a new
// connection is accepted only after the previous one is fully torn down
// (Stop, Close, fds closed, memory unmapped). newBackend makes the Backend
// for each connection. Serve returns when ctx is done (ctx.Err()) or the
// listener fails; it closes ln and the current connection on return.
//
// Once the VM was handed over to another process (Frozen.Release), Serve
// returns ErrHandedOver without closing the connection's socket for the
// front-end (see handover.go).
func (s *Server) Serve(ctx context.Context, name string, ln *net.UnixListener, newBackend func(name string) (Backend, error)) error {
	return s.serve(ctx, name, ln, newBackend, nil, nil)
}

// serve is Serve; first, if not nil, is a connection to serve before the
// first accept (ServeImported), and serving, if not nil, is called once the
// VM is registered (and first with it: a Hold covers it).
func (s *Server) serve(ctx context.Context, name string, ln *net.UnixListener, newBackend func(name string) (Backend, error),
	first *Guest, serving func(error)) error {
	log := s.log.WithField("vm", name)
	var cur atomic.Pointer[Guest]
	cur.Store(first)
	lp := &vmLoop{name: name, ln: ln}
	stop := context.AfterFunc(ctx, func() {
		lp.closeListener(false)
		if d := cur.Load(); d != nil {
			d.Close()
		}
		s.mu.Lock()
		s.cond.Broadcast() // a loop parked at accept returns
		s.mu.Unlock()
	})
	defer stop()
	defer lp.closeListener(false)
	s.mu.Lock()
	if _, dup := s.loops[name]; dup {
		s.mu.Unlock()
		if first != nil {
			first.abandon()
		}
		err := fmt.Errorf("vhost-user %s: served twice", name)
		if serving != nil {
			serving(err)
		}
		return err
	}
	s.loops[name] = lp
	s.cond.Broadcast() // WaitServing
	s.mu.Unlock()
	if first == nil && serving != nil {
		serving(nil)
		serving = nil
	}
	defer func() {
		s.mu.Lock()
		delete(s.loops, name)
		s.cond.Broadcast()
		s.mu.Unlock()
	}()
	// The VM's lifecycle lines (connects, starts, stops) and refused
	// connections are rate-limited across its connections: a reconnect
	// loop gets no fresh allowance. Refusals have their own, so that a
	// stranger's connect loop cannot hide the VM's own lines.
	life, refusals := &logLimiter{}, &logLimiter{}
	for {
		d := first
		first = nil
		if d == nil {
			if !s.parkAccept(ctx, lp) {
				return ErrHandedOver
			}
			c, err := ln.AcceptUnix()
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				s.mu.Lock()
				released := s.released
				s.mu.Unlock()
				if released {
					return ErrHandedOver
				}
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					continue // a freeze's deadline: parkAccept waits
				}
				return fmt.Errorf("vhost-user %s: accept: %w", name, err)
			}
			if cred, err := s.checkPeer(c); err != nil {
				if e := refusals.Entry(s.now(), log, logrus.WarnLevel); e != nil {
					e.WithFields(cred).WithError(err).Warn("connection refused")
				}
				c.Close()
				continue
			}
			if e := life.Entry(s.now(), log, logrus.InfoLevel); e != nil {
				e.Info("front-end connected")
			}
			d, err = s.newGuest(ctx, name, log, c, newBackend)
			if err != nil {
				if e := life.Entry(s.now(), log, logrus.ErrorLevel); e != nil {
					e.WithError(err).Error("cannot create the device; closing the connection")
				}
				c.Close()
				continue
			}
		}
		d.lifeLim = life
		cur.Store(d)
		if ctx.Err() != nil { // cancelled between Accept and Store
			d.Close()
		}
		s.mu.Lock()
		s.devices[name] = d
		lp.cur = d
		if s.frozen {
			// Accepted (or imported) while a freeze runs: frozen from
			// the start; its messages wait for the new process.
			d.queuesFrozen.Store(true)
			d.freezing = true
		}
		s.cond.Broadcast()
		s.mu.Unlock()
		if serving != nil {
			serving(nil)
			serving = nil
		}
		// Backend.Start/Stop/Close run on this goroutine and may touch
		// guest memory: a fault on it (a shrunk memory file) becomes a
		// recovered panic that closes the connection, see runQueue.
		prev := debug.SetPanicOnFault(true)
		if d.started.Load() {
			d.reconcile() // an imported device: start its queues
		}
		d.serve()
		handedOver := d.isHandedOver()
		if handedOver {
			d.abandon()
		} else {
			d.teardown()
		}
		debug.SetPanicOnFault(prev)
		s.mu.Lock()
		if s.devices[name] == d {
			delete(s.devices, name)
		}
		lp.cur = nil
		s.cond.Broadcast()
		s.mu.Unlock()
		cur.Store(nil)
		if handedOver {
			return ErrHandedOver
		}
		if e := life.Entry(s.now(), log, logrus.InfoLevel); e != nil {
			e.WithField("stats", fmt.Sprintf("%+v", d.Stats())).Info("connection torn down")
		}
	}
}

// errPeerUID: the connecting process's uid is not in AllowUIDs.
var errPeerUID = errors.New("uid not allowed")

// checkPeer applies AllowUIDs to a new connection. The fields describe the
// peer for the refusal's log line.
func (s *Server) checkPeer(c *net.UnixConn) (logrus.Fields, error) {
	if len(s.AllowUIDs) == 0 {
		return nil, nil
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if credErr != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	fields := logrus.Fields{"uid": cred.Uid, "pid": cred.Pid}
	for _, u := range s.AllowUIDs {
		if cred.Uid == u {
			return fields, nil
		}
	}
	return fields, errPeerUID
}

func (s *Server) newGuest(ctx context.Context, name string, log *logrus.Entry, c *net.UnixConn, newBackend func(string) (Backend, error)) (d *Guest, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic in Backend: %v\n%s", r, debug.Stack())
		}
	}()
	be, err := newBackend(name)
	if err != nil {
		return nil, err
	}
	nq := be.NumQueues()
	if nq < 1 || nq > maxQueues {
		be.Close()
		return nil, fmt.Errorf("backend has %d queues", nq)
	}
	d = &Guest{
		name:         name,
		srv:          s,
		log:          log,
		backend:      be,
		conn:         c,
		replyTimeout: s.ReplyTimeout,
		lifeLim:      &logLimiter{}, // Serve gives the VM's
	}
	if d.replyTimeout <= 0 {
		d.replyTimeout = DefaultReplyTimeout
	}
	d.maxMemBytes, d.maxMemRegions = s.MaxMemBytes, s.MaxMemRegions
	if d.maxMemBytes == 0 {
		d.maxMemBytes = DefaultMaxMemBytes
	}
	if d.maxMemRegions <= 0 || d.maxMemRegions > MaxMemSlots {
		d.maxMemRegions = MaxMemSlots
	}
	d.offeredFeatures = be.Features() | 1<<FeatureVersion1 | 1<<FeatureRingEventIdx |
		1<<FeatureRingIndirectDesc | 1<<FeatureProtocolFeatures
	d.offeredProto = 1<<ProtocolMQ | 1<<ProtocolReplyAck | 1<<ProtocolConfig | 1<<ProtocolBackendReq |
		1<<ProtocolBackendSendFD | 1<<ProtocolConfigureMemSlots | 1<<ProtocolResetDevice | 1<<ProtocolStatus
	if sizes := be.ShmemSizes(); sizes != nil {
		d.shmemSizes = append([]uint64(nil), sizes...)
		d.offeredProto |= 1 << ProtocolShmem
	}
	d.queues = make([]*Queue, nq)
	for i := range d.queues {
		d.queues[i] = newQueue(d, i)
	}
	d.runners = make([]*runner, nq)
	return d, nil
}

// --- starting and stopping ---------------------------------------------------

// runnable: the front-end set the queue up and enabled it. Its rings may
// fail to translate for a moment (a memory table being changed region by
// region); Next then gives nothing, and the device is not stopped for it.
func (q *Queue) runnable() bool { return q.enabled && q.addrSet && q.size > 0 && q.kickFD >= 0 }

// reconcile starts or stops the device and its queue goroutines to match
// what the front-end has set up. Start: a memory table and at least one
// runnable (enabled, addressed, kicked) queue. QEMU 11.1.3 enables the rings
// only from vhost_dev_start, i.e. after the guest set DRIVER_OK, and it
// never sends SET_STATUS with DRIVER_OK itself (seen with qtest: only
// FEATURES_OK), so enabled rings are the start signal with or without
// STATUS. Stop: no runnable queue (SET_VRING_ENABLE 0, GET_VRING_BASE),
// SET_STATUS 0 or FAILED, RESET_DEVICE/RESET_OWNER, disconnect. Called on
// the connection goroutine without the lock.
func (d *Guest) reconcile() {
	any, anyReady := false, false
	for _, q := range d.queues {
		if q.runnable() {
			any = true
			anyReady = anyReady || q.Ready()
		}
	}
	want := d.mem.Load() != nil && any && d.status&StatusFailed == 0
	if !want {
		if d.started.Load() {
			d.stopDevice()
		}
		return
	}
	if !d.started.Load() {
		if !anyReady {
			return // nothing to serve yet: start once a ring translates
		}
		var err error
		d.lock(func() {
			// started is set before Start so that a goroutine Start
			// spawns may already map shared memory.
			d.started.Store(true)
			if d.call("Start", func() { err = d.backend.Start(d) }) {
				err = errors.New("Backend.Start panicked")
			}
			if err != nil {
				d.started.Store(false)
			}
		})
		if err != nil {
			if e := d.lifeLog(logrus.ErrorLevel); e != nil {
				e.WithError(err).Error("device start failed")
			}
			return
		}
		if e := d.lifeLog(logrus.InfoLevel); e != nil {
			e.Info("device started")
		}
	}
	for _, q := range d.queues {
		running := d.runner(q.index) != nil
		switch {
		case q.runnable() && !running:
			d.startRunner(q) // not while a handover freeze holds the queues
		case !q.runnable() && running:
			d.stopRunner(q.index)
		}
	}
}

func (d *Guest) stopDevice() {
	d.stopAllRunners()
	d.lock(func() {
		if d.started.Swap(false) {
			d.call("Stop", func() { d.backend.Stop(d) })
		}
	})
	if e := d.lifeLog(logrus.InfoLevel); e != nil {
		e.Info("device stopped")
	}
}

// resetDevice handles RESET_DEVICE and RESET_OWNER: stop, and forget all
// ring state and fds (the memory table stays until replaced).
func (d *Guest) resetDevice() {
	if d.started.Load() {
		d.stopDevice()
	}
	d.stopAllRunners()
	d.lock(func() {
		for _, q := range d.queues {
			q.resetState()
			q.eventIdx = d.ackedFeatures&(1<<FeatureRingEventIdx) != 0
			q.indirectOK = d.ackedFeatures&(1<<FeatureRingIndirectDesc) != 0
		}
		d.status = 0
	})
}

// teardown ends the connection: nothing of it survives, so the next
// connection for the same VM starts clean.
func (d *Guest) teardown() {
	d.runMu.Lock()
	d.tornDown = true // no runner starts again (a failed handover's Thaw)
	d.runMu.Unlock()
	d.Close()
	d.closeBackendChannel() // fails any ShmemMap still waiting
	d.stopAllRunners()
	d.lock(func() {
		if d.started.Swap(false) {
			d.call("Stop", func() { d.backend.Stop(d) })
		}
		d.call("Close", func() { d.backend.Close() })
		for _, q := range d.queues {
			q.closeFDs()
			q.translate(nil)
		}
		// Unmapped now, or by the last peer still copying into it.
		d.setMemory(nil)
	})
}

// runner is the goroutine that waits on one queue's kick eventfd.
type runner struct {
	q    *Queue
	kick *os.File // a nonblocking dup of the kick fd: Close wakes the reader
	fd   int      // kick's fd, for wake's raw writes (closed only after the runner is unregistered)
	stop atomic.Bool
	done chan struct{}
}

func (d *Guest) runner(i int) *runner {
	d.runMu.Lock()
	defer d.runMu.Unlock()
	return d.runners[i]
}

func (d *Guest) startRunner(q *Queue) {
	fd, err := unix.FcntlInt(uintptr(q.kickFD), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		if e := d.guestLog(logrus.ErrorLevel); e != nil {
			e.WithError(err).Errorf("queue %d: dup kick fd", q.index)
		}
		return
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		if e := d.guestLog(logrus.ErrorLevel); e != nil {
			e.WithError(err).Errorf("queue %d: kick fd", q.index)
		}
		return
	}
	r := &runner{q: q, kick: os.NewFile(uintptr(fd), fmt.Sprintf("kick%d", q.index)), fd: fd, done: make(chan struct{})}
	d.runMu.Lock()
	if d.queuesFrozen.Load() || d.tornDown || d.runners[q.index] != nil {
		// Frozen for a handover (thawQueues starts it), or started
		// already by thawQueues and reconcile at once.
		d.runMu.Unlock()
		r.kick.Close()
		return
	}
	d.runners[q.index] = r
	d.runMu.Unlock()
	go d.runQueue(r)
}

// stopRunner stops queue i's goroutine and waits for it. Never call it with
// the device's lock held.
func (d *Guest) stopRunner(i int) {
	d.runMu.Lock()
	r := d.runners[i]
	d.runners[i] = nil
	d.runMu.Unlock()
	if r == nil {
		return
	}
	r.stop.Store(true)
	r.kick.Close()
	<-r.done
}

func (d *Guest) stopAllRunners() {
	for i := range d.runners {
		d.stopRunner(i)
	}
}

// wake writes the kick fd of queue i's runner. The write is a raw
// nonblocking one, never one that waits: wake is called from HandleQueue
// with a device lock held (and from other VMs' goroutines), and the kick fd
// is the front-end's choice; one that is not an eventfd and fills up (a
// socket) must not stall anyone. A failed write leaves the queue to the
// driver's next kick.
func (d *Guest) wake(i int) {
	d.runMu.Lock()
	defer d.runMu.Unlock()
	if i >= 0 && i < len(d.runners) && d.runners[i] != nil {
		var one [8]byte
		one[0] = 1
		// Safe under runMu: stopRunner closes the fd only after it
		// took the runner out of d.runners.
		unix.Write(d.runners[i].fd, one[:])
	}
}

func (d *Guest) runQueue(r *runner) {
	// A front-end can shrink a guest memory file after it was mapped; a
	// touch of the missing pages then faults. Make that a panic (recovered
	// below: this connection closes) instead of the end of the process.
	debug.SetPanicOnFault(true)
	defer close(r.done)
	defer func() {
		if p := recover(); p != nil {
			if e := d.lifeLog(logrus.ErrorLevel); e != nil {
				e.Errorf("panic in Backend.HandleQueue(%d): %v\n%s", r.q.index, p, debug.Stack())
			}
			d.Close()
		}
	}()
	var buf [8]byte
	// The first look is after start; later ones after a kick, or at once
	// after a HandleQueue that yielded with work left.
	for again := true; ; {
		if !again {
			if _, err := r.kick.Read(buf[:]); err != nil {
				if !r.stop.Load() {
					if e := d.guestLog(logrus.ErrorLevel); e != nil {
						e.WithError(err).Errorf("queue %d: kick read", r.q.index)
					}
				}
				return
			}
		}
		if r.stop.Load() || !d.handleQueue(r) {
			return
		}
		// After a yield the next batch starts at once. The device's lock
		// was released in between: a control message waiting for it goes
		// first, since a waiting writer holds off new readers. No
		// runtime.Gosched here: on a machine with an idle P it wakes a
		// thread (futex) at every batch end, which cost the 64 B MOVE a
		// third of its rate; the scheduler preempts a long batch run anyway.
		again = r.q.yielded.Swap(false)
	}
}

// handleQueue runs one HandleQueue batch under the device's lock (shared).
func (d *Guest) handleQueue(r *runner) bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if r.stop.Load() {
		return false
	}
	d.backend.HandleQueue(d, r.q)
	return true
}
