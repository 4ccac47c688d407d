package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Handover: a running process hands its connections to a new process
// without the front-ends noticing anything but a pause (docs/handover.md).
// QEMU 11.1.3 aborts when a back-end reconnects, so the connection itself
// (the socket, every fd it brought, the negotiated state and the ring
// indexes) moves, and no message is sent to the front-end.
//
// The old process calls Server.Freeze, which brings every VM of the Server
// to a safe point, in this order:
//
//  1. Every queue goroutine of every device is stopped after its batch in
//     progress, and none is started until Thaw: no HandleQueue runs.
//  2. Each Backend that is a Quiescer finishes its own work in flight (for
//     ismvirtio, an attach-mode map waiting for QEMU, which needs the
//     control channel to be served meanwhile).
//  3. Every control channel parks between two messages: a message is never
//     half handled, and the next ones stay in the socket buffer for the
//     new process. Accepting new connections stops too (they wait in the
//     listen backlog).
//  4. If a Backend is busy again (a control message of step 3 gave it
//     work), the control channels go on and step 2 is repeated.
//
// Then Frozen.Export describes every VM (ExportedVM) with duplicates of the
// fds; Thaw (the handover failed) goes on as before, and Release (the new
// process is serving) ends the old side without a word to the front-ends.
// The new process serves each VM with Server.ServeImported.

// ErrHandedOver is what Serve returns once its VM was handed over to
// another process (Frozen.Release).
var ErrHandedOver = errors.New("vhost-user: handed over to another process")

// Quiescer is implemented by a Backend that has work of its own besides
// HandleQueue (goroutines that wait for the front-end, timers), so that
// Server.Freeze can stop it at a safe point.
type Quiescer interface {
	// Quiesce is called once no queue of any device of the Server runs,
	// with the control channels still served: it returns when the
	// backend has nothing in flight and starts nothing until Unquiesce.
	Quiesce(ctx context.Context) error
	// Idle reports, after the control channels were parked, whether
	// nothing is in flight still.
	Idle() bool
	// Unquiesce undoes Quiesce: the handover did not happen.
	Unquiesce()
}

// Resumer is implemented by a Backend that can take over a started device
// from another process: ServeImported calls Resume, instead of Start, for a
// connection whose device was started. Same rules as Backend.Start. A
// Backend that is not a Resumer gets Start.
type Resumer interface {
	Resume(dev *Guest) error
}

// ExportedVM is one VM of a Server as Export describes it. FD fields are
// indexes into the fd table Export returns.
type ExportedVM struct {
	Name     string
	Listener int        // the listening socket
	Conn     *ConnState // nil: no front-end connected
}

// ConnState is one connection: negotiation, memory table, rings and fds.
type ConnState struct {
	Conn       int // the front-end's socket
	BackendReq int // the back-end request channel; -1: none

	OfferedFeatures uint64
	AckedFeatures   uint64
	OfferedProto    uint64
	AckedProto      uint64
	ShmemSizes      []uint64
	Status          uint8
	Started         bool
	MapsUnseen      bool
	Stats           Stats

	Regions []RegionState
	Queues  []QueueState
}

// RegionState is one memory-table region and its fd.
type RegionState struct {
	GuestPhysAddr, Size, UserAddr, MmapOffset uint64
	FD                                        int
}

// QueueState is one virtqueue: what the front-end set, and the device's
// place in the rings.
type QueueState struct {
	Size                          uint16
	DescAddr, AvailAddr, UsedAddr uint64
	AddrSet, Enabled              bool
	EventIdx, IndirectOK          bool
	MaxChainLen                   uint64
	LastAvail, UsedIdx            uint16
	SignalledUsed                 uint16
	SignalValid, Pushed, Broken   bool
	BadChains                     uint64
	Kick, Call, Err               int // -1: none
}

// vmLoop is one Serve call as Freeze sees it; cur and parked are guarded
// by Server.mu.
type vmLoop struct {
	name   string
	ln     *net.UnixListener
	cur    *Guest // the connection served (also while it is torn down)
	parked bool   // waiting, instead of accepting, for Thaw or Release

	// lnMu orders the listener's closes: Release's, which must not
	// unlink the socket file (keep), and Serve's.
	lnMu sync.Mutex
	keep bool
}

