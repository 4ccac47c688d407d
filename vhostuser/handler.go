package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime/debug"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// errFatal marks handler errors after which the connection is closed.
type fatalError struct{ err error }

func (e fatalError) Error() string { return e.err.Error() }
func (e fatalError) Unwrap() error { return e.err }

func fatal(err error) error { return fatalError{err} }

// serve runs the front-end channel until it fails or closes. It is the only
// goroutine that handles front-end messages for this device.
func (d *Guest) serve() {
	for {
		if !d.awaitMessage() {
			return // handed over: the connection lives on elsewhere
		}
		m, err := ReadMessage(d.conn)
		if err != nil {
			d.msgDone()
			if errors.Is(err, errEOF) || !errors.Is(err, ErrMalformed) {
				if e := d.lifeLog(logrus.InfoLevel); e != nil {
					e.WithError(err).Info("front-end disconnected")
				}
			} else {
				d.stats.badMessages.Add(1)
				if e := d.lifeLog(logrus.WarnLevel); e != nil {
					e.WithError(err).Warn("bad message: closing the connection")
				}
			}
			return
		}
		d.stats.messages.Add(1)
		if e := d.traceLog(); e != nil {
			e.Debugf("%s flags %#x size %d fds %d", RequestName(m.Request), m.Flags, len(m.Payload), len(m.FDs))
		}
		goOn := d.dispatch(m)
		d.msgDone()
		if !goOn {
			return
		}
	}
}

// dispatch handles one message and reports whether the connection goes on.
func (d *Guest) dispatch(m *Message) (goOn bool) {
	defer func() {
		if r := recover(); r != nil {
			d.stats.badMessages.Add(1)
			if e := d.lifeLog(logrus.ErrorLevel); e != nil {
				e.Errorf("panic handling %s: %v\n%s", RequestName(m.Request), r, debug.Stack())
			}
			goOn = false
		}
	}()
	known, err := validateFrontend(m)
	if err != nil {
		m.CloseFDs()
		d.stats.badMessages.Add(1)
		if e := d.lifeLog(logrus.WarnLevel); e != nil {
			e.WithError(err).Warn("bad message: closing the connection")
		}
		return false
	}
	if !known {
		m.CloseFDs()
		d.stats.badMessages.Add(1)
		if e := d.guestLog(logrus.WarnLevel); e != nil {
			e.Warnf("unknown request %d (%d bytes), ignored", m.Request, len(m.Payload))
		}
		return d.ack(m, errors.New("unknown request"))
	}
	reply, hasReply, err := d.handle(m)
	m.CloseFDs() // whatever handle did not take
	if err != nil {
		d.stats.badMessages.Add(1)
		var f fatalError
		if errors.As(err, &f) {
			if e := d.lifeLog(logrus.WarnLevel); e != nil {
				e.WithError(err).Warnf("%s: closing the connection", RequestName(m.Request))
			}
			return false
		}
		if e := d.guestLog(logrus.WarnLevel); e != nil {
			e.WithError(err).Warnf("%s refused", RequestName(m.Request))
		}
	}
	if hasReply {
		if werr := WriteMessage(d.conn, m.Request, flagVersion|flagReply, reply, nil); werr != nil {
			if e := d.lifeLog(logrus.InfoLevel); e != nil {
				e.WithError(werr).Info("reply failed")
			}
			return false
		}
		return true
	}
	return d.ack(m, err)
}

// ack sends the REPLY_ACK status when the front-end asked for one.
func (d *Guest) ack(m *Message, err error) bool {
	if !m.NeedReply() || !d.protoAcked(ProtocolReplyAck) {
		return true
	}
	var st uint64
	if err != nil {
		st = 1
	}
	if werr := WriteMessage(d.conn, m.Request, flagVersion|flagReply, u64(st), nil); werr != nil {
		if e := d.lifeLog(logrus.InfoLevel); e != nil {
			e.WithError(werr).Info("reply failed")
		}
		return false
	}
	return true
}

func le32(b []byte) uint32 { return binary.LittleEndian.Uint32(b) }
func le64(b []byte) uint64 { return binary.LittleEndian.Uint64(b) }

// takeFD removes and returns the message's first fd, so CloseFDs leaves it.
func takeFD(m *Message) int {
	if len(m.FDs) == 0 {
		return -1
	}
	fd := m.FDs[0]
	m.FDs = m.FDs[1:]
	return fd
}

func (d *Guest) queueIndex(i uint32) (*Queue, error) {
	if int64(i) >= int64(len(d.queues)) {
		return nil, fmt.Errorf("queue index %d out of range (%d queues)", i, len(d.queues))
	}
	return d.queues[i], nil
}

