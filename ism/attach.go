package ism

import (
	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/dmb"
	"golang.org/x/sys/unix"
)

// Mapper maps attach-mode DMBs into one device's shared-memory region (the
// transport's VHOST_USER_BACKEND_SHMEM_MAP/UNMAP).
//
// Map blocks until the front-end answered. The model calls it without any
// lock of its own held, and only from RegisterAttachDMB and Attach (or
// Handle with an attach-mode REGISTER_DMB or ATTACH_DMB) of that same
// device: the transport runs those where blocking on the front-end is safe
// (not under the device lock that the front-end's SET_MEM_TABLE needs).
// An abi.Status error is passed on to the driver; others become
// StatusInternal.
//
// Unmap must not block: the model calls it from any goroutine, also with
// device locks held. The transport queues it and carries it out after every
// Map and Unmap the device asked for before (a revoked attach whose Map is
// still in flight is unmapped after that Map). It calls done once, with
// whether the front-end unmapped the range, or false if the device stopped
// first (then the front-end dropped the mapping itself); only then is the
// range handed out again.
type Mapper interface {
	Map(fd int, off, size uint64) error
	Unmap(off, size uint64, done func(ok bool))
}

// DeviceConfig is what Fabric.ConnectDevice needs beyond Connect's arguments.
type DeviceConfig struct {
	// Modes the device offers: abi.ModeCopy, abi.ModeAttach. 0 means copy.
	Modes uint16
	// Attach mode only: the device's mapper, the size of its shared-memory
	// region, how many bytes of DMBs it may have mapped at once (own DMBs
	// and attachments; 0: the region size) and how many bytes of
	// attach-mode DMBs it may own (the host memory it makes the backend
	// hold; 0: MaxMapped, which bounds them anyway, as an owner maps its
	// own DMBs).
	Mapper     Mapper
	RegionSize uint64
	MaxMapped  uint64
	MaxAttach  uint64
}

// MaxMappings bounds the mappings in one device's region (own attach-mode
// DMBs and attachments; NOSPACE beyond, and the driver falls back to copy
// mode). QEMU puts every mapping into the memory table it shares with the
// back-end (ADD_MEM_REG), whose slots vhostuser.MaxMemSlots bounds; guest
// RAM takes a few of them.
const MaxMappings = 448

// newRegion is a device's region allocator with the MaxMappings limit.
func newRegion(size uint64) (*dmb.RegionAllocator, error) {
	r, err := dmb.NewRegionAllocator(size, abi.ShmPage)
	if err != nil {
		return nil, err
	}
	r.LimitRanges(MaxMappings)
	return r, nil
}

// attachment is one mapping of an attach-mode DMB in a device's region:
// its owner's (from REGISTER_DMB) or an attacher's (ATTACH_DMB).
type attachment struct {
	dev    *Device
	e      *dmbEntry
	tok    uint64
	region *dmb.RegionAllocator // the one off came from: a late unmap frees there after dev's disconnect
	off    uint64
	size   uint64 // page-rounded mapping length
}

// unmapLater queues the unmap of a (an attachment already taken out of all
// bookkeeping), counting it and freeing its range once done.
func (a *attachment) unmapLater() {
	d := a.dev
	d.mapper.Unmap(a.off, a.size, func(ok bool) {
		if ok {
			d.stats.unmaps.Add(1)
		}
		_ = a.region.Free(a.off)
	})
}

// attachState is a device's attach-mode bookkeeping, guarded by the
// fabric's attach lock (Fabric.amu).
type attachState struct {
	region     *dmb.RegionAllocator   // nil once disconnected (late frees use attachment.region)
	attached   map[uint64]*attachment // DMBs this device attached, by token
	owned      int                    // own live attach-mode DMBs
	ownedBytes uint64                 // their memfds' bytes, and those of one being mapped (against Device.maxAttach)
	mapped     uint64                 // bytes mapped: own DMBs and attachments
	gen        uint64                 // bumped by Disconnect: a Map begun before it is void
}

