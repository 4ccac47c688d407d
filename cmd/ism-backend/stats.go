package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
)

// The -stats-file format (JSON, written whole: PATH.tmp, then renamed over
// PATH, so a reader never sees half a file):
//
//	{"time": RFC 3339 with nanoseconds, "seq": 1, 2, ... (one per write),
//	 "chid": "0xff00",
//	 "total": counters of the whole fabric since start, plus "devices",
//	 "vms": [{"name", "gid": "0x%016x", "modes": "copy,attach",
//	          "connected", "stats": counters}, ...]}
//
// vms lists every VM served: each -vm in flag order, then those added at
// runtime (less those removed, vmctl.go). A VM's counters are those of every
// connection it has had (they survive a device stop, a guest reset or
// power-off, and a reconnect); "dmbs" and the attach-mode gauges
// ("attach_dmbs", "attach_bytes", "attached", "mapped_bytes") are those of
// its connected device now, 0 when not connected. Of the event policy
// (docs/device-abi.md, "Events"): "signals_refused_peer", "_rate" and
// "_queue" count the VM's SIGNALs refused for want of a DMB with the target,
// by its rate limit, and for want of room in the target's queue;
// "sw_events_dropped" and "device_events_dropped" count events for the VM
// that were not queued (device events: 0 unless the design fails);
// "dmb_limit_refused", "attach_limit_refused" and "mapped_limit_refused"
// count refusals by -max-dmbs, -max-attach-memory and -max-mapped;
// "bad_chains" counts the VM's request chains refused as malformed before
// any request was read (completed with no response) and "queues_broken"
// the times its driver moved the request ring's avail idx past the ring
// (the queue then serves nothing until the guest resets the device).
// "modes" are what its device offers: the
// latest connection's (attach mode drops out when the front-end cannot map
// shared memory), else what the flags configure.
type statsFile struct {
	Time  string        `json:"time"`
	Seq   uint64        `json:"seq"`
	CHID  string        `json:"chid"`
	Total statsJSON     `json:"total"`
	VMs   []vmStatsJSON `json:"vms"`
}

type vmStatsJSON struct {
	Name      string    `json:"name"`
	GID       string    `json:"gid"`
	Modes     string    `json:"modes"`
	Connected bool      `json:"connected"`
	Stats     statsJSON `json:"stats"`
}

// statsJSON is ism.Stats with snake_case names and the refusals by status.
type statsJSON struct {
	Devices      *int              `json:"devices,omitempty"` // total only: connected devices
	DMBs         uint64            `json:"dmbs"`
	Registered   uint64            `json:"registered"`
	Moves        uint64            `json:"moves"`
	MoveBytes    uint64            `json:"move_bytes"`
	Signals      uint64            `json:"signals"`
	SWEvents     uint64            `json:"sw_events"`
	Interrupts   uint64            `json:"interrupts"`
	Events       uint64            `json:"events"`
	Maps         uint64            `json:"maps"`
	Unmaps       uint64            `json:"unmaps"`
	AttachDMBs   uint64            `json:"attach_dmbs"`
	AttachBytes  uint64            `json:"attach_bytes"`
	Attached     uint64            `json:"attached"`
	MappedBytes  uint64            `json:"mapped_bytes"`
	Refused      map[string]uint64 `json:"refused"` // every refusal status, by name
	RefusedTotal uint64            `json:"refused_total"`

	SignalsRefusedPeer  uint64 `json:"signals_refused_peer"`
	SignalsRefusedRate  uint64 `json:"signals_refused_rate"`
	SignalsRefusedQueue uint64 `json:"signals_refused_queue"`
	SWEventsDropped     uint64 `json:"sw_events_dropped"`
	DeviceEventsDropped uint64 `json:"device_events_dropped"`
	DMBLimitRefused     uint64 `json:"dmb_limit_refused"`
	AttachLimitRefused  uint64 `json:"attach_limit_refused"`
	MappedLimitRefused  uint64 `json:"mapped_limit_refused"`
	BadChains           uint64 `json:"bad_chains"`
	QueuesBroken        uint64 `json:"queues_broken"`
	// Faults injected with this VM as the target, by kind; absent while
	// none was.
	Faults map[string]uint64 `json:"faults_injected,omitempty"`
}