// handle carries out one validated request. Every change to the memory
// table, rings or queue fds happens under the device's lock (d.lock), so no
// HandleQueue of this device runs meanwhile; other devices go on. Starting and stopping the
// device and its queue goroutines happens in reconcile.
func (d *Guest) handle(m *Message) (reply []byte, hasReply bool, err error) {
	p := m.Payload
	switch m.Request {
	case ReqGetFeatures:
		return u64(d.offeredFeatures), true, nil

	case ReqSetFeatures:
		f := le64(p)
		if f&^d.offeredFeatures != 0 {
			return nil, false, fmt.Errorf("features %#x not offered (%#x)", f, d.offeredFeatures)
		}
		d.lock(func() {
			d.ackedFeatures = f
			for _, q := range d.queues {
				q.eventIdx = f&(1<<FeatureRingEventIdx) != 0
				q.indirectOK = f&(1<<FeatureRingIndirectDesc) != 0
			}
		})
		return nil, false, nil

	case ReqGetProtocolFeatures:
		return u64(d.offeredProto), true, nil

	case ReqSetProtocolFeatures:
		f := le64(p)
		if f&^d.offeredProto != 0 {
			return nil, false, fmt.Errorf("protocol features %#x not offered (%#x)", f, d.offeredProto)
		}
		d.ackedProto.Store(f)
		if e := d.traceLog(); e != nil {
			e.Debugf("protocol features acked %#x", f)
		}
		return nil, false, nil

	case ReqSetOwner:
		return nil, false, nil

	case ReqResetOwner, ReqResetDevice:
		d.resetDevice()
		return nil, false, nil

	case ReqGetQueueNum:
		return u64(uint64(len(d.queues))), true, nil

	case ReqGetMaxMemSlots:
		return u64(uint64(d.maxMemRegions)), true, nil

	case ReqSetBackendReqFD:
		fd := takeFD(m)
		if err := d.setBackendChannel(fd); err != nil {
			return nil, false, err
		}
		return nil, false, nil

	case ReqSetMemTable:
		return nil, false, d.setMemTable(m)

	case ReqAddMemReg:
		return nil, false, d.addMemReg(m)

	case ReqRemMemReg:
		return nil, false, d.remMemReg(p[8:])

	case ReqSetVringNum:
		q, err := d.queueIndex(le32(p[0:4]))
		if err != nil {
			return nil, false, err
		}
		n := le32(p[4:8])
		if n == 0 || n > MaxQueueSize || n&(n-1) != 0 {
			return nil, false, fmt.Errorf("queue %d size %d", q.index, n)
		}
		d.lock(func() {
			q.size = uint16(n)
			// The old addresses may not fit the new size; SET_VRING_ADDR
			// follows and decides.
			if terr := q.translate(d.Memory()); terr != nil {
				if e := d.traceLog(); e != nil {
					e.WithError(terr).Debug("ring does not translate with the new size yet")
				}
			}
		})
		d.reconcile()
		return nil, false, nil

	case ReqSetVringAddr:
		q, err := d.queueIndex(le32(p[0:4]))
		if err != nil {
			return nil, false, err
		}
		d.lock(func() {
			q.descAddr, q.usedAddr, q.availAddr = le64(p[8:16]), le64(p[16:24]), le64(p[24:32])
			q.addrSet = true
			q.broken = false
			err = q.translate(d.Memory())
		})
		d.reconcile()
		return nil, false, err

	case ReqSetVringBase:
		q, err := d.queueIndex(le32(p[0:4]))
		if err != nil {
			return nil, false, err
		}
		base := le32(p[4:8])
		if base > 0xffff {
			return nil, false, fmt.Errorf("queue %d base %d", q.index, base)
		}
		d.lock(func() {
			q.lastAvail, q.usedIdx = uint16(base), uint16(base)
			q.signalValid, q.broken = false, false
		})
		return nil, false, nil

	case ReqGetVringBase:
		i := le32(p[0:4])
		q, err := d.queueIndex(i)
		if err != nil {
			// A GET must be answered or QEMU waits for ever.
			return nil, false, fatal(err)
		}
		// Stop the ring first so lastAvail no longer moves.
		d.lock(func() { q.enabled = false })
		d.reconcile()
		var base uint16
		d.lock(func() {
			base = q.lastAvail
			q.setKick(-1)
		})
		r := make([]byte, 8)
		binary.LittleEndian.PutUint32(r[0:4], i)
		binary.LittleEndian.PutUint32(r[4:8], uint32(base))
		return r, true, nil

	case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		v := le64(p)
		q, err := d.queueIndex(uint32(v & 0xff))
		if err != nil {
			return nil, false, err
		}
		fd := -1
		if v&vringFDNoFD == 0 {
			fd = takeFD(m)
		}
		switch m.Request {
		case ReqSetVringKick:
			// The kick goroutine reads a dup of the fd: stop it before
			// the fd changes.
			d.stopRunner(q.index)
			d.lock(func() {
				q.setKick(fd)
				if !d.protocolFeaturesAcked() {
					// Without VHOST_USER_F_PROTOCOL_FEATURES a ring
					// starts when it gets its kick fd.
					q.enabled = true
				}
			})
			if fd < 0 {
				if e := d.guestLog(logrus.WarnLevel); e != nil {
					e.Warnf("queue %d: polling mode (no kick fd) is not supported", q.index)
				}
			}
		case ReqSetVringCall:
			// Interrupt writes the call fd from any VM's queue
			// goroutine (a MOVE's signal): a write that blocks (a
			// full pipe given as call fd) would stall that VM.
			// Nonblocking, a full fd just means an interrupt is
			// already pending.
			if fd >= 0 {
				if err := unix.SetNonblock(fd, true); err != nil {
					closeFD(fd)
					return nil, false, fmt.Errorf("queue %d call fd: %w", q.index, err)
				}
			}
			d.lock(func() { q.setCall(fd) })
		case ReqSetVringErr:
			d.lock(func() {
				if q.errFD >= 0 {
					closeFD(q.errFD)
				}
				q.errFD = fd
			})
		}
		d.reconcile()
		return nil, false, nil

	case ReqSetVringEnable:
		q, err := d.queueIndex(le32(p[0:4]))
		if err != nil {
			return nil, false, err
		}
		on := le32(p[4:8])
		if on > 1 {
			return nil, false, fmt.Errorf("queue %d enable %d", q.index, on)
		}
		d.lock(func() {
			q.enabled = on == 1
		})
		d.reconcile()
		return nil, false, nil

	case ReqGetConfig:
		off, size := le32(p[0:4]), le32(p[4:8])
		r := make([]byte, configHdrSize+int(size))
		copy(r, p[:configHdrSize])
		var cerr error
		if d.call("ReadConfig", func() { cerr = d.backend.ReadConfig(off, r[configHdrSize:]) }) {
			return nil, false, fatal(errors.New("Backend.ReadConfig panicked"))
		}
		if cerr != nil {
			// A config header with size 0 tells QEMU the read failed.
			binary.LittleEndian.PutUint32(r[4:8], 0)
			return r[:configHdrSize], true, fmt.Errorf("GET_CONFIG %d+%d: %w", off, size, cerr)
		}
		return r, true, nil

	case ReqSetConfig:
		off := le32(p[0:4])
		var cerr error
		if d.call("WriteConfig", func() { cerr = d.backend.WriteConfig(off, p[configHdrSize:]) }) {
			return nil, false, fatal(errors.New("Backend.WriteConfig panicked"))
		}
		return nil, false, cerr

	case ReqSetStatus:
		v := le64(p)
		if v > 0xff {
			return nil, false, fmt.Errorf("status %#x", v)
		}
		d.status = uint8(v)
		if e := d.traceLog(); e != nil {
			e.Debugf("status %#x", v)
		}
		if v == 0 {
			// A virtio reset: the rings are gone until the driver sets
			// them up and QEMU enables them again. The fds QEMU set at
			// realize (call, err) stay: it does not send them again.
			d.lock(func() {
				for _, q := range d.queues {
					q.enabled = false
				}
			})
		}
		d.reconcile()
		return nil, false, nil

	case ReqGetStatus:
		return u64(uint64(d.status)), true, nil

	case ReqGetShmemConfig:
		sizes := d.shmemSizes
		if !d.protoAcked(ProtocolShmem) {
			sizes = nil
		}
		r := make([]byte, 8+8*len(sizes))
		binary.LittleEndian.PutUint32(r[0:4], uint32(len(sizes)))
		for i, s := range sizes {
			binary.LittleEndian.PutUint64(r[8+8*i:], s)
		}
		return r, true, nil
	}
	return nil, false, fmt.Errorf("request %d not handled", m.Request)
}

