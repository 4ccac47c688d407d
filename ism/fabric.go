// Package ism is the transport-free model of an ISM-like device (the device
// under SMC-D): a Fabric is all devices of one backend (one CHID, unique
// GIDs); a Device is one guest's ISM function with its DMBs, SBA and
// counters. It knows nothing of virtqueues: a transport decodes requests,
// hands them to Device.Handle and delivers Notifier calls to the guest.
//
// A copy-mode DMB is owner guest RAM and MOVE copies the sender's data into
// it; an attach-mode DMB is a sealed memfd that the transport maps into the
// shared-memory regions of its owner and of each device that attaches it
// (Mapper), and MOVE copies into the memfd. docs/device-abi.md is the
// normative description.
//
// Where docs/device-abi.md is silent, this model decides (following ISM and
// Linux where they say something):
//   - A refused request changes nothing. In particular a signalled MOVE to an
//     owner without an SBA gets StatusNotReady and copies no data; unsignalled
//     MOVEs need no SBA (a polling driver), and REGISTER_DMB does not either.
//   - Every signalled MOVE counts in the owner's SBA and, with interrupts
//     asked for, raises the interrupt (ABI v2: nothing is coalesced in a
//     word both sides write).
//   - REGISTER_DMB with rgid 0, and any op but MOVE carrying data, are
//     StatusInvalid; a SIGNAL code over 16 bits is StatusRange; a refused
//     REGISTER_DMB still echoes the index, with value 0.
//   - Requests on a disconnected device get StatusNotReady.
//   - Attach mode: ATTACH_DMB of an unknown or dead token is StatusNoEntry,
//     of a copy-mode DMB (or on a device without attach mode)
//     StatusUnsupported, by a GID other than the rgid StatusPermission, a
//     second time StatusBusy; DETACH_DMB of a DMB not attached is
//     StatusNoEntry (StatusPermission if not the rgid). UNREGISTER of an
//     attach-mode DMB, and its owner's disconnect, unmap it from every
//     attacher's region and send each an EventDMB (token, GID = owner).
//   - Disconnect sends EventGID to the rgids of the device's DMBs and to the
//     owners of DMBs whose rgid is the device (never to itself); UNREGISTER
//     of a copy-mode DMB sends nothing (SMC closes the connection in its
//     CDC first). The transport disconnects a device on a virtio reset (and
//     connects a new one when the driver starts it again), so peers see a
//     reset as the GID going away.
//   - SIGNAL is accepted only between devices with a DMB relationship: one
//     of the two owns a live DMB whose rgid is the other (or the sender
//     signals itself); otherwise StatusPermission. Each device may SIGNAL at
//     Limits.SignalRate per second with bursts of Limits.SignalBurst
//     (StatusBusy beyond). A Notifier that has no room for a software event
//     refuses it: the SIGNAL gets StatusNoSpace and the target counts a
//     dropped software event. Device events (EventGID, EventDMB) are the
//     Notifier's to keep (see Notifier.PostEvent).
//
// Locking: the token table and the GID map have their own RWMutexes; each
// Device has a RWMutex that guards its DMBs, SBA and Memory. A MOVE holds the
// owner's lock shared while it copies, so UNREGISTER, SetMemory and
// Disconnect (which take it exclusively) wait for in-flight MOVEs and none
// touches the owner's RAM after they return. The owner's RAM itself is
// used through a MemoryView acquired for that one MOVE, so the transport's
// memory-table changes need not wait for it. A device lock may be taken
// before the fabric's or the table's lock, never after, and no code holds two
// device locks at once. Attach-mode bookkeeping (who maps which DMB where,
// region allocators, mapped bytes) is under the fabric's attach lock (amu),
// which comes before any device lock; it is never held across a
// Mapper.Map, and the MOVE path does not take it.
package ism

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/dmb"
)

