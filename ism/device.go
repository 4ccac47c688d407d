package ism

import (
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/dmb"
)

// Device is one guest's ISM device on a fabric. Its methods may be called
// concurrently from any goroutine.
type Device struct {
	f    *Fabric
	name string
	gid  uint64
	n    Notifier
	log  *logrus.Entry

	// Fixed at connect: the modes offered and attach mode's mapper and limits.
	modes     uint16
	mapper    Mapper
	maxMapped uint64
	maxAttach uint64
	att       attachState // guarded by f.amu

	connectedAt time.Time // when Connect made it

	closed         atomic.Bool // set at the start of Disconnect
	disconnectOnce sync.Once

	mu         sync.RWMutex
	gone       bool // Disconnect has taken the device off: mem is nil
	mem        Memory
	sbaSet     bool
	sbaGPA     uint64
	interrupts bool
	beats      atomic.Uint32        // the last heartbeat stored (Beat)
	dmbs       map[uint64]*dmbEntry // own live DMBs by token
	rgids      map[uint64]int       // own live DMBs by rgid: the GIDs SIGNAL may reach
	indices    dmb.IndexSet

	stats counters
	lim   *limiter      // its name's: a guest's resets get no fresh allowance
	sig   *signalBucket // its name's, for the same reason
}

// GID is the device's GID.
func (d *Device) GID() uint64 { return d.gid }

// Name is the guest's name given to Connect.
func (d *Device) Name() string { return d.name }

// Fabric is the fabric the device is (or was) connected to.
func (d *Device) Fabric() *Fabric { return d.f }

// Stats returns the device's counters.
func (d *Device) Stats() Stats {
	s := d.stats.snapshot()
	d.mu.RLock()
	s.DMBs = uint64(len(d.dmbs))
	d.mu.RUnlock()
	d.f.amu.Lock()
	d.gaugesLocked(&s)
	d.f.amu.Unlock()
	return s
}

// gaugesLocked fills in the attach-mode gauges; f.amu is held.
func (d *Device) gaugesLocked(s *Stats) {
	s.AttachDMBs += uint64(d.att.owned)
	s.AttachBytes += d.att.ownedBytes
	s.Attached += uint64(len(d.att.attached))
	s.MappedBytes += d.att.mapped
}

// CountBadChain counts a request chain the transport refused before it
// reached Handle (Stats.BadChains), or, with queueBroken, a request queue
// the driver broke (Stats.QueuesBroken). The transport logs them.
func (d *Device) CountBadChain(queueBroken bool) {
	if queueBroken {
		d.stats.queuesBroken.Add(1)
		return
	}
	d.stats.badChains.Add(1)
}