func (d *Guest) protocolFeaturesAcked() bool {
	return d.ackedFeatures&(1<<FeatureProtocolFeatures) != 0
}

// call runs a Backend method, turning a panic into a closed connection.
// It reports whether fn panicked.
func (d *Guest) call(what string, fn func()) (panicked bool) {
	defer func() {
		if r := recover(); r != nil {
			if e := d.lifeLog(logrus.ErrorLevel); e != nil {
				e.Errorf("panic in Backend.%s: %v\n%s", what, r, debug.Stack())
			}
			d.Close()
			panicked = true
		}
	}()
	fn()
	return false
}

// lock runs fn under the device's lock, exclusively.
func (d *Guest) lock(fn func()) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fn()
}

// --- memory table ------------------------------------------------------------

func decodeRegion(b []byte) *MemoryRegion {
	return &MemoryRegion{
		GuestPhysAddr: le64(b[0:8]),
		Size:          le64(b[8:16]),
		UserAddr:      le64(b[16:24]),
		MmapOffset:    le64(b[24:32]),
		fd:            -1,
	}
}

// ErrMemoryCap refuses a memory table beyond the connection's caps
// (Server.MaxMemBytes, Server.MaxMemRegions).
var ErrMemoryCap = errors.New("vhost-user: memory table beyond this connection's caps")