// closeListener closes the listener; with keep, or after a Release, the
// socket file stays (the new process serves it).
func (lp *vmLoop) closeListener(keep bool) {
	lp.lnMu.Lock()
	defer lp.lnMu.Unlock()
	lp.keep = lp.keep || keep
	if lp.keep {
		lp.ln.SetUnlinkOnClose(false)
	}
	lp.ln.Close()
}

// parkAccept waits while the Server is frozen; it reports false once the
// VM was handed over. When ctx is done it returns true: the accept then
// fails, and Serve returns. s.mu is not held.
func (s *Server) parkAccept(ctx context.Context, lp *vmLoop) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.frozen && !s.released && ctx.Err() == nil {
		// Broadcast once, not at every wake-up: parked goroutines
		// would wake each other for ever.
		lp.parked = true
		s.cond.Broadcast()
		for s.frozen && !s.released && ctx.Err() == nil {
			s.cond.Wait()
		}
	}
	lp.parked = false
	return !s.released
}

// WaitServing waits until a Serve (or ServeImported) of each VM of names
// is under way, so that a Freeze sees them all; an error when ctx ends
// first.
func (s *Server) WaitServing(ctx context.Context, names ...string) error {
	stop := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	defer stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range names {
		for s.loops[n] == nil {
			if err := ctx.Err(); err != nil {
				return err
			}
			s.cond.Wait()
		}
	}
	return nil
}

// awaitMessage waits until the next front-end message can be read, or the
// connection is parked by a freeze. It reports false when the connection
// was handed over: serve returns without touching it.
func (d *Guest) awaitMessage() bool {
	s := d.srv
	for {
		s.mu.Lock()
		if d.freezing && !d.handedOver {
			d.parked = true
			s.cond.Broadcast() // once (see parkAccept)
			for d.freezing && !d.handedOver {
				s.cond.Wait()
			}
		}
		d.parked = false
		if d.handedOver {
			s.mu.Unlock()
			return false
		}
		s.mu.Unlock()
		d.waitReadable() // an error shows in ReadMessage
		s.mu.Lock()
		if d.freezing {
			s.mu.Unlock()
			continue
		}
		// From here the message is read and handled whole: a freeze
		// waits for it (no read deadline is set meanwhile).
		d.inMsg = true
		s.mu.Unlock()
		return true
	}
}

// msgDone ends what awaitMessage began.
func (d *Guest) msgDone() {
	d.srv.mu.Lock()
	d.inMsg = false
	d.srv.mu.Unlock()
}

// waitReadable waits until the connection has bytes (or EOF) to read
// without consuming any, or until the read deadline a freeze sets.
func (d *Guest) waitReadable() error {
	rc, err := d.conn.SyscallConn()
	if err != nil {
		return err
	}
	var b [1]byte
	return rc.Read(func(fd uintptr) bool {
		// A peek leaves the message, and the fds it carries, queued.
		_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return err != unix.EAGAIN && err != unix.EINTR
	})
}

// pastDeadline wakes a goroutine waiting to read or accept.
var pastDeadline = time.Unix(1, 0)

// Frozen is a Server stopped at a safe point by Freeze.
type Frozen struct {
	s       *Server
	devs    []*Guest
	loops   []*vmLoop
	quiesce []Quiescer
	done    bool
}