// Handle carries out one request from the device's driver. data are the MOVE
// data segments, in order; their total length must equal req.Len, and other
// ops must carry none. Refusals are counted and logged (rate-limited).
func (d *Device) Handle(req abi.Request, data [][]byte) abi.Response {
	var resp abi.Response
	var err error
	if req.Op != abi.OpMove && totalLen(data) != 0 {
		resp.Status = statusOf(d.refuse(req, abi.StatusInvalid, "data on a request that takes none"))
		return resp
	}
	switch req.Op {
	case abi.OpRegisterDMB:
		resp.Index = req.Index
		switch {
		case req.Flags&^abi.FlagAttach != 0:
			err = d.refuse(req, abi.StatusInvalid, "unknown flags")
		case req.Flags&abi.FlagAttach == 0:
			resp.Value, err = d.RegisterDMB(req.Addr, req.Len, req.GID, req.Index)
		case req.Addr != 0:
			err = d.refuse(req, abi.StatusInvalid, "attach-mode DMB with a guest address")
		default:
			var off uint64
			resp.Value, off, err = d.RegisterAttachDMB(req.Len, req.GID, req.Index)
			if err == nil {
				resp.Index = uint32(off / abi.ShmPage) // the region is at most 16 TiB (ConnectDevice)
			}
		}
	case abi.OpUnregisterDMB:
		if req.Flags != 0 {
			err = d.refuse(req, abi.StatusInvalid, "unknown flags")
			break
		}
		err = d.UnregisterDMB(req.Token)
	case abi.OpMove:
		if req.Flags&^abi.FlagSignal != 0 {
			err = d.refuse(req, abi.StatusInvalid, "unknown flags")
			break
		}
		if totalLen(data) != req.Len {
			err = d.refuse(req, abi.StatusInvalid, "data length differs from len")
			break
		}
		err = d.Move(req.Token, req.Index, req.Offset, req.Flags&abi.FlagSignal != 0, data)
	case abi.OpSignal:
		if req.Flags != 0 {
			err = d.refuse(req, abi.StatusInvalid, "unknown flags")
			break
		}
		if req.Index > 0xFFFF {
			err = d.refuse(req, abi.StatusRange, "event code over 16 bits")
			break
		}
		err = d.Signal(req.GID, uint16(req.Index), req.Offset)
	case abi.OpQueryRGID:
		if req.Flags != 0 {
			err = d.refuse(req, abi.StatusInvalid, "unknown flags")
			break
		}
		err = d.QueryRGID(req.GID)
	case abi.OpSetSBA:
		if req.Flags&^abi.FlagInterrupts != 0 {
			err = d.refuse(req, abi.StatusInvalid, "unknown flags")
			break
		}
		err = d.SetSBA(req.Addr, req.Flags&abi.FlagInterrupts != 0)
	case abi.OpAttachDMB:
		if req.Flags != 0 {
			err = d.refuse(req, abi.StatusInvalid, "unknown flags")
			break
		}
		var n uint64
		resp.Value, n, err = d.Attach(req.Token)
		resp.Index = uint32(n) // at most abi.MaxDMBSize
	case abi.OpDetachDMB:
		if req.Flags != 0 {
			err = d.refuse(req, abi.StatusInvalid, "unknown flags")
			break
		}
		err = d.Detach(req.Token)
	default:
		err = d.refuse(req, abi.StatusUnsupported, "unknown op")
	}
	resp.Status = statusOf(err)
	if resp.Status != abi.StatusOK {
		resp.Value = 0
		if req.Op != abi.OpRegisterDMB {
			resp.Index = 0
		}
	}
	return resp
}

func totalLen(data [][]byte) uint64 {
	var n uint64
	for _, s := range data {
		n += uint64(len(s))
	}
	return n
}

// statusOf maps an error of this package to the status a driver sees.
func statusOf(err error) abi.Status {
	if err == nil {
		return abi.StatusOK
	}
	if st, ok := err.(abi.Status); ok {
		return st
	}
	return abi.StatusInternal
}

// SetSBA sets where the device's signalling block lives in guest RAM
// (abi.SBASize bytes, abi.SBAAlign-aligned) and whether signals raise interrupts.
// The device does not clear the block: it is the driver's memory.
func (d *Device) SetSBA(gpa uint64, interrupts bool) error {
	var flags uint16
	if interrupts {
		flags = abi.FlagInterrupts
	}
	req := abi.Request{Op: abi.OpSetSBA, Addr: gpa, Flags: flags}
	if d.closed.Load() {
		return d.refuse(req, abi.StatusNotReady, "device disconnected")
	}
	if gpa%abi.SBAAlign != 0 {
		return d.refuse(req, abi.StatusInvalid, "SBA not page-aligned")
	}
	if dmb.AddOverflows(gpa, abi.SBASize) {
		return d.refuse(req, abi.StatusFault, "SBA wraps the address space")
	}
	st, why := func() (abi.Status, string) {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.gone {
			return abi.StatusNotReady, "device disconnected"
		}
		mem := d.mem.Acquire()
		defer mem.Release()
		sba, err := mem.Bytes(gpa, abi.SBASize)
		if err != nil || len(sba) < abi.SBASize {
			return abi.StatusFault, "SBA outside guest RAM"
		}
		// The atomics of a signal need the host view aligned too; a
		// mapping is page-aligned, so this fails only on a broken Memory.
		if _, err := abi.NewSBA(sba); err != nil {
			return abi.StatusInternal, "host view of the SBA is misaligned"
		}
		d.sbaGPA, d.sbaSet, d.interrupts = gpa, true, interrupts
		return abi.StatusOK, ""
	}()
	if st != abi.StatusOK {
		return d.refuse(req, st, why)
	}
	return nil
}

