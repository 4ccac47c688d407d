package ism

import (
	"errors"
	"fmt"
	"sort"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/dmb"
)

// Handover (docs/handover.md): the fabric's state moves to a new process
// whole, with every GID, token, DMB, attachment and counter, so that the
// guests go on as if nothing happened. Export runs while nothing calls into
// the fabric (the transport froze every VM); Import rebuilds the fabric in
// the new process with placeholders for each device's transport, which the
// transport then supplies with Imported.Adopt before any guest request
// reaches the fabric.

// FabricState is the fabric for a handover. FD fields index the fd table
// that goes with it.
type FabricState struct {
	CHID    uint16
	Retired Stats // counters of devices disconnected before
	Names   []NameState
	Devices []DeviceState
}

// NameState is what DeviceStats knows of a guest name whose device is not
// connected (connected devices carry their own).
type NameState struct {
	Name      string
	Folded    Stats   // counters of its earlier devices
	LastGID   uint64  // the latest device's, if not connected
	LastModes uint16  // likewise
	Signals   float64 // SIGNALs left in its bucket
}

// DeviceState is one connected device.
type DeviceState struct {
	Name  string
	GID   uint64
	Modes uint16

	// Attach mode (RegionSize 0: not offered).
	RegionSize, MaxMapped, MaxAttach uint64
	Gen                              uint64

	SBASet     bool
	SBAGPA     uint64
	Interrupts bool
	Beats      uint32

	Stats    Stats
	DMBs     []DMBState
	Attached []AttachmentState
}

// DMBState is one live DMB. Attach mode: BufFD is its memfd, BufSize the
// memfd's size, Off its owner's mapping; copy mode: BufFD is -1.
type DMBState struct {
	Token, RGID, GPA, Size uint64
	Index                  uint32
	BufFD                  int
	BufSize                uint64
	Off                    uint64
}

// AttachmentState is a DMB a device attached, at Off in its region.
type AttachmentState struct {
	Token, Off uint64
}

// Export describes the fabric. Nothing may call into it meanwhile (the
// transport froze every VM). The fds are duplicates the caller owns.
func (f *Fabric) Export() (*FabricState, []int, error) {
	var fds []int
	fail := func(err error) (*FabricState, []int, error) {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, nil, err
	}
	f.amu.Lock()
	defer f.amu.Unlock()
	f.mu.RLock()
	st := &FabricState{CHID: f.chid, Retired: f.retired.snapshot()}
	var devs []*Device
	for _, d := range f.devices {
		devs = append(devs, d)
	}
	for name, rec := range f.names {
		ns := NameState{Name: name, Folded: rec.folded}
		connected := false
		for _, o := range rec.devs {
			if f.devices[o.gid] == o {
				connected = true
				continue
			}
			ns.Folded.add(o.stats.snapshot())
		}
		last := rec.devs[len(rec.devs)-1]
		if !connected {
			ns.LastGID, ns.LastModes = last.gid, last.modes
		}
		rec.sig.mu.Lock()
		ns.Signals = rec.sig.tokens
		if rec.sig.last.IsZero() {
			ns.Signals = -1 // never used: full at its first SIGNAL
		}
		rec.sig.mu.Unlock()
		st.Names = append(st.Names, ns)
	}
	f.mu.RUnlock()
	sort.Slice(st.Names, func(i, j int) bool { return st.Names[i].Name < st.Names[j].Name })
	sort.Slice(devs, func(i, j int) bool { return devs[i].gid < devs[j].gid })
	for _, d := range devs {
		d.mu.RLock()
		ds := DeviceState{
			Name: d.name, GID: d.gid, Modes: d.modes, MaxMapped: d.maxMapped, MaxAttach: d.maxAttach,
			Gen: d.att.gen, SBASet: d.sbaSet, SBAGPA: d.sbaGPA, Interrupts: d.interrupts,
			Beats: d.beats.Load(), Stats: d.stats.snapshot(),
		}
		if d.att.region != nil {
			ds.RegionSize = d.att.region.Size()
		}
		var err error
		for tok, e := range d.dmbs {
			es := DMBState{Token: tok, RGID: e.rgid, GPA: e.gpa, Size: e.size, Index: e.index, BufFD: -1}
			if e.buf != nil {
				fd, derr := e.buf.DupFD()
				if derr != nil {
					err = derr
					break
				}
				fds = append(fds, fd)
				es.BufFD, es.BufSize, es.Off = len(fds)-1, e.buf.Size(), e.own.off
			}
			ds.DMBs = append(ds.DMBs, es)
		}
		for tok, a := range d.att.attached {
			ds.Attached = append(ds.Attached, AttachmentState{Token: tok, Off: a.off})
		}
		d.mu.RUnlock()
		if err != nil {
			return fail(fmt.Errorf("ism: export %s: %w", d.name, err))
		}
		sort.Slice(ds.DMBs, func(i, j int) bool { return ds.DMBs[i].Token < ds.DMBs[j].Token })
		sort.Slice(ds.Attached, func(i, j int) bool { return ds.Attached[i].Token < ds.Attached[j].Token })
		st.Devices = append(st.Devices, ds)
	}
	return st, fds, nil
}