// checkMemCaps refuses a table of n regions and size bytes in all; it runs
// before anything is mapped.
func (d *Guest) checkMemCaps(n int, size uint64, overflow bool) error {
	if n > d.maxMemRegions {
		return fmt.Errorf("%w: %d regions, at most %d", ErrMemoryCap, n, d.maxMemRegions)
	}
	if overflow || size > d.maxMemBytes {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrMemoryCap, size, d.maxMemBytes)
	}
	return nil
}

// addSize adds region sizes, reporting overflow.
func addSize(total, size uint64, overflow bool) (uint64, bool) {
	return total + size, overflow || total+size < total
}

func (d *Guest) setMemTable(m *Message) error {
	n := int(le32(m.Payload[0:4]))
	var total uint64
	var overflow bool
	for i := 0; i < n; i++ {
		total, overflow = addSize(total, decodeRegion(m.Payload[8+i*memRegionSize:]).Size, overflow)
	}
	if err := d.checkMemCaps(n, total, overflow); err != nil {
		return err
	}
	regions := make([]*MemoryRegion, 0, n)
	fail := func(err error) error {
		for _, r := range regions {
			r.unmap()
		}
		return err
	}
	for i := 0; i < n; i++ {
		fd := takeFD(m)
		r, err := mapRegion(decodeRegion(m.Payload[8+i*memRegionSize:]), fd)
		if err != nil {
			return fail(err)
		}
		regions = append(regions, r)
	}
	next, err := newMemory(regions)
	if err != nil {
		return fail(err)
	}
	d.swapMemory(next)
	if e := d.traceLog(); e != nil {
		e.Debugf("memory table: %d regions", n)
	}
	return nil
}

func (d *Guest) addMemReg(m *Message) error {
	want := decodeRegion(m.Payload[8:])
	old := d.Memory().Regions()
	var total uint64
	var overflow bool
	for _, r := range old {
		if r.GuestPhysAddr == want.GuestPhysAddr && r.Size == want.Size && r.UserAddr == want.UserAddr {
			// The same region again (a front-end that lost track of
			// its table): nothing changes.
			return nil
		}
		total, overflow = addSize(total, r.Size, overflow)
	}
	total, overflow = addSize(total, want.Size, overflow)
	if err := d.checkMemCaps(len(old)+1, total, overflow); err != nil {
		return err
	}
	fd := takeFD(m)
	r, err := mapRegion(want, fd)
	if err != nil {
		return err
	}
	regions := append(append(make([]*MemoryRegion, 0, len(old)+1), old...), r)
	next, err := newMemory(regions)
	if err != nil {
		r.unmap()
		return err
	}
	d.swapMemory(next)
	return nil
}

func (d *Guest) remMemReg(b []byte) error {
	want := decodeRegion(b)
	old := d.Memory().Regions()
	regions := make([]*MemoryRegion, 0, len(old))
	found := false
	for _, r := range old {
		if !found && r.GuestPhysAddr == want.GuestPhysAddr && r.Size == want.Size && r.UserAddr == want.UserAddr {
			found = true
			continue
		}
		regions = append(regions, r)
	}
	if !found {
		return fmt.Errorf("REM_MEM_REG: no region %#x+%#x", want.GuestPhysAddr, want.Size)
	}
	next, _ := newMemory(regions)
	d.swapMemory(next)
	return nil
}

// swapMemory installs next as the memory table and re-translates the rings,
// under the device's lock: it waits for this device's batch in progress,
// never for another device. The old table is not waited for: its regions
// that next does not keep are unmapped when its last user (a peer's MOVE
// into this VM) releases it, or here if it has none.
func (d *Guest) swapMemory(next *Memory) {
	d.lock(func() {
		d.setMemory(next)
		for _, q := range d.queues {
			if err := q.translate(next); err != nil {
				if e := d.guestLog(logrus.WarnLevel); e != nil {
					e.WithError(err).Warn("ring does not translate in the new memory table")
				}
			}
		}
	})
	d.reconcile()
}