// RegisterDMB registers a copy-mode DMB: length bytes of this device's guest
// RAM at gpa, which only the device with GID rgid may MOVE into (rgid may be
// this device's own GID: both ends of an SMC-D connection in one guest), and
// whose signals set bit index of the SBA. It returns the DMB's token.
func (d *Device) RegisterDMB(gpa, length, rgid uint64, index uint32) (uint64, error) {
	req := abi.Request{Op: abi.OpRegisterDMB, Addr: gpa, Len: length, GID: rgid, Index: index}
	if d.closed.Load() {
		return 0, d.refuse(req, abi.StatusNotReady, "device disconnected")
	}
	if d.modes&abi.ModeCopy == 0 {
		return 0, d.refuse(req, abi.StatusUnsupported, "copy mode not offered")
	}
	if rgid == 0 {
		return 0, d.refuse(req, abi.StatusInvalid, "rgid 0")
	}
	if length == 0 || length > abi.MaxDMBSize {
		return 0, d.refuse(req, abi.StatusRange, "DMB length out of range")
	}
	if index >= abi.MaxDMBs {
		return 0, d.refuse(req, abi.StatusRange, "DMB index out of range")
	}
	if dmb.AddOverflows(gpa, length) {
		return 0, d.refuse(req, abi.StatusFault, "DMB wraps the address space")
	}
	tok, st, why := d.register(gpa, length, rgid, index)
	if st != abi.StatusOK {
		return 0, d.refuse(req, st, why)
	}
	d.stats.registered.Add(1)
	return tok, nil
}

func (d *Device) register(gpa, length, rgid uint64, index uint32) (uint64, abi.Status, string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gone {
		return 0, abi.StatusNotReady, "device disconnected"
	}
	mem := d.mem.Acquire()
	_, err := mem.Bytes(gpa, length)
	mem.Release()
	if err != nil {
		return 0, abi.StatusFault, "DMB outside guest RAM"
	}
	if d.indices.Has(index) {
		return 0, abi.StatusBusy, "DMB index in use"
	}
	if len(d.dmbs) >= int(d.f.deviceLimit.Load()) {
		d.stats.dmbLimitRefused.Add(1)
		return 0, abi.StatusNoSpace, whyDMBLimit
	}
	e := &dmbEntry{owner: d, rgid: rgid, gpa: gpa, size: length, index: index, live: true}
	// The entry is visible to MOVEs from here, but they wait for d.mu.
	tok, err := d.f.dmbs.Add(e, int(d.f.fabricLimit.Load()))
	if err != nil {
		if st, ok := err.(abi.Status); ok {
			return 0, st, "fabric DMB limit"
		}
		return 0, abi.StatusInternal, "token allocation failed: " + err.Error()
	}
	_ = d.indices.Claim(index) // checked free above, under the same lock
	d.addLocked(tok, e)
	return tok, abi.StatusOK, ""
}

// UnregisterDMB removes one of this device's DMBs. When it returns, no MOVE
// writes into the DMB any more: the driver may reuse the memory.
func (d *Device) UnregisterDMB(token uint64) error {
	req := abi.Request{Op: abi.OpUnregisterDMB, Token: token}
	if d.closed.Load() {
		return d.refuse(req, abi.StatusNotReady, "device disconnected")
	}
	e, ok := d.f.dmbs.Get(token)
	if !ok {
		return d.refuse(req, abi.StatusNoEntry, "unknown token")
	}
	if e.owner != d {
		return d.refuse(req, abi.StatusPermission, "not the DMB's owner")
	}
	if e.buf != nil {
		return d.unregisterAttach(req, e)
	}
	d.mu.Lock()
	live := e.live
	if live {
		e.live = false
		d.indices.Release(e.index)
		d.removeLocked(token, e)
		d.f.dmbs.Delete(token)
	}
	d.mu.Unlock()
	if !live {
		return d.refuse(req, abi.StatusNoEntry, "DMB already gone")
	}
	return nil
}