// Imported is a fabric rebuilt by Import whose devices wait for their
// transports (Adopt).
type Imported struct {
	f       *Fabric
	pending map[string]*Device // by name, until adopted
}

// Fabric is the rebuilt fabric.
func (im *Imported) Fabric() *Fabric { return im.f }

// Pending lists the names of the devices not adopted yet.
func (im *Imported) Pending() []string {
	im.f.mu.Lock()
	defer im.f.mu.Unlock()
	var out []string
	for n := range im.pending {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Adopt gives the imported device of guest name (with GID gid) its
// transport: its RAM, its Notifier and, in attach mode, its Mapper (whose
// mappings of the region the front-end still holds). It returns the device,
// connected as it was in the old process.
func (im *Imported) Adopt(name string, gid uint64, mem Memory, n Notifier, mapper Mapper) (*Device, error) {
	f := im.f
	if mem == nil || n == nil {
		return nil, errors.New("ism: Adopt needs a Memory and a Notifier")
	}
	f.amu.Lock()
	defer f.amu.Unlock()
	f.mu.Lock()
	d := im.pending[name]
	if d == nil || d.gid != gid {
		f.mu.Unlock()
		return nil, fmt.Errorf("ism: no imported device %q with GID %#x", name, gid)
	}
	if d.attachOffered() != (mapper != nil) {
		f.mu.Unlock()
		return nil, fmt.Errorf("ism: imported device %q: attach mode %v, mapper given %v", name, d.attachOffered(), mapper != nil)
	}
	delete(im.pending, name)
	f.mu.Unlock()
	d.mu.Lock()
	d.mem, d.n = mem, n
	if mapper != nil {
		d.mapper = mapper
	}
	d.mu.Unlock()
	return d, nil
}

// pendingTransport stands in for a device's transport until Adopt: it
// refuses every guest range and takes no event. Nothing reaches it while
// the transport keeps every VM frozen until all are adopted; it is there
// so that a device not adopted yet fails safe.
type pendingTransport struct{}

func (pendingTransport) Acquire() MemoryView                   { return pendingTransport{} }
func (pendingTransport) Bytes(uint64, uint64) ([]byte, error)  { return nil, abi.StatusFault }
func (pendingTransport) Release()                              {}
func (pendingTransport) Interrupt()                            {}
func (pendingTransport) PostEvent(abi.Event) bool              { return false }
func (pendingTransport) Map(int, uint64, uint64) error         { return abi.StatusNotReady }
func (pendingTransport) Unmap(_, _ uint64, done func(ok bool)) { done(false) }

// Import rebuilds a fabric from st in this process: f must be new (no
// device connected), with the limits in force set. fds is the fd table of
// the handover; Import duplicates what it keeps. Every value is checked (it
// comes from another process): a bad state is an error, never a panic, and
// leaves f empty.
func (f *Fabric) Import(st *FabricState, fds []int) (*Imported, error) {
	if st.CHID != f.chid {
		return nil, fmt.Errorf("ism: handover state: CHID %#x, this fabric %#x", st.CHID, f.chid)
	}
	f.mu.Lock()
	empty := len(f.devices) == 0 && len(f.names) == 0 && f.dmbs.Len() == 0
	f.mu.Unlock()
	if !empty {
		return nil, errors.New("ism: Import into a fabric in use")
	}
	im := &Imported{f: f, pending: map[string]*Device{}}
	var bufs []*dmb.Buffer
	// Built aside and installed at the end: a failed import leaves f
	// as it was.
	devices := map[uint64]*Device{}
	names := map[string]*nameRecord{}
	byToken := map[uint64]*dmbEntry{}
	fail := func(err error) (*Imported, error) {
		for _, b := range bufs {
			b.Close()
		}
		for tok := range byToken {
			f.dmbs.Delete(tok)
		}
		return nil, fmt.Errorf("ism: handover state: %w", err)
	}
	limit := int(f.fabricLimit.Load())
	for i := range st.Devices {
		ds := &st.Devices[i]
		if ds.GID == 0 {
			return fail(ErrGIDZero)
		}
		if _, dup := devices[ds.GID]; dup {
			return fail(fmt.Errorf("GID %#x twice", ds.GID))
		}
		if _, dup := im.pending[ds.Name]; dup {
			return fail(fmt.Errorf("device %q twice", ds.Name))
		}
		if ds.Modes == 0 || ds.Modes&^(abi.ModeCopy|abi.ModeAttach) != 0 {
			return fail(fmt.Errorf("device %q: modes %#x", ds.Name, ds.Modes))
		}
		d := &Device{
			f: f, name: ds.Name, gid: ds.GID, n: pendingTransport{}, mem: pendingTransport{}, modes: ds.Modes,
			dmbs: make(map[uint64]*dmbEntry), rgids: make(map[uint64]int),
			log: f.log.WithFields(logrus.Fields{"vm": ds.Name, "gid": fmt.Sprintf("%#016x", ds.GID)}),
		}
		if ds.Modes&abi.ModeAttach != 0 {
			if ds.RegionSize < abi.ShmPage || ds.RegionSize > MaxRegionSize || ds.MaxMapped == 0 || ds.MaxMapped > ds.RegionSize ||
				ds.MaxAttach == 0 || ds.MaxAttach > ds.MaxMapped {
				return fail(fmt.Errorf("device %q: attach-mode region %d, limits %d/%d", ds.Name, ds.RegionSize, ds.MaxMapped, ds.MaxAttach))
			}
			region, err := newRegion(ds.RegionSize)
			if err != nil {
				return fail(err)
			}
			d.mapper = pendingTransport{}
			d.maxMapped, d.maxAttach = ds.MaxMapped, ds.MaxAttach
			d.att = attachState{region: region, attached: make(map[uint64]*attachment), gen: ds.Gen}
		}
		if ds.SBASet {
			if ds.SBAGPA%abi.SBAAlign != 0 || dmb.AddOverflows(ds.SBAGPA, abi.SBASize) {
				return fail(fmt.Errorf("device %q: SBA at %#x", ds.Name, ds.SBAGPA))
			}
			d.sbaSet, d.sbaGPA, d.interrupts = true, ds.SBAGPA, ds.Interrupts
		}
		d.beats.Store(ds.Beats)
		d.stats.addStats(ds.Stats)
		for _, es := range ds.DMBs {
			if es.RGID == 0 || es.Size == 0 || es.Size > abi.MaxDMBSize || es.Index >= abi.MaxDMBs {
				return fail(fmt.Errorf("device %q: DMB %#x: rgid %#x size %d index %d", ds.Name, es.Token, es.RGID, es.Size, es.Index))
			}
			if d.indices.Claim(es.Index) != nil {
				return fail(fmt.Errorf("device %q: DMB index %d twice", ds.Name, es.Index))
			}
			e := &dmbEntry{owner: d, rgid: es.RGID, gpa: es.GPA, size: es.Size, index: es.Index, live: true}
			if es.BufFD == -1 {
				if d.modes&abi.ModeCopy == 0 || dmb.AddOverflows(es.GPA, es.Size) {
					return fail(fmt.Errorf("device %q: copy-mode DMB %#x", ds.Name, es.Token))
				}
			} else {
				if !d.attachOffered() || es.GPA != 0 || es.BufFD < 0 || es.BufFD >= len(fds) || es.BufSize < es.Size {
					return fail(fmt.Errorf("device %q: attach-mode DMB %#x", ds.Name, es.Token))
				}
				buf, err := dmb.BufferFromFD(fds[es.BufFD], es.BufSize)
				if err != nil {
					return fail(err)
				}
				bufs = append(bufs, buf)
				e.buf = buf
				size := buf.Size()
				if err := d.att.region.Reserve(es.Off, size); err != nil {
					return fail(fmt.Errorf("device %q: DMB %#x at %#x in its region: %v", ds.Name, es.Token, es.Off, err))
				}
				e.own = &attachment{dev: d, e: e, tok: es.Token, region: d.att.region, off: es.Off, size: size}
				e.attachers = make(map[*Device]*attachment)
				d.att.owned++
				d.att.ownedBytes += size
				d.att.mapped += size
				if d.att.ownedBytes > d.maxAttach || d.att.mapped > d.maxMapped {
					return fail(fmt.Errorf("device %q: attach-mode DMBs over its limits", ds.Name))
				}
			}
			if byToken[es.Token] != nil {
				return fail(fmt.Errorf("device %q: token %#x twice", ds.Name, es.Token))
			}
			if err := f.dmbs.Insert(es.Token, e, limit); err != nil {
				return fail(fmt.Errorf("device %q: token %#x: %v", ds.Name, es.Token, err))
			}
			byToken[es.Token] = e
			d.addLocked(es.Token, e)
		}
		if len(d.dmbs) > int(f.deviceLimit.Load()) {
			return fail(fmt.Errorf("device %q: %d DMBs, over the limit", ds.Name, len(d.dmbs)))
		}
		devices[d.gid] = d
		im.pending[d.name] = d
	}
	// Attachments, once every DMB is known.
	for i := range st.Devices {
		ds := &st.Devices[i]
		d := devices[ds.GID]
		for _, as := range ds.Attached {
			e := byToken[as.Token]
			if e == nil || e.buf == nil || e.rgid != d.gid || !d.attachOffered() {
				return fail(fmt.Errorf("device %q: attachment of %#x", ds.Name, as.Token))
			}
			if d.att.attached[as.Token] != nil {
				return fail(fmt.Errorf("device %q: %#x attached twice", ds.Name, as.Token))
			}
			a := &attachment{dev: d, e: e, tok: as.Token, region: d.att.region, off: as.Off, size: e.own.size}
			if err := d.att.region.Reserve(as.Off, a.size); err != nil {
				return fail(fmt.Errorf("device %q: attachment %#x at %#x: %v", ds.Name, as.Token, as.Off, err))
			}
			d.att.attached[as.Token] = a
			e.attachers[d] = a
			d.att.mapped += a.size
			if d.att.mapped > d.maxMapped {
				return fail(fmt.Errorf("device %q: mappings over its limit", ds.Name))
			}
		}
	}
	// Names: those of connected devices, and the others' records.
	for _, d := range devices {
		rec := names[d.name]
		if rec == nil {
			rec = &nameRecord{}
			names[d.name] = rec
		}
		rec.devs = append(rec.devs, d)
		d.lim, d.sig = &rec.lim, &rec.sig
	}
	for _, ns := range st.Names {
		rec := names[ns.Name]
		if rec == nil {
			if ns.LastGID == 0 {
				return fail(fmt.Errorf("name %q: no device", ns.Name))
			}
			// The latest device, disconnected: its GID and modes for
			// DeviceStats, its counters folded below.
			last := &Device{f: f, name: ns.Name, gid: ns.LastGID, modes: ns.LastModes, gone: true}
			last.closed.Store(true)
			rec = &nameRecord{devs: []*Device{last}}
			names[ns.Name] = rec
		}
		rec.folded.add(ns.Folded)
		if ns.Signals >= 0 && ns.Signals <= float64(f.signalBurst.Load()) {
			rec.sig.tokens, rec.sig.last = ns.Signals, f.now()
		}
	}
	f.mu.Lock()
	f.devices, f.names = devices, names
	f.mu.Unlock()
	f.retired.addStats(st.Retired)
	return im, nil
}