func (d *Device) attachOffered() bool { return d.modes&abi.ModeAttach != 0 && d.mapper != nil }

func mapStatus(err error) abi.Status {
	if st, ok := err.(abi.Status); ok && st != abi.StatusOK {
		return st
	}
	return abi.StatusInternal
}

// RegisterAttachDMB registers an attach-mode DMB of length bytes for rgid at
// DMB index index: host memory (a sealed memfd) mapped into this device's
// shared-memory region. It returns the token and the region offset. It
// blocks in Mapper.Map (see Mapper for where it may be called).
func (d *Device) RegisterAttachDMB(length, rgid uint64, index uint32) (token, off uint64, err error) {
	req := abi.Request{Op: abi.OpRegisterDMB, Flags: abi.FlagAttach, Len: length, GID: rgid, Index: index}
	if d.closed.Load() {
		return 0, 0, d.refuse(req, abi.StatusNotReady, "device disconnected")
	}
	if !d.attachOffered() {
		return 0, 0, d.refuse(req, abi.StatusUnsupported, "attach mode not offered")
	}
	if rgid == 0 {
		return 0, 0, d.refuse(req, abi.StatusInvalid, "rgid 0")
	}
	if length == 0 || length > abi.MaxDMBSize {
		return 0, 0, d.refuse(req, abi.StatusRange, "DMB length out of range")
	}
	if index >= abi.MaxDMBs {
		return 0, 0, d.refuse(req, abi.StatusRange, "DMB index out of range")
	}
	buf, err := dmb.NewBuffer(d.name, length)
	if err != nil {
		return 0, 0, d.refuse(req, abi.StatusInternal, "memfd creation failed: "+err.Error())
	}
	size := buf.Size()
	e := &dmbEntry{owner: d, rgid: rgid, size: length, index: index, buf: buf}
	a := &attachment{dev: d, e: e, size: size}

	// Reserve the index, the range and the bytes, then map with no lock.
	f := d.f
	st, why, gen := func() (abi.Status, string, uint64) {
		f.amu.Lock()
		defer f.amu.Unlock()
		d.mu.Lock()
		defer d.mu.Unlock()
		as := &d.att
		switch {
		case d.gone:
			return abi.StatusNotReady, "device disconnected", 0
		case d.indices.Has(index):
			return abi.StatusBusy, "DMB index in use", 0
		case len(d.dmbs) >= int(f.deviceLimit.Load()):
			d.stats.dmbLimitRefused.Add(1)
			return abi.StatusNoSpace, whyDMBLimit, 0
		case size > d.maxAttach-as.ownedBytes:
			d.stats.attachLimitRefused.Add(1)
			return abi.StatusNoSpace, whyAttachLimit, 0
		case size > d.maxMapped-as.mapped:
			d.stats.mappedLimitRefused.Add(1)
			return abi.StatusNoSpace, whyMappedLimit, 0
		}
		o, err := as.region.Alloc(size)
		if err != nil {
			return abi.StatusNoSpace, "shared-memory region full", 0
		}
		a.off, a.region = o, as.region
		_ = d.indices.Claim(index)
		as.mapped += size
		as.ownedBytes += size
		return abi.StatusOK, "", as.gen
	}()
	if st != abi.StatusOK {
		buf.Close()
		return 0, 0, d.refuse(req, st, why)
	}
	merr := d.mapper.Map(buf.FD(), a.off, size)
	if merr == nil {
		d.stats.maps.Add(1)
	}

	f.amu.Lock()
	d.mu.Lock()
	current := !d.gone && d.att.gen == gen
	if merr == nil && current {
		token, err = f.dmbs.Add(e, int(f.fabricLimit.Load()))
		if err == nil {
			a.tok = token
			e.own = a
			e.live = true
			e.attachers = make(map[*Device]*attachment)
			d.addLocked(token, e)
			d.att.owned++
			d.mu.Unlock()
			f.amu.Unlock()
			d.stats.registered.Add(1)
			return token, a.off, nil
		}
	}
	// Undo what is still ours. A reset or disconnect meanwhile took the
	// reservation and the mapping (the front-end dropped it) with it.
	if current {
		d.indices.Release(index)
		d.att.mapped -= size
		d.att.ownedBytes -= size
	}
	d.mu.Unlock()
	f.amu.Unlock()
	switch {
	case !current:
		st, why = abi.StatusNotReady, "device reset or disconnected during the map"
	case merr != nil:
		st, why = mapStatus(merr), "map into the region failed: "+merr.Error()
	default: // mapped, but no token: unmap again
		a.unmapLater()
		st, why = abi.StatusNoSpace, "fabric DMB limit"
		if s, ok := err.(abi.Status); !ok || s != abi.StatusNoSpace {
			st, why = abi.StatusInternal, "token allocation failed"
		}
	}
	if merr != nil && current {
		_ = a.region.Free(a.off)
	}
	buf.Close()
	return 0, 0, d.refuse(req, st, why)
}