// Move copies data (its segments in order, len = their total) into the DMB
// with that token at offset, on behalf of this device, which must be the
// DMB's rgid. With signal it then counts the signal in the owner's SBA
// (abi.SBA.Signal) and interrupts the owner if it asked for interrupts.
//
// A refused MOVE changes nothing: every check, including the translation of
// the owner's DMB and SBA, happens before the first byte is copied. In
// particular a signalled MOVE to an owner without an SBA copies no data.
// Move does not allocate.
func (d *Device) Move(token uint64, dmbe uint32, offset uint64, signal bool, data [][]byte) error {
	n := totalLen(data)
	if d.closed.Load() {
		return d.refuse(moveReq(token, dmbe, offset, n, signal), abi.StatusNotReady, "device disconnected")
	}
	if dmbe >= abi.MaxDMBEs {
		return d.refuse(moveReq(token, dmbe, offset, n, signal), abi.StatusRange, "DMBE index out of range")
	}
	e, ok := d.f.dmbs.Get(token)
	if !ok {
		return d.refuse(moveReq(token, dmbe, offset, n, signal), abi.StatusNoEntry, "unknown token")
	}
	if e.rgid != d.gid {
		return d.refuse(moveReq(token, dmbe, offset, n, signal), abi.StatusPermission, "sender is not the DMB's rgid")
	}
	if dmb.CheckRange(offset, n, e.size) != nil {
		return d.refuse(moveReq(token, dmbe, offset, n, signal), abi.StatusRange, "offset+len past the DMB")
	}
	var late *fault // a delay fault holding this MOVE's signal
	asked := signal
	if d.f.faultsOn.Load() {
		if st := d.f.moveFault(d, e, token); st != abi.StatusOK {
			return d.refuse(moveReq(token, dmbe, offset, n, signal), st, "fault injection: MOVE failed")
		}
		if signal {
			var drop bool
			drop, late = d.f.signalFault(d, e.owner)
			signal = !drop && late == nil
		}
	}
	st, raised := e.owner.moveShared(e, dmbe, offset, n, signal, data)
	if st != abi.StatusOK {
		return d.refuse(moveReq(token, dmbe, offset, n, signal), st, moveWhy(st))
	}
	if late != nil {
		late.hold(heldSignal{owner: e.owner, e: e, dmbe: dmbe})
	}
	d.stats.moves.Add(1)
	d.stats.moveBytes.Add(n)
	if asked {
		d.stats.signals.Add(1)
	}
	if raised {
		e.owner.stats.interrupts.Add(1)
	}
	return nil
}

func moveReq(token uint64, dmbe uint32, offset, n uint64, signal bool) abi.Request {
	r := abi.Request{Op: abi.OpMove, Token: token, Index: dmbe, Offset: offset, Len: n}
	if signal {
		r.Flags = abi.FlagSignal
	}
	return r
}

func moveWhy(st abi.Status) string {
	switch st {
	case abi.StatusNoEntry:
		return "DMB gone"
	case abi.StatusNotReady:
		return "signalled MOVE but the owner set no SBA"
	case abi.StatusFault:
		return "owner's DMB or SBA no longer in guest RAM"
	}
	return "owner's memory view is broken"
}

// moveShared runs moveLocked with o.mu held shared. The unlock is deferred:
// the copy touches two guests' RAM, and a fault there (a memory file the
// front-end shrank) is a panic the transport recovers from, which must not
// leave the owner's lock held, or the owner's Disconnect (and everything
// waiting for it) would hang for ever.
//
// A fault in the owner's RAM is the owner's front-end's doing, not the
// sender's: it becomes StatusFault for this MOVE instead of a panic that
// would end the sender's connection. A fault in the sender's own data
// panics on, to its own transport.
func (o *Device) moveShared(e *dmbEntry, dmbe uint32, offset, n uint64, signal bool, data [][]byte) (st abi.Status, raised bool) {
	defer func() {
		if r := recover(); r != nil {
			if !faultOutside(r, data) {
				panic(r)
			}
			st, raised = abi.StatusFault, false
		}
	}()
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.moveLocked(e, dmbe, offset, n, signal, data)
}

// faultOutside reports whether r is a memory fault (debug.SetPanicOnFault)
// at an address outside the segments segs and away from the zero page (so
// that a nil dereference, a bug, still panics).
func faultOutside(r any, segs [][]byte) bool {
	f, ok := r.(interface{ Addr() uintptr })
	if !ok {
		return false
	}
	a := f.Addr()
	if a < 1<<16 {
		return false
	}
	for _, s := range segs {
		if len(s) == 0 {
			continue
		}
		p := uintptr(unsafe.Pointer(&s[0]))
		if a >= p && a-p < uintptr(len(s)) {
			return false
		}
	}
	return true
}