// Freeze brings every VM of the Server to a safe point (see Handover above)
// and returns the frozen Server, or an error (and the Server goes on as
// before) when that is not reached before ctx is done.
func (s *Server) Freeze(ctx context.Context) (*Frozen, error) {
	s.mu.Lock()
	if s.frozen {
		s.mu.Unlock()
		return nil, errors.New("vhost-user: already frozen")
	}
	s.frozen = true
	fz := &Frozen{s: s}
	for _, lp := range s.loops {
		lp.ln.SetDeadline(pastDeadline) // Serve parks before its next accept
	}
	s.mu.Unlock()

	// Wake cond waiters when ctx ends.
	stopWake := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	defer stopWake()

	// Step 1: the queues, then wait until each loop is parked at accept
	// or serves a device (whose queues are then stopped as well).
	if err := fz.settle(ctx, false); err != nil {
		fz.Thaw()
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		// Step 2.
		fz.quiesce = fz.quiesce[:0]
		for _, d := range fz.devs {
			if q, ok := d.backend.(Quiescer); ok {
				if err := q.Quiesce(ctx); err != nil {
					fz.Thaw()
					return nil, fmt.Errorf("vhost-user: %s: %w", d.name, err)
				}
				fz.quiesce = append(fz.quiesce, q)
			}
		}
		// Step 3.
		if err := fz.settle(ctx, true); err != nil {
			fz.Thaw()
			return nil, err
		}
		idle := true
		for _, q := range fz.quiesce {
			idle = idle && q.Idle()
		}
		if idle {
			return fz, nil
		}
		// Step 4.
		if attempt == 8 || ctx.Err() != nil {
			fz.Thaw()
			return nil, errors.New("vhost-user: backends stay busy: no safe point for a handover")
		}
		fz.unparkControl()
	}
}

// settle stops the queues of every device being served, and with control
// also parks their control channels; it waits until every loop is parked
// at accept or serves a device that is (with control) parked. Teardowns
// finish meanwhile: a loop in one has a device that never parks, whose
// loop then parks at accept.
func (fz *Frozen) settle(ctx context.Context, control bool) error {
	s := fz.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		ready, changed := true, false
		fz.devs = fz.devs[:0]
		// Every Serve under way, also one that began after Freeze
		// (it parks at once): all of them are handed over.
		fz.loops = fz.loops[:0]
		for _, lp := range s.loops {
			fz.loops = append(fz.loops, lp)
		}
		for _, lp := range fz.loops {
			if lp.parked {
				continue
			}
			d := lp.cur
			if d == nil {
				ready = false
				continue
			}
			fz.devs = append(fz.devs, d)
			if !d.queuesFrozen.Load() {
				// Not under s.mu: stopping a runner waits for its batch,
				// which may take s.mu (a device lookup).
				s.mu.Unlock()
				d.freezeQueues()
				s.mu.Lock()
				ready, changed = false, true
				continue
			}
			if control {
				if !d.freezing {
					d.freezing = true
					if !d.inMsg {
						d.conn.SetReadDeadline(pastDeadline)
					}
				}
				if !d.parked {
					ready = false
				}
			}
		}
		if ready {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("vhost-user: no safe point reached: %w", err)
		}
		if !changed { // else look again at once: nothing may broadcast
			s.cond.Wait()
		}
	}
}

// unparkControl lets the control channels go on (queues stay stopped).
func (fz *Frozen) unparkControl() {
	s := fz.s
	s.mu.Lock()
	for _, lp := range fz.loops {
		if d := lp.cur; d != nil && d.freezing {
			d.conn.SetReadDeadline(time.Time{})
			d.freezing = false
		}
	}
	s.cond.Broadcast()
	s.mu.Unlock()
}

// Thaw undoes Freeze: everything goes on as if nothing had happened.
func (fz *Frozen) Thaw() {
	if fz.done {
		return
	}
	fz.done = true
	for _, q := range fz.quiesce {
		q.Unquiesce()
	}
	s := fz.s
	s.mu.Lock()
	s.frozen = false
	var devs []*Guest
	for _, lp := range fz.loops {
		lp.ln.SetDeadline(time.Time{})
		if d := lp.cur; d != nil {
			devs = append(devs, d)
		}
	}
	s.mu.Unlock()
	// The queues first, while the control channels are still parked: a
	// queue's state is the control goroutine's to change.
	for _, d := range devs {
		d.thawQueues()
	}
	fz.unparkControl()
}