// Attach maps the attach-mode DMB token into this device's region, which
// must be the DMB's rgid (its owner too, when the rgid is its own GID), and
// returns the offset and the DMB's length. It blocks in Mapper.Map (see
// Mapper).
func (d *Device) Attach(token uint64) (off, length uint64, err error) {
	req := abi.Request{Op: abi.OpAttachDMB, Token: token}
	if d.closed.Load() {
		return 0, 0, d.refuse(req, abi.StatusNotReady, "device disconnected")
	}
	if !d.attachOffered() {
		return 0, 0, d.refuse(req, abi.StatusUnsupported, "attach mode not offered")
	}
	e, ok := d.f.dmbs.Get(token)
	if !ok {
		return 0, 0, d.refuse(req, abi.StatusNoEntry, "unknown token")
	}
	if e.buf == nil {
		return 0, 0, d.refuse(req, abi.StatusUnsupported, "copy-mode DMB cannot be attached")
	}
	if e.rgid != d.gid {
		return 0, 0, d.refuse(req, abi.StatusPermission, "attacher is not the DMB's rgid")
	}
	f := d.f
	a := &attachment{dev: d, e: e, tok: token}
	var fd int
	st, why := func() (abi.Status, string) {
		f.amu.Lock()
		defer f.amu.Unlock()
		as := &d.att
		if d.closed.Load() || as.attached == nil {
			return abi.StatusNotReady, "device disconnected"
		}
		if as.attached[token] != nil {
			return abi.StatusBusy, "DMB already attached"
		}
		// e.live is the owner's; the attach lock comes before any device lock.
		e.owner.mu.RLock()
		live := e.live
		e.owner.mu.RUnlock()
		if !live {
			return abi.StatusNoEntry, "DMB gone"
		}
		a.size = e.own.size // set with e.live, under this lock
		if a.size > d.maxMapped-as.mapped {
			d.stats.mappedLimitRefused.Add(1)
			return abi.StatusNoSpace, whyMappedLimit
		}
		o, err := as.region.Alloc(a.size)
		if err != nil {
			return abi.StatusNoSpace, "shared-memory region full"
		}
		// The buffer is closed only after its DMB died under this lock, so
		// it is open here; the dup keeps the fd for the map below.
		if fd, err = e.buf.DupFD(); err != nil {
			_ = as.region.Free(o)
			return abi.StatusInternal, "dup of the memfd failed: " + err.Error()
		}
		a.off, a.region = o, as.region
		as.attached[token] = a
		as.mapped += a.size
		e.attachers[d] = a
		return abi.StatusOK, ""
	}()
	if st != abi.StatusOK {
		return 0, 0, d.refuse(req, st, why)
	}
	merr := d.mapper.Map(fd, a.off, a.size)
	unix.Close(fd)
	if merr == nil {
		d.stats.maps.Add(1)
	}

	f.amu.Lock()
	current := d.att.attached[token] == a
	if current && merr == nil {
		f.amu.Unlock()
		return a.off, e.size, nil
	}
	if current { // the map failed: take the reservation back
		delete(d.att.attached, token)
		delete(e.attachers, d)
		d.att.mapped -= a.size
		_ = a.region.Free(a.off)
	}
	f.amu.Unlock()
	if merr != nil {
		return 0, 0, d.refuse(req, mapStatus(merr), "map into the region failed: "+merr.Error())
	}
	// Revoked while mapping (UNREGISTER, the owner gone, our reset): who
	// revoked it queued the unmap, which runs after this map, or the
	// front-end dropped the mapping with the reset.
	return 0, 0, d.refuse(req, abi.StatusNoEntry, "DMB gone during the map")
}