// Beat adds one to the heartbeat in the device's SBA (abi.SBA.Beat), if the
// driver has set one, and says whether it did. Call it every
// Config.HeartbeatMS from one goroutine. The SBA is written through a view
// of the guest's memory acquired for this beat, as a MOVE does. The count
// is the device's own, never read back from guest memory.
func (d *Device) Beat() bool {
	d.mu.RLock() // as a MOVE: keeps mem and the SBA as checked
	defer d.mu.RUnlock()
	if d.gone || !d.sbaSet {
		return false
	}
	mem := d.mem.Acquire()
	defer mem.Release()
	b, err := mem.Bytes(d.sbaGPA, abi.SBASize)
	if err != nil {
		return false
	}
	sba, err := abi.NewSBA(b)
	if err != nil {
		return false
	}
	sba.Beat(d.beats.Add(1))
	return true
}

// moveLocked does the part of a MOVE that touches the owner's RAM; o.mu is
// held shared, so the DMB, the SBA and o.mem stay as checked. The owner's
// RAM is used through one view of its memory table for this MOVE: the
// owner's transport may install a new table meanwhile, without waiting,
// and the old one stays mapped until the view's release.
func (o *Device) moveLocked(e *dmbEntry, dmbe uint32, offset, n uint64, signal bool, data [][]byte) (abi.Status, bool) {
	if !e.live {
		return abi.StatusNoEntry, false
	}
	mem := o.mem.Acquire()
	defer mem.Release() // deferred: a fault in the copy panics through here
	var sba abi.SBA
	if signal {
		if !o.sbaSet {
			return abi.StatusNotReady, false
		}
		// Translated per MOVE: the memory table may have changed since
		// SET_SBA, and a stale view must never be written.
		b, err := mem.Bytes(o.sbaGPA, abi.SBASize)
		if err != nil {
			return abi.StatusFault, false
		}
		if sba, err = abi.NewSBA(b); err != nil {
			return abi.StatusInternal, false
		}
	}
	if n > 0 && e.buf != nil {
		// Attach mode: the memfd, open while e.live (offset+n <= e.size).
		dst := e.buf.Bytes()[offset : offset+n]
		for _, s := range data {
			dst = dst[copy(dst, s):]
		}
	} else if n > 0 {
		// e.gpa+e.size did not wrap at register time and offset+n <= e.size.
		dst, err := mem.Bytes(e.gpa+offset, n)
		if err != nil {
			return abi.StatusFault, false
		}
		if uint64(len(dst)) < n {
			return abi.StatusInternal, false
		}
		for _, s := range data {
			dst = dst[copy(dst, s):]
		}
	}
	if !signal {
		return abi.StatusOK, false
	}
	// Counters only the device writes (ABI v2): the driver compares them
	// with its own copies, so nothing it does can lose this signal. The
	// interrupt is raised for every signal: coalescing it on a word the
	// driver clears would bring back a word both sides write.
	sba.Signal(e.index, dmbe)
	if !o.interrupts {
		return abi.StatusOK, false
	}
	o.n.Interrupt()
	return abi.StatusOK, true
}

// QueryRGID reports (nil) whether a device with GID rgid is on the fabric.
func (d *Device) QueryRGID(rgid uint64) error {
	req := abi.Request{Op: abi.OpQueryRGID, GID: rgid}
	if d.closed.Load() {
		return d.refuse(req, abi.StatusNotReady, "device disconnected")
	}
	if rgid == 0 || d.f.device(rgid) == nil {
		return d.refuse(req, abi.StatusNoEntry, "rgid not connected")
	}
	return nil
}

// SetMemory replaces the device's view of its guest RAM (a new memory table).
// When it returns, no call of this package uses the old Memory any more.
// DMBs and the SBA keep their guest-physical addresses and are translated
// through mem from the next MOVE on.
func (d *Device) SetMemory(mem Memory) {
	d.mu.Lock()
	if !d.gone && mem != nil {
		d.mem = mem
	}
	d.mu.Unlock()
}