// Release ends the frozen Server's side after a handover: each Serve
// returns ErrHandedOver, its listener is closed without unlinking the
// socket file, and each connection's fds and mappings are closed without
// a message to the front-end and without calling its Backend (Stop would
// tell the peers the device is gone). The new process holds duplicates of
// all of them, so the front-ends notice nothing.
func (fz *Frozen) Release() {
	if fz.done {
		return
	}
	fz.done = true
	s := fz.s
	s.mu.Lock()
	s.released = true
	for _, lp := range fz.loops {
		if d := lp.cur; d != nil {
			d.handedOver = true
		}
	}
	s.cond.Broadcast()
	s.mu.Unlock()
	for _, lp := range fz.loops {
		lp.closeListener(true)
	}
}

// freezeQueues stops the queue goroutines after their batch in progress;
// none starts again until thawQueues. A kick meanwhile stays counted in its
// eventfd, and a queue goroutine's first look after a start finds the
// chains it announced.
func (d *Guest) freezeQueues() {
	d.runMu.Lock()
	d.queuesFrozen.Store(true)
	d.runMu.Unlock()
	d.stopAllRunners()
}

// thawQueues starts the queue goroutines the device's state asks for; the
// control channel is parked (it owns that state).
func (d *Guest) thawQueues() {
	d.runMu.Lock()
	d.queuesFrozen.Store(false)
	d.runMu.Unlock()
	// Shared: a control goroutine that was not parked yet (a Freeze that
	// failed early) changes the queues only under the lock, exclusively.
	d.mu.RLock()
	defer d.mu.RUnlock()
	if !d.started.Load() {
		return
	}
	for _, q := range d.queues {
		if q.runnable() && d.runner(q.index) == nil {
			d.startRunner(q)
		}
	}
}

// Export describes every VM of the frozen Server, with duplicates of every
// fd (the old process keeps its own until Release, for a Thaw). The caller
// owns the returned fds.
func (fz *Frozen) Export() ([]ExportedVM, []int, error) {
	var fds []int
	fail := func(err error) ([]ExportedVM, []int, error) {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, nil, err
	}
	add := func(fd int) (int, error) {
		if fd < 0 {
			return -1, nil
		}
		nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return -1, fmt.Errorf("vhost-user: dup fd for the handover: %w", err)
		}
		fds = append(fds, nfd)
		return len(fds) - 1, nil
	}
	addConn := func(c syscall.Conn) (int, error) {
		rc, err := c.SyscallConn()
		if err != nil {
			return -1, err
		}
		idx, aerr := -1, error(nil)
		if err := rc.Control(func(fd uintptr) { idx, aerr = add(int(fd)) }); err != nil {
			return -1, err
		}
		return idx, aerr
	}
	var vms []ExportedVM
	fz.s.mu.Lock()
	loops := append([]*vmLoop(nil), fz.loops...)
	fz.s.mu.Unlock()
	for _, lp := range loops {
		vm := ExportedVM{Name: lp.name}
		var err error
		if vm.Listener, err = addConn(lp.ln); err != nil {
			return fail(err)
		}
		if d := lp.cur; d != nil && !lp.parked {
			if vm.Conn, err = d.export(add, addConn); err != nil {
				return fail(fmt.Errorf("vm %s: %w", lp.name, err))
			}
		}
		vms = append(vms, vm)
	}
	return vms, fds, nil
}