// DefaultFabricDMBs bounds the DMBs of all devices of a fabric together. A
// copy-mode DMB costs the host only its bookkeeping, but a bound keeps a
// hostile guest set from growing the token table without limit.
const DefaultFabricDMBs = 64 * 1024

// Default SIGNAL rate limit of each device. SMC-D itself signals rarely
// (shutdown, test-link); the fastest legitimate user here acknowledges
// transferred chunks with one SIGNAL per wake-up (cmd/ism-agent's
// ism-recv), a few thousand per second under TCG. A flood at the default
// rate is an eighth of the 80,000/s a hostile TCG guest managed.
const (
	DefaultSignalRate  = 10000 // SIGNALs per second
	DefaultSignalBurst = 1000
)

// Limits are the per-device and fabric limits; REGISTER_DMB past the DMB
// limits gets abi.StatusNoSpace, a SIGNAL past the rate abi.StatusBusy.
type Limits struct {
	FabricDMBs int // live DMBs on the fabric; 0 means DefaultFabricDMBs
	DeviceDMBs int // live DMBs per device; 0 (or more than abi.MaxDMBs) means abi.MaxDMBs

	// SIGNALs each device may send: a token bucket of SignalBurst,
	// refilled at SignalRate per second. 0 means the default.
	SignalRate  int
	SignalBurst int
}

// Errors of Connect.
var (
	ErrGIDZero  = errors.New("ism: GID 0 is not a valid GID")
	ErrGIDInUse = errors.New("ism: GID already connected to the fabric")
)

// Fabric is all ISM devices of one backend: they share a CHID and reach each
// other by GID.
type Fabric struct {
	chid uint16
	log  *logrus.Entry
	now  func() time.Time // the log rate limiter's clock; tests fix it

	fabricLimit atomic.Int64
	deviceLimit atomic.Int64
	signalRate  atomic.Int64
	signalBurst atomic.Int64

	dmbs dmb.Table[*dmbEntry] // every live DMB, by token

	faultsOn atomic.Bool // any standing fault set (faults.go): the data path's one check
	faults   faultSet

	amu sync.Mutex // attach-mode bookkeeping of every device (see the package doc)

	mu      sync.RWMutex
	devices map[uint64]*Device     // connected devices by GID
	retired counters               // counters of disconnected devices
	names   map[string]*nameRecord // every guest name that has connected, for DeviceStats
}

// nameRecord is what DeviceStats knows of one guest name: the devices that
// connected under it and were not folded yet (the last one is the latest),
// and the counters of those that were. A disconnected device is folded when
// the next device of its name connects, so a guest that reconnects often
// does not grow the list, and its counters are read at the latest possible
// moment (work still finishing on it, e.g. an asynchronous unmap, is
// counted unless it finishes after that).
type nameRecord struct {
	devs   []*Device
	folded Stats
	lim    limiter      // every device of the name logs its refusals through it
	sig    signalBucket // and takes its SIGNALs from it: a reconnect refills nothing
}

// dmbEntry is one registered DMB. owner, rgid, gpa, size, index and buf are
// fixed once the entry is in the token table.
type dmbEntry struct {
	owner *Device
	rgid  uint64 // the only GID that may MOVE into it (and attach it)
	gpa   uint64 // copy mode: in the owner's guest RAM
	size  uint64
	index uint32 // DMB index: its counters in the owner's SBA
	live  bool   // guarded by owner.mu (and, in attach mode, f.amu): false once unregistered

	// Attach mode: the host memory (nil in copy mode), open while live;
	// the owner's mapping and the attachers' (guarded by f.amu).
	buf       *dmb.Buffer
	own       *attachment
	attachers map[*Device]*attachment
}

// NewFabric returns an empty fabric with channel id chid. log may be nil.
func NewFabric(chid uint16, log *logrus.Entry) *Fabric {
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	f := &Fabric{
		chid:    chid,
		now:     time.Now,
		log:     log.WithField("chid", fmt.Sprintf("%#04x", chid)),
		devices: make(map[uint64]*Device),
		names:   make(map[string]*nameRecord),
	}
	f.SetLimits(Limits{})
	return f
}