// Detach removes this device's mapping of the DMB token (ATTACH_DMB). It
// does not block: the unmap is queued, and the range is reused only after
// it. A token this device has not attached gets StatusNoEntry (or
// StatusPermission if it is not the DMB's rgid).
func (d *Device) Detach(token uint64) error {
	req := abi.Request{Op: abi.OpDetachDMB, Token: token}
	if d.closed.Load() {
		return d.refuse(req, abi.StatusNotReady, "device disconnected")
	}
	if !d.attachOffered() {
		return d.refuse(req, abi.StatusUnsupported, "attach mode not offered")
	}
	f := d.f
	f.amu.Lock()
	a := d.att.attached[token]
	if a != nil {
		delete(d.att.attached, token)
		delete(a.e.attachers, d)
		d.att.mapped -= a.size
	}
	f.amu.Unlock()
	if a == nil {
		e, ok := f.dmbs.Get(token)
		switch {
		case !ok:
			return d.refuse(req, abi.StatusNoEntry, "unknown token")
		case e.rgid != d.gid:
			return d.refuse(req, abi.StatusPermission, "not the DMB's rgid")
		}
		return d.refuse(req, abi.StatusNoEntry, "DMB not attached")
	}
	a.unmapLater()
	return nil
}

// revokeLocked takes e's mappings in attachers' regions out of their
// bookkeeping and returns them (f.amu is held; e is dead). The caller passes
// them to afterRevoke once it holds no lock.
func (e *dmbEntry) revokeLocked() []*attachment {
	var out []*attachment
	for p, a := range e.attachers {
		delete(p.att.attached, a.tok)
		p.att.mapped -= a.size
		out = append(out, a)
	}
	e.attachers = nil
	return out
}

// afterRevoke unmaps revoked attachments and tells each attacher but the
// owner itself that the DMB is gone (EventDMB: token, GID = owner). Call it
// with no lock held.
func afterRevoke(revoked []*attachment) {
	for _, a := range revoked {
		a.unmapLater()
		if o := a.e.owner; a.dev != o {
			a.dev.post(abi.Event{Type: abi.EventDMB, Token: a.tok, GID: o.gid})
		}
	}
}

// unregisterAttach is UNREGISTER_DMB of an attach-mode DMB e of d: the DMB
// dies, its memfd is closed, and every mapping of it (d's own, and each
// attacher's, which also gets an EventDMB) is unmapped. It does not block.
func (d *Device) unregisterAttach(req abi.Request, e *dmbEntry) error {
	f := d.f
	f.amu.Lock()
	d.mu.Lock()
	live := e.live
	var revoked []*attachment
	if live {
		e.live = false
		d.indices.Release(e.index)
		d.removeLocked(e.own.tok, e)
		f.dmbs.Delete(e.own.tok)
		revoked = e.revokeLocked()
		d.att.owned--
		d.att.ownedBytes -= e.own.size
		d.att.mapped -= e.own.size
	}
	d.mu.Unlock()
	f.amu.Unlock()
	if !live {
		return d.refuse(req, abi.StatusNoEntry, "DMB already gone")
	}
	// No MOVE writes the memfd once e is dead under d.mu.
	e.buf.Close()
	e.own.unmapLater()
	afterRevoke(revoked)
	return nil
}