// statusNames name the refusal statuses in the stats file (abi.StatusOK is
// never a refusal).
var statusNames = [ism.NumStatus]string{
	abi.StatusInvalid:     "invalid",
	abi.StatusUnsupported: "unsupported",
	abi.StatusNoEntry:     "no_entry",
	abi.StatusPermission:  "permission",
	abi.StatusRange:       "range",
	abi.StatusFault:       "fault",
	abi.StatusNoSpace:     "no_space",
	abi.StatusBusy:        "busy",
	abi.StatusNotReady:    "not_ready",
	abi.StatusInternal:    "internal",
}

func toStatsJSON(s ism.Stats) statsJSON {
	j := statsJSON{
		DMBs: s.DMBs, Registered: s.Registered, Moves: s.Moves, MoveBytes: s.MoveBytes,
		Signals: s.Signals, SWEvents: s.SWEvents, Interrupts: s.Interrupts, Events: s.Events,
		Maps: s.Maps, Unmaps: s.Unmaps,
		AttachDMBs: s.AttachDMBs, AttachBytes: s.AttachBytes, Attached: s.Attached, MappedBytes: s.MappedBytes,
		Refused: make(map[string]uint64, len(statusNames)), RefusedTotal: s.RefusedTotal(),

		SignalsRefusedPeer: s.SignalsRefusedPeer, SignalsRefusedRate: s.SignalsRefusedRate,
		SignalsRefusedQueue: s.SignalsRefusedQueue, SWEventsDropped: s.SWEventsDropped,
		DeviceEventsDropped: s.DeviceEventsDropped, DMBLimitRefused: s.DMBLimitRefused,
		AttachLimitRefused: s.AttachLimitRefused, MappedLimitRefused: s.MappedLimitRefused,
		BadChains: s.BadChains, QueuesBroken: s.QueuesBroken,
	}
	for st, name := range statusNames {
		if st != int(abi.StatusOK) {
			j.Refused[name] = s.Refused[st]
		}
	}
	for k, n := range s.Faults {
		if n != 0 {
			if j.Faults == nil {
				j.Faults = map[string]uint64{}
			}
			j.Faults[ism.FaultKind(k).String()] = n
		}
	}
	return j
}

// statsWriter writes the -stats-file; one goroutine uses it.
type statsWriter struct {
	path string
	opts *options
	seq  atomic.Uint64 // also read by a handover, which carries it on
}

// snapshot is the file's content now, with the next sequence number.
func (w *statsWriter) snapshot(f *ism.Fabric, now time.Time) statsFile {
	seq := w.seq.Add(1)
	total := f.Stats()
	out := statsFile{
		Time:  now.Format(time.RFC3339Nano),
		Seq:   seq,
		CHID:  fmt.Sprintf("%#04x", f.CHID()),
		Total: toStatsJSON(total),
	}
	vms := w.opts.vmList()
	out.VMs = make([]vmStatsJSON, 0, len(vms))
	out.Total.Devices = &total.Devices
	seen := map[string]ism.DeviceStats{}
	for _, d := range f.DeviceStats() {
		seen[d.Name] = d
	}
	for _, v := range vms {
		vm := vmStatsJSON{Name: v.Name, GID: fmt.Sprintf("0x%016x", v.GID)}
		if d, ok := seen[v.Name]; ok {
			vm.GID = fmt.Sprintf("0x%016x", d.GID)
			vm.Modes = abi.ModesString(d.Modes)
			vm.Connected = d.Connected
			vm.Stats = toStatsJSON(d.Stats)
		} else {
			bo, _ := w.opts.backendOptions(v.Name) // checked by parseFlags
			vm.Modes = abi.ModesString(bo.Modes)
			vm.Stats = toStatsJSON(ism.Stats{})
		}
		out.VMs = append(out.VMs, vm)
	}
	return out
}

// write replaces the stats file with the statistics now.
func (w *statsWriter) write(f *ism.Fabric) error {
	b, err := json.MarshalIndent(w.snapshot(f, time.Now()), "", "  ")
	if err != nil {
		return err
	}
	tmp := w.path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, w.path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