// CHID is the fabric's channel id.
func (f *Fabric) CHID() uint16 { return f.chid }

// SetLimits changes the limits; 0 fields get the defaults. DMBs already
// registered stay.
func (f *Fabric) SetLimits(l Limits) {
	if l.FabricDMBs <= 0 {
		l.FabricDMBs = DefaultFabricDMBs
	}
	if l.DeviceDMBs <= 0 || l.DeviceDMBs > abi.MaxDMBs {
		l.DeviceDMBs = abi.MaxDMBs
	}
	if l.SignalRate <= 0 {
		l.SignalRate = DefaultSignalRate
	}
	if l.SignalBurst <= 0 {
		l.SignalBurst = DefaultSignalBurst
	}
	f.fabricLimit.Store(int64(l.FabricDMBs))
	f.deviceLimit.Store(int64(l.DeviceDMBs))
	f.signalRate.Store(int64(l.SignalRate))
	f.signalBurst.Store(int64(l.SignalBurst))
}

// Limits returns the limits in force.
func (f *Fabric) Limits() Limits {
	return Limits{
		FabricDMBs:  int(f.fabricLimit.Load()),
		DeviceDMBs:  int(f.deviceLimit.Load()),
		SignalRate:  int(f.signalRate.Load()),
		SignalBurst: int(f.signalBurst.Load()),
	}
}

// Connect adds a device for the guest called name with the given GID. mem is
// the guest's RAM and n reaches its driver. The GID must be non-zero and not
// connected already.
func (f *Fabric) Connect(name string, gid uint64, mem Memory, n Notifier) (*Device, error) {
	return f.ConnectDevice(name, gid, mem, n, DeviceConfig{Modes: abi.ModeCopy})
}

// MaxRegionSize is the largest shared-memory region: an attach-mode
// REGISTER_DMB returns the offset in 32 bits of abi.ShmPage units.
const MaxRegionSize = abi.ShmPage << 32