// export describes the parked device d.
func (d *Guest) export(add func(int) (int, error), addConn func(syscall.Conn) (int, error)) (*ConnState, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := &ConnState{
		OfferedFeatures: d.offeredFeatures,
		AckedFeatures:   d.ackedFeatures,
		OfferedProto:    d.offeredProto,
		AckedProto:      d.ackedProto.Load(),
		ShmemSizes:      append([]uint64(nil), d.shmemSizes...),
		Status:          d.status,
		Started:         d.started.Load(),
		MapsUnseen:      d.mapsUnseen.Load(),
		Stats:           d.Stats(),
		BackendReq:      -1,
	}
	var err error
	if st.Conn, err = addConn(d.conn); err != nil {
		return nil, err
	}
	d.bcPtrMu.Lock()
	bc := d.bc
	d.bcPtrMu.Unlock()
	if bc != nil {
		if st.BackendReq, err = addConn(bc); err != nil {
			return nil, err
		}
	}
	for _, r := range d.mem.Load().Regions() {
		rs := RegionState{GuestPhysAddr: r.GuestPhysAddr, Size: r.Size, UserAddr: r.UserAddr, MmapOffset: r.MmapOffset}
		if rs.FD, err = add(r.fd); err != nil {
			return nil, err
		}
		st.Regions = append(st.Regions, rs)
	}
	for _, q := range d.queues {
		qs := QueueState{
			Size: q.size, DescAddr: q.descAddr, AvailAddr: q.availAddr, UsedAddr: q.usedAddr,
			AddrSet: q.addrSet, Enabled: q.enabled, EventIdx: q.eventIdx, IndirectOK: q.indirectOK,
			MaxChainLen: q.maxChainLen, LastAvail: q.lastAvail, UsedIdx: q.usedIdx,
			SignalledUsed: q.signalledUsed, SignalValid: q.signalValid, Pushed: q.pushed, Broken: q.broken,
			BadChains: q.badChains,
		}
		if qs.Kick, err = add(q.kickFD); err != nil {
			return nil, err
		}
		q.call.mu.Lock()
		qs.Call, err = add(q.call.fd)
		q.call.mu.Unlock()
		if err != nil {
			return nil, err
		}
		if qs.Err, err = add(q.errFD); err != nil {
			return nil, err
		}
		st.Queues = append(st.Queues, qs)
	}
	return st, nil
}

// fdOf returns a new close-on-exec duplicate of fds[i], checking i.
func fdOf(fds []int, i int, what string) (int, error) {
	if i < 0 || i >= len(fds) {
		return -1, fmt.Errorf("vhost-user: handover state: %s fd %d of %d", what, i, len(fds))
	}
	fd, err := unix.FcntlInt(uintptr(fds[i]), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("vhost-user: handover state: dup %s fd: %w", what, err)
	}
	return fd, nil
}

// optFDOf is fdOf for an fd that may be absent (-1).
func optFDOf(fds []int, i int, what string) (int, error) {
	if i == -1 {
		return -1, nil
	}
	return fdOf(fds, i, what)
}

// unixConnOf makes a *net.UnixConn of fds[i] (a duplicate).
func unixConnOf(fds []int, i int, what string) (*net.UnixConn, error) {
	fd, err := fdOf(fds, i, what)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), what)
	defer f.Close() // FileConn dups
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("vhost-user: handover state: %s: %w", what, err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("vhost-user: handover state: %s is not a unix socket", what)
	}
	return uc, nil
}

// ListenerOf makes the listener of an ExportedVM from the fd table (a
// duplicate: the caller still closes the table). It does not unlink the
// socket file when closed unless the caller says so (SetUnlinkOnClose).
func ListenerOf(fds []int, i int) (*net.UnixListener, error) {
	fd, err := fdOf(fds, i, "listener")
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "listener")
	defer f.Close()
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("vhost-user: handover state: listener: %w", err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, errors.New("vhost-user: handover state: listener is not a unix socket")
	}
	ul.SetUnlinkOnClose(false)
	return ul, nil
}

// ServeImported is Serve for a VM handed over from another process: it
// first serves the connection st describes (nil: none) as it was there,
// then accepts connections on ln as Serve does. fds is the handover's fd
// table; ServeImported duplicates what it keeps, so the caller closes the
// table once ready was called for every VM. ready is called once: with nil
// when the VM is served (under Hold, if one is in force), or with the
// error when its connection cannot be rebuilt; then ServeImported returns
// that error and does not serve the VM.
func (s *Server) ServeImported(ctx context.Context, name string, ln *net.UnixListener, st *ConnState, fds []int,
	newBackend func(name string) (Backend, error), ready func(error)) error {
	if st == nil {
		return s.serve(ctx, name, ln, newBackend, nil, ready)
	}
	log := s.log.WithField("vm", name)
	d, err := s.importDevice(ctx, name, log, st, fds, newBackend)
	if err != nil {
		ready(err)
		ln.Close()
		return err
	}
	return s.serve(ctx, name, ln, newBackend, d, ready)
}