// addLocked makes e, registered under tok, one of d's live DMBs; d.mu is
// held.
func (d *Device) addLocked(tok uint64, e *dmbEntry) {
	d.dmbs[tok] = e
	d.rgids[e.rgid]++
}

// removeLocked takes the DMB tok out of d's live DMBs; d.mu is held.
func (d *Device) removeLocked(tok uint64, e *dmbEntry) {
	delete(d.dmbs, tok)
	if d.rgids[e.rgid]--; d.rgids[e.rgid] <= 0 {
		delete(d.rgids, e.rgid)
	}
}

// dropDMBs kills all of the device's DMBs and forgets its SBA; d.mu is held.
// It returns the dead DMBs by token.
func (d *Device) dropDMBsLocked() map[uint64]*dmbEntry {
	old := d.dmbs
	for tok, e := range old {
		e.live = false
		d.f.dmbs.Delete(tok)
	}
	d.dmbs = make(map[uint64]*dmbEntry)
	clear(d.rgids)
	d.indices.Clear()
	d.sbaSet, d.sbaGPA, d.interrupts = false, 0, false
	return old
}

// dropAttachLocked ends the attach-mode state of a device being
// disconnected: old are its dead DMBs. f.amu and d.mu are held. It returns
// the other devices' mappings of those DMBs, for afterRevoke, and their
// buffers, to close once no lock is held (no MOVE uses them: they are dead
// under d.mu).
func (d *Device) dropAttachLocked(old map[uint64]*dmbEntry) ([]*attachment, []*dmb.Buffer) {
	var revoked []*attachment
	var bufs []*dmb.Buffer
	for _, e := range old {
		if e.buf == nil {
			continue
		}
		for _, a := range e.revokeLocked() {
			// Our own mappings went with the front-end's reset or
			// disconnect, which is what disconnected us.
			if a.dev != d {
				revoked = append(revoked, a)
			}
		}
		bufs = append(bufs, e.buf)
	}
	for _, a := range d.att.attached {
		delete(a.e.attachers, d)
	}
	d.att = attachState{gen: d.att.gen + 1}
	return revoked, bufs
}

func closeBuffers(bufs []*dmb.Buffer) {
	for _, b := range bufs {
		b.Close()
	}
}

// Disconnect takes the device off the fabric: its GID becomes free, its DMBs
// go away (their tokens are dead), and every other device that could write
// one of its DMBs, or owns a DMB this device could write, gets one
// abi.EventGID with this device's GID. When Disconnect returns, no MOVE
// touches this device's RAM and its Notifier is not called again; later calls
// of its methods get abi.StatusNotReady.
func (d *Device) Disconnect() {
	d.disconnectOnce.Do(d.disconnect)
}

func (d *Device) disconnect() {
	d.closed.Store(true)
	f := d.f
	f.mu.Lock()
	if f.devices[d.gid] == d {
		delete(f.devices, d.gid)
	}
	f.mu.Unlock()

	f.amu.Lock()
	d.mu.Lock()
	old := d.dropDMBsLocked()
	revoked, bufs := d.dropAttachLocked(old)
	d.gone = true
	d.mem = nil
	d.mu.Unlock()
	f.amu.Unlock()
	closeBuffers(bufs)
	afterRevoke(revoked)

	peers := make(map[*Device]struct{})
	for _, e := range old {
		if e.rgid == d.gid {
			continue
		}
		if p := f.device(e.rgid); p != nil {
			peers[p] = struct{}{}
		}
	}
	f.dmbs.Range(func(_ uint64, e *dmbEntry) bool {
		if e.rgid == d.gid && e.owner != d {
			peers[e.owner] = struct{}{}
		}
		return true
	})
	for p := range peers {
		p.post(abi.Event{Type: abi.EventGID, GID: d.gid})
	}

	s := d.stats.snapshot() // counters only: the gauges are 0 now
	f.mu.Lock()
	f.retired.addStats(s)
	f.mu.Unlock()
	if e := d.lim.Entry(f.now(), d.log, logrus.DebugLevel); e != nil {
		e.WithField("peers", len(peers)).Debug("ism: device disconnected")
	}
}