// ConnectDevice is Connect with the modes the device offers and, for
// attach mode, its Mapper and limits.
func (f *Fabric) ConnectDevice(name string, gid uint64, mem Memory, n Notifier, cfg DeviceConfig) (*Device, error) {
	if gid == 0 {
		return nil, ErrGIDZero
	}
	if mem == nil || n == nil {
		return nil, errors.New("ism: Connect needs a Memory and a Notifier")
	}
	if cfg.Modes == 0 {
		cfg.Modes = abi.ModeCopy
	}
	if cfg.Modes&^(abi.ModeCopy|abi.ModeAttach) != 0 {
		return nil, fmt.Errorf("ism: unknown modes %#x", cfg.Modes)
	}
	d := &Device{
		f:     f,
		name:  name,
		gid:   gid,
		n:     n,
		mem:   mem,
		modes: cfg.Modes,
		dmbs:  make(map[uint64]*dmbEntry),
		rgids: make(map[uint64]int),
		log:   f.log.WithFields(logrus.Fields{"vm": name, "gid": fmt.Sprintf("%#016x", gid)}),

		connectedAt: time.Now(),
	}
	if cfg.Modes&abi.ModeAttach != 0 {
		if cfg.Mapper == nil || cfg.RegionSize < abi.ShmPage || cfg.RegionSize > MaxRegionSize {
			return nil, errors.New("ism: attach mode needs a Mapper and a region of 4 KiB to 16 TiB")
		}
		region, err := newRegion(cfg.RegionSize)
		if err != nil {
			return nil, err
		}
		d.mapper = cfg.Mapper
		d.maxMapped = cfg.MaxMapped
		if d.maxMapped == 0 || d.maxMapped > region.Size() {
			d.maxMapped = region.Size()
		}
		d.maxAttach = cfg.MaxAttach
		if d.maxAttach == 0 || d.maxAttach > d.maxMapped {
			d.maxAttach = d.maxMapped
		}
		d.att = attachState{region: region, attached: make(map[uint64]*attachment)}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.devices[gid]; ok {
		return nil, fmt.Errorf("%w: %#x (vm %q)", ErrGIDInUse, gid, name)
	}
	f.devices[gid] = d
	rec := f.names[name]
	if rec == nil {
		rec = &nameRecord{}
		f.names[name] = rec
	}
	d.lim, d.sig = &rec.lim, &rec.sig
	rec.devs = slices.DeleteFunc(rec.devs, func(o *Device) bool {
		if f.devices[o.gid] == o {
			return false // still connected (same name, another GID)
		}
		rec.folded.add(o.stats.snapshot())
		return true
	})
	rec.devs = append(rec.devs, d)
	return d, nil
}

// device returns the connected device with that GID, or nil.
func (f *Fabric) device(gid uint64) *Device {
	f.mu.RLock()
	d := f.devices[gid]
	f.mu.RUnlock()
	return d
}

// Stats returns the fabric's counters: those of the connected devices plus
// those of devices that have disconnected.
func (f *Fabric) Stats() Stats {
	f.mu.RLock()
	devs := make([]*Device, 0, len(f.devices))
	for _, d := range f.devices {
		devs = append(devs, d)
	}
	s := f.retired.snapshot()
	f.mu.RUnlock()
	for _, d := range devs {
		s.add(d.stats.snapshot())
	}
	f.amu.Lock()
	for _, d := range devs {
		d.gaugesLocked(&s)
	}
	f.amu.Unlock()
	s.Devices = len(devs)
	s.DMBs = uint64(f.dmbs.Len())
	return s
}

// DeviceStats are the statistics of one guest, by the name its devices
// connected with (Fabric.Connect's name).
type DeviceStats struct {
	Name string
	// GID and Modes are those of the name's latest device: the modes it
	// offers (attach mode drops out when the front-end cannot map).
	GID   uint64
	Modes uint16
	// Connected: the latest device is connected to the fabric now, since
	// Since (when it connected).
	Connected bool
	Since     time.Time
	// Stats: the counters of every device that connected under this name
	// (so they survive a device stop and a reconnect); DMBs and the
	// attach-mode gauges of the connected device (0 when not connected).
	// Devices is 0.
	Stats Stats
}

// DeviceStats returns the statistics of every guest name that has connected
// to the fabric since it was made, sorted by name. Like Stats, it is not one
// atomic snapshot: counters move while it reads them.
func (f *Fabric) DeviceStats() []DeviceStats {
	type item struct {
		out  DeviceStats
		devs []*Device
		live *Device
	}
	f.mu.RLock()
	items := make([]item, 0, len(f.names))
	for name, rec := range f.names {
		last := rec.devs[len(rec.devs)-1] // never empty: ConnectDevice appends after folding
		it := item{out: DeviceStats{Name: name, GID: last.gid, Modes: last.modes, Stats: rec.folded}, devs: slices.Clone(rec.devs)}
		if f.devices[last.gid] == last {
			it.live = last
			it.out.Connected, it.out.Since = true, last.connectedAt
		}
		items = append(items, it)
	}
	f.mu.RUnlock()
	// Device locks only after the fabric's lock is released (package doc).
	for i := range items {
		it := &items[i]
		for _, d := range it.devs {
			it.out.Stats.add(d.stats.snapshot())
		}
		if d := it.live; d != nil {
			d.mu.RLock()
			it.out.Stats.DMBs = uint64(len(d.dmbs))
			d.mu.RUnlock()
		}
	}
	f.amu.Lock()
	for i := range items {
		if d := items[i].live; d != nil {
			d.gaugesLocked(&items[i].out.Stats)
		}
	}
	f.amu.Unlock()
	out := make([]DeviceStats, len(items))
	for i := range items {
		out[i] = items[i].out
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// NumStatus is the number of status codes Stats.Refused counts, indexed by
// abi.Status.
const NumStatus = int(abi.StatusInternal) + 1

// Stats are counters of a device or of a whole fabric.
type Stats struct {
	Devices    int    // Fabric.Stats only: connected devices
	DMBs       uint64 // live DMBs
	Registered uint64 // successful REGISTER_DMB
	Moves      uint64 // successful MOVEs sent
	MoveBytes  uint64 // bytes those MOVEs copied (the backend's copies, into copy- and attach-mode DMBs)
	Signals    uint64 // successful signalled MOVEs sent
	SWEvents   uint64 // successful SIGNAL requests sent
	Interrupts uint64 // interrupts raised to this device's driver
	Events     uint64 // events posted to this device's driver
	Maps       uint64 // SHMEM_MAPs into this device's region the front-end did
	Unmaps     uint64 // SHMEM_UNMAPs of this device's region the front-end did
	Refused    [NumStatus]uint64

	// SIGNALs this device sent that were refused, by reason (also counted
	// in Refused).
	SignalsRefusedPeer  uint64 // no DMB relationship with the target (StatusPermission)
	SignalsRefusedRate  uint64 // over this device's signal rate (StatusBusy)
	SignalsRefusedQueue uint64 // the target's event queue had no room for it (StatusNoSpace)
	// Events for this device's driver that were not queued.
	SWEventsDropped     uint64 // software events (SIGNALs) refused: no room for their sender
	DeviceEventsDropped uint64 // device events (GID or DMB gone): 0 unless the design fails
	// Refusals by a per-device cap (also counted in Refused[StatusNoSpace]).
	DMBLimitRefused    uint64 // REGISTER_DMB over Limits.DeviceDMBs
	AttachLimitRefused uint64 // attach-mode REGISTER_DMB over DeviceConfig.MaxAttach
	MappedLimitRefused uint64 // attach-mode REGISTER_DMB or ATTACH_DMB over DeviceConfig.MaxMapped
	// Request chains the transport refused before they reached the model
	// (Device.CountBadChain): malformed chains, completed with no response,
	// and avail-index jumps that broke the request queue until a reset.
	BadChains    uint64
	QueuesBroken uint64

	// Faults injected with this VM as the target (faults.go), by kind.
	Faults [NumFaultKinds]uint64

	// Attach-mode gauges, now: connected devices only.
	AttachDMBs  uint64 // own live attach-mode DMBs
	AttachBytes uint64 // host memory of those DMBs (page-rounded)
	Attached    uint64 // DMBs attached (ATTACH_DMB) and not detached
	MappedBytes uint64 // bytes mapped in the region: own attach-mode DMBs and attachments
}

// RefusedTotal is the number of refused requests, whatever the status.
func (s Stats) RefusedTotal() uint64 {
	var t uint64
	for _, n := range s.Refused {
		t += n
	}
	return t
}

func (s *Stats) add(o Stats) {
	s.Registered += o.Registered
	s.Moves += o.Moves
	s.MoveBytes += o.MoveBytes
	s.Signals += o.Signals
	s.SWEvents += o.SWEvents
	s.Interrupts += o.Interrupts
	s.Events += o.Events
	s.Maps += o.Maps
	s.Unmaps += o.Unmaps
	s.SignalsRefusedPeer += o.SignalsRefusedPeer
	s.SignalsRefusedRate += o.SignalsRefusedRate
	s.SignalsRefusedQueue += o.SignalsRefusedQueue
	s.SWEventsDropped += o.SWEventsDropped
	s.DeviceEventsDropped += o.DeviceEventsDropped
	s.DMBLimitRefused += o.DMBLimitRefused
	s.AttachLimitRefused += o.AttachLimitRefused
	s.MappedLimitRefused += o.MappedLimitRefused
	s.BadChains += o.BadChains
	s.QueuesBroken += o.QueuesBroken
	for i := range s.Refused {
		s.Refused[i] += o.Refused[i]
	}
	for i := range s.Faults {
		s.Faults[i] += o.Faults[i]
	}
}

// counters are a device's live counters; each is written by atomic adds so
// that the MOVE path takes no lock for them.
type counters struct {
	registered atomic.Uint64
	moves      atomic.Uint64
	moveBytes  atomic.Uint64
	signals    atomic.Uint64
	swEvents   atomic.Uint64
	interrupts atomic.Uint64
	events     atomic.Uint64
	maps       atomic.Uint64
	unmaps     atomic.Uint64
	refused    [NumStatus]atomic.Uint64

	signalsRefusedPeer  atomic.Uint64
	signalsRefusedRate  atomic.Uint64
	signalsRefusedQueue atomic.Uint64
	swEventsDropped     atomic.Uint64
	deviceEventsDropped atomic.Uint64
	dmbLimitRefused     atomic.Uint64
	attachLimitRefused  atomic.Uint64
	mappedLimitRefused  atomic.Uint64
	badChains           atomic.Uint64
	queuesBroken        atomic.Uint64
	faults              [NumFaultKinds]atomic.Uint64
}

func (c *counters) snapshot() Stats {
	s := Stats{
		Registered: c.registered.Load(),
		Moves:      c.moves.Load(),
		MoveBytes:  c.moveBytes.Load(),
		Signals:    c.signals.Load(),
		SWEvents:   c.swEvents.Load(),
		Interrupts: c.interrupts.Load(),
		Events:     c.events.Load(),
		Maps:       c.maps.Load(),
		Unmaps:     c.unmaps.Load(),

		SignalsRefusedPeer:  c.signalsRefusedPeer.Load(),
		SignalsRefusedRate:  c.signalsRefusedRate.Load(),
		SignalsRefusedQueue: c.signalsRefusedQueue.Load(),
		SWEventsDropped:     c.swEventsDropped.Load(),
		DeviceEventsDropped: c.deviceEventsDropped.Load(),
		DMBLimitRefused:     c.dmbLimitRefused.Load(),
		AttachLimitRefused:  c.attachLimitRefused.Load(),
		MappedLimitRefused:  c.mappedLimitRefused.Load(),
		BadChains:           c.badChains.Load(),
		QueuesBroken:        c.queuesBroken.Load(),
	}
	for i := range c.refused {
		s.Refused[i] = c.refused[i].Load()
	}
	for i := range c.faults {
		s.Faults[i] = c.faults[i].Load()
	}
	return s
}

func (c *counters) addStats(s Stats) {
	c.registered.Add(s.Registered)
	c.moves.Add(s.Moves)
	c.moveBytes.Add(s.MoveBytes)
	c.signals.Add(s.Signals)
	c.swEvents.Add(s.SWEvents)
	c.interrupts.Add(s.Interrupts)
	c.events.Add(s.Events)
	c.maps.Add(s.Maps)
	c.unmaps.Add(s.Unmaps)
	c.signalsRefusedPeer.Add(s.SignalsRefusedPeer)
	c.signalsRefusedRate.Add(s.SignalsRefusedRate)
	c.signalsRefusedQueue.Add(s.SignalsRefusedQueue)
	c.swEventsDropped.Add(s.SWEventsDropped)
	c.deviceEventsDropped.Add(s.DeviceEventsDropped)
	c.dmbLimitRefused.Add(s.DMBLimitRefused)
	c.attachLimitRefused.Add(s.AttachLimitRefused)
	c.mappedLimitRefused.Add(s.MappedLimitRefused)
	c.badChains.Add(s.BadChains)
	c.queuesBroken.Add(s.QueuesBroken)
	for i := range c.refused {
		c.refused[i].Add(s.Refused[i])
	}
	for i := range c.faults {
		c.faults[i].Add(s.Faults[i])
	}
}