// importDevice rebuilds a connection from st. Every value is checked: the
// state comes from another process, and a bad one is an error, never a
// panic or a device that touches memory it should not.
func (s *Server) importDevice(ctx context.Context, name string, log *logrus.Entry, st *ConnState, fds []int,
	newBackend func(string) (Backend, error)) (d *Guest, err error) {
	c, err := unixConnOf(fds, st.Conn, "connection")
	if err != nil {
		return nil, err
	}
	d, err = s.newGuest(ctx, name, log, c, newBackend)
	if err != nil {
		c.Close()
		return nil, err
	}
	dev := d
	defer func() {
		if err != nil {
			dev.abandon()
		}
	}()
	if len(st.Queues) != len(d.queues) {
		return nil, fmt.Errorf("vhost-user: handover state: %d queues, the backend has %d", len(st.Queues), len(d.queues))
	}
	// The front-end negotiated with the old binary: what it acked must
	// still be offered here, and answered the same way.
	if st.AckedFeatures&^st.OfferedFeatures != 0 || st.AckedProto&^st.OfferedProto != 0 {
		return nil, errors.New("vhost-user: handover state: acked features not offered")
	}
	if st.AckedFeatures&^d.offeredFeatures != 0 || st.AckedProto&^d.offeredProto != 0 {
		return nil, fmt.Errorf("vhost-user: handover state: the front-end acked features %#x / protocol %#x, this binary offers %#x / %#x",
			st.AckedFeatures, st.AckedProto, d.offeredFeatures, d.offeredProto)
	}
	if st.AckedProto&(1<<ProtocolShmem) != 0 && !equalSizes(st.ShmemSizes, d.shmemSizes) {
		return nil, fmt.Errorf("vhost-user: handover state: shared-memory regions %v, this backend has %v", st.ShmemSizes, d.shmemSizes)
	}
	d.offeredFeatures, d.offeredProto = st.OfferedFeatures, st.OfferedProto
	d.ackedFeatures = st.AckedFeatures
	d.ackedProto.Store(st.AckedProto)
	d.status = st.Status
	d.mapsUnseen.Store(st.MapsUnseen)
	d.stats.messages.Store(st.Stats.Messages)
	d.stats.badMessages.Store(st.Stats.BadMessages)
	d.stats.badChains.Store(st.Stats.BadChains)
	if st.BackendReq != -1 {
		bc, err := unixConnOf(fds, st.BackendReq, "back-end request channel")
		if err != nil {
			return nil, err
		}
		d.bc = bc
	}

	var total uint64
	var overflow bool
	for _, r := range st.Regions {
		total, overflow = addSize(total, r.Size, overflow)
	}
	if err := d.checkMemCaps(len(st.Regions), total, overflow); err != nil {
		return nil, err
	}
	regions := make([]*MemoryRegion, 0, len(st.Regions))
	unmapAll := func() {
		for _, r := range regions {
			r.unmap()
		}
	}
	for _, rs := range st.Regions {
		fd, err := fdOf(fds, rs.FD, "memory region")
		if err != nil {
			unmapAll()
			return nil, err
		}
		r, err := mapRegion(&MemoryRegion{GuestPhysAddr: rs.GuestPhysAddr, Size: rs.Size, UserAddr: rs.UserAddr,
			MmapOffset: rs.MmapOffset, fd: -1}, fd)
		if err != nil {
			unmapAll()
			return nil, err
		}
		regions = append(regions, r)
	}
	var mem *Memory
	if len(st.Regions) > 0 {
		if mem, err = newMemory(regions); err != nil {
			unmapAll()
			return nil, err
		}
	}
	d.lock(func() {
		if mem != nil {
			d.setMemory(mem)
		}
		for i, qs := range st.Queues {
			if err = d.queues[i].importState(qs, fds, mem); err != nil {
				return
			}
		}
	})
	if err != nil {
		return nil, err
	}
	if st.Started {
		var serr error
		d.lock(func() {
			d.started.Store(true)
			if d.call("Resume", func() {
				if r, ok := d.backend.(Resumer); ok {
					serr = r.Resume(d)
				} else {
					serr = d.backend.Start(d)
				}
			}) {
				serr = errors.New("Backend.Resume panicked")
			}
			if serr != nil {
				d.started.Store(false)
			}
		})
		if serr != nil {
			return nil, fmt.Errorf("vhost-user: resuming the device: %w", serr)
		}
	}
	return d, nil
}

func equalSizes(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// importState sets the queue as qs describes it, translated through mem;
// the device's lock is held.
func (q *Queue) importState(qs QueueState, fds []int, mem *Memory) error {
	if qs.Size > MaxQueueSize || qs.Size&(qs.Size-1) != 0 {
		return fmt.Errorf("vhost-user: handover state: queue %d size %d", q.index, qs.Size)
	}
	if qs.MaxChainLen == 0 {
		return fmt.Errorf("vhost-user: handover state: queue %d chain bound 0", q.index)
	}
	// The ring indexes are free-running u16s: any value is one a driver
	// can have, but never more than a ring apart.
	if qs.Size > 0 && qs.LastAvail-qs.UsedIdx > qs.Size {
		return fmt.Errorf("vhost-user: handover state: queue %d has %d chains in flight, size %d", q.index, qs.LastAvail-qs.UsedIdx, qs.Size)
	}
	kick, err := optFDOf(fds, qs.Kick, "kick")
	if err != nil {
		return err
	}
	call, err := optFDOf(fds, qs.Call, "call")
	if err != nil {
		closeFD(kick)
		return err
	}
	errFD, err := optFDOf(fds, qs.Err, "err")
	if err != nil {
		closeFD(kick)
		closeFD(call)
		return err
	}
	q.setKick(kick)
	q.setCall(call)
	q.errFD = errFD
	q.size, q.descAddr, q.availAddr, q.usedAddr = qs.Size, qs.DescAddr, qs.AvailAddr, qs.UsedAddr
	q.addrSet, q.enabled, q.eventIdx, q.indirectOK = qs.AddrSet, qs.Enabled, qs.EventIdx, qs.IndirectOK
	q.maxChainLen = qs.MaxChainLen
	q.lastAvail, q.usedIdx, q.signalledUsed = qs.LastAvail, qs.UsedIdx, qs.SignalledUsed
	q.signalValid, q.pushed, q.broken, q.badChains = qs.SignalValid, qs.Pushed, qs.Broken, qs.BadChains
	if terr := q.translate(mem); terr != nil {
		// As after a SET_VRING_ADDR that does not translate: not ready
		// until the front-end changes something.
		if e := q.dev.traceLog(); e != nil {
			e.WithError(terr).Debug("imported ring does not translate")
		}
	}
	return nil
}

// abandon closes what the device holds in this process without a word to
// the front-end and without calling its Backend: the connection lives on in
// another process (or was never served here). Its runners are stopped.
func (d *Guest) abandon() {
	d.runMu.Lock()
	d.tornDown = true
	d.runMu.Unlock()
	d.stopAllRunners()
	d.closeBackendChannel()
	d.closeOnce.Do(func() { d.conn.Close() })
	d.lock(func() {
		for _, q := range d.queues {
			q.closeFDs()
			q.translate(nil)
		}
		d.setMemory(nil)
	})
}

// Hold is for the new process of a handover, before its ServeImported
// calls: every VM it serves is frozen from the start (no queue goroutine,
// no control message, no accept) until Unhold, so that no VM runs before
// all are imported and the old process has let go of them.
func (s *Server) Hold() {
	s.mu.Lock()
	s.frozen = true
	s.mu.Unlock()
}

// Unhold ends Hold: each VM served goes on, and each Backend that is a
// Quiescer is unquiesced (ismvirtio starts its heartbeat).
func (s *Server) Unhold() {
	s.mu.Lock()
	fz := &Frozen{s: s}
	for _, lp := range s.loops {
		fz.loops = append(fz.loops, lp)
		if d := lp.cur; d != nil {
			if q, ok := d.backend.(Quiescer); ok {
				fz.quiesce = append(fz.quiesce, q)
			}
		}
	}
	s.mu.Unlock()
	fz.Thaw()
}

// Backend is the device's Backend.
func (d *Guest) Backend() Backend { return d.backend }
