package main

// hostile: a guest that attacks the ISM device below the driver, beside
// other guests' real traffic (test/vm TestHostileGuestBesideTransfer).
//
// It drives the device with packages pci and virtq alone (pci.Virtio,
// pci.Queue and virtq's raw descriptors), because guestdriver refuses to
// send garbage. Each
// round it
//
//   - floods SIGNALs at every GID of ism.victims (comma-separated) with no
//     DMB relationship (PERMISSION; NOENTRY while a victim is not
//     connected), then registers a DMB whose rgid is each victim and floods
//     again (OK until its SIGNAL budget is spent, then BUSY), then
//     unregisters them;
//   - sends MOVE, ATTACH_DMB, UNREGISTER_DMB and DETACH_DMB with tokens it
//     does not own: random ones, its own just unregistered ones and their
//     near misses (±1, top bit flipped);
//   - posts malformed request chains: a header or data outside guest RAM, a
//     descriptor loop, an indirect table too long and one nested, no room
//     for the response, a readable descriptor after a writable one, an
//     address that wraps and lengths over the chain limit, and a MOVE whose
//     header lies about its data;
//   - registers DMBs for the victims again and, holding them, moves the
//     request ring's avail idx past the ring (the backend breaks the queue
//     until a reset), then resets the device, which sends each victim a
//     GID-gone event naming it, and sets the device up anew.
//
// ism.flood is the SIGNALs per victim per flood (default 256). It goes on
// until the host writes "stop" to its control port (ttyS1), or for
// ism.rounds rounds if that is given. After the first whole round it
// reports flooding=1. At the end it shows that its device is still served
// (QUERY_RGID, REGISTER/MOVE/UNREGISTER to itself: still_served=1) and
// reports what it did and the answers it got, per kind and status:
// signal_norel.<STATUS>, signal_rel.<STATUS>, forged.<STATUS>,
// malformed.<kind>.<STATUS or rejected> (rejected: completed with nothing
// written, as a malformed chain should be), rounds, avail_jumps, resets,
// events.<type>, signals_sent, signals_per_s. A forged token that is
// accepted fails the scenario.

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/pci"
	"github.com/ism-backend/ism-backend/virtq"
)

func init() { register("hostile", hostile) }

// hostileCode is the SIGNAL code of the flood (any code is the victim's
// driver's to ignore).
const hostileCode = 0x7e57

// outsideRAM is a guest-physical address far above any test guest's RAM.
const outsideRAM = 1 << 46

// rawISM is the ISM device driven through package pci directly.
type rawISM struct {
	vio     *pci.Virtio
	started bool // the device status was touched: close resets it
	alloc   *pci.Allocator
	cfg     abi.Config
	req     *pci.Queue
	ev      *pci.Queue
	slots   *pci.DMA // per request slot: header, then response
	evBufs  *pci.DMA
	// scratch: DMB memory (two pages), then MOVE data, then indirect
	// tables.
	scratch  *pci.DMA
	free     []int
	evByHead map[uint16]int
}

const (
	rawSlotSize   = abi.RequestSize + abi.ResponseSize
	rawEventBufs  = 64
	scratchDMB    = 0     // two 4096-byte DMBs
	scratchData   = 8192  // MOVE data
	scratchTables = 12288 // indirect tables
	scratchSize   = 16384
)

// openRaw opens and starts the device: queues set up, event buffers posted,
// DRIVER_OK. It negotiates indirect descriptors so that the backend's checks
// of indirect tables are reached.
func openRaw(dev *pci.Function, hugepages int) (r *rawISM, err error) {
	vio, err := pci.OpenVirtio(dev)
	if err != nil {
		return nil, err
	}
	r = &rawISM{vio: vio, evByHead: map[uint16]int{}}
	defer func() {
		if err != nil {
			r.close()
			r = nil
		}
	}()
	raw, err := vio.ReadDeviceConfig(abi.ConfigSize)
	if err != nil {
		return r, err
	}
	if r.cfg, err = abi.DecodeConfig(raw); err != nil {
		return r, err
	}
	r.started = true
	if _, err = vio.Start(1<<pci.FeatureRingIndirect|1<<pci.FeatureAccessPlatform, 0); err != nil {
		return r, err
	}
	r.alloc = pci.NewHugeAllocator(hugepages)
	qsize := uint16(256)
	if r.cfg.QueueSize != 0 {
		qsize = min(qsize, r.cfg.QueueSize)
	}
	if r.req, err = vio.SetupQueue(abi.RequestQueue, qsize, r.alloc); err != nil {
		return r, fmt.Errorf("request queue: %w", err)
	}
	if r.ev, err = vio.SetupQueue(abi.EventQueue, qsize, r.alloc); err != nil {
		return r, fmt.Errorf("event queue: %w", err)
	}
	n := int(r.req.Size())
	if r.slots, err = r.alloc.Alloc(n*rawSlotSize, 64); err != nil {
		return r, err
	}
	for i := n - 1; i >= 0; i-- {
		r.free = append(r.free, i)
	}
	if r.evBufs, err = r.alloc.Alloc(rawEventBufs*abi.EventSize, 64); err != nil {
		return r, err
	}
	if r.scratch, err = r.alloc.Alloc(scratchSize, 4096); err != nil {
		return r, err
	}
	vio.DriverOK()
	if st := vio.Status(); st&(pci.StatusNeedsReset|pci.StatusFailed) != 0 || st&pci.StatusDriverOK == 0 {
		return r, fmt.Errorf("device status %#x after DRIVER_OK", st)
	}
	for i := range min(rawEventBufs, int(r.ev.Size())) {
		if err = r.postEvent(i); err != nil {
			return r, err
		}
	}
	r.ev.Kick()
	return r, nil
}

func (r *rawISM) postEvent(i int) error {
	h, err := r.ev.Add(nil, []virtq.Seg{pci.SegOf(r.evBufs, i*abi.EventSize, abi.EventSize)})
	if err != nil {
		return err
	}
	r.evByHead[h] = i
	return nil
}

// harvestEvents counts the events delivered so far by type and posts their
// buffers again.
func (r *rawISM) harvestEvents(count map[string]int) error {
	for {
		h, n, ok, err := r.ev.Poll()
		if err != nil || !ok {
			r.ev.Kick()
			return err
		}
		i, known := r.evByHead[h]
		if !known {
			return fmt.Errorf("event chain %d was never posted", h)
		}
		delete(r.evByHead, h)
		if n == abi.EventSize {
			ev, _ := abi.DecodeEvent(r.evBufs.Bytes()[i*abi.EventSize:][:abi.EventSize])
			switch ev.Type {
			case abi.EventDMB:
				count["dmb_gone"]++
			case abi.EventGID:
				count["gid_gone"]++
			case abi.EventSWR:
				count["software"]++
			default:
				count["unknown"]++
			}
		} else {
			count["short"]++
		}
		if err := r.postEvent(i); err != nil {
			return err
		}
	}
}

// close resets the device (it stops touching guest memory) and releases
// everything.
func (r *rawISM) close() {
	if r.started {
		_ = r.vio.Reset(5 * time.Second)
	}
	if r.alloc != nil {
		_ = r.alloc.Close()
	}
	_ = r.vio.Close()
}

// call is one request chain: a well-formed request (req, with data after
// the header), or, with build, a chain made raw from the slot's header and
// response addresses. It gets the bytes the device wrote and, if that is a
// whole response, the response.
type call struct {
	req   abi.Request
	data  []virtq.Seg
	build func(hdr, resp uint64) []virtq.Desc

	written uint32
	resp    abi.Response
}

// status is what the call came back with: the status name, or "rejected"
// for a chain completed with nothing written, or "short(n)".
func (c *call) status() string {
	switch c.written {
	case 0:
		return "rejected"
	case abi.ResponseSize:
		if c.resp.Status == abi.StatusOK {
			return "OK"
		}
		return statusName(c.resp.Status)
	}
	return fmt.Sprintf("short%d", c.written)
}

// run sends calls, as many at once as the ring takes, and waits for all of
// them. An error means the device stopped answering or broke the ring
// protocol.
func (r *rawISM) run(e *Env, calls []*call) error {
	bySlot := map[uint16]int{} // head -> slot
	slotCall := make([]*call, r.req.Size())
	next, done := 0, 0
	last := time.Now()
	for done < len(calls) {
		for next < len(calls) && len(r.free) > 0 {
			c := calls[next]
			slot := r.free[len(r.free)-1]
			so := slot * rawSlotSize
			b := r.slots.Bytes()[so : so+rawSlotSize]
			c.req.Encode(b)
			for i := abi.RequestSize; i < rawSlotSize; i++ {
				b[i] = 0xff
			}
			hdr, resp := r.slots.Addr(so), r.slots.Addr(so+abi.RequestSize)
			var head uint16
			var err error
			if c.build != nil {
				head, err = r.req.AddDescs(c.build(hdr, resp))
			} else {
				out := append([]virtq.Seg{{Addr: hdr, Len: abi.RequestSize}}, c.data...)
				head, err = r.req.Add(out, []virtq.Seg{{Addr: resp, Len: abi.ResponseSize}})
			}
			if errors.Is(err, virtq.ErrFull) {
				break
			}
			if err != nil {
				return err
			}
			r.free = r.free[:len(r.free)-1]
			bySlot[head] = slot
			slotCall[slot] = c
			next++
		}
		r.req.Kick()
		got := false
		for {
			h, n, ok, err := r.req.Poll()
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			slot, known := bySlot[h]
			if !known {
				return fmt.Errorf("request chain %d completed, never sent", h)
			}
			delete(bySlot, h)
			c := slotCall[slot]
			slotCall[slot] = nil
			c.written = n
			if n == abi.ResponseSize {
				so := slot*rawSlotSize + abi.RequestSize
				c.resp, _ = abi.DecodeResponse(r.slots.Bytes()[so : so+abi.ResponseSize])
			}
			r.free = append(r.free, slot)
			done++
			got = true
		}
		switch {
		case got:
			last = time.Now()
		case e.Ctx.Err() != nil:
			return fmt.Errorf("%d of %d requests unanswered at the time limit", len(calls)-done, len(calls))
		case time.Since(last) > 30*time.Second: // the driver's request timeout
			return fmt.Errorf("device answered none of %d requests for 30s (status %#x)", next-done, r.vio.Status())
		default:
			time.Sleep(50 * time.Microsecond) // a busy vCPU starves the device under TCG
		}
	}
	return nil
}

// must runs calls that must all succeed.
func (r *rawISM) must(e *Env, calls ...*call) error {
	if err := r.run(e, calls); err != nil {
		return err
	}
	for _, c := range calls {
		if st := c.status(); st != "OK" {
			return fmt.Errorf("%v: %s", c.req.Op, st)
		}
	}
	return nil
}

// hostileState is what the scenario counts across rounds and device resets.
type hostileState struct {
	e       *Env
	dev     *pci.Function
	hpages  int
	r       *rawISM
	victims []uint64
	flood   int

	counts     map[string]int
	events     map[string]int
	signals    int
	signalTime time.Duration
	resets     int
	jumps      int
}

func (s *hostileState) tally(prefix string, calls []*call) {
	for _, c := range calls {
		s.counts[prefix+"."+c.status()]++
	}
}

// signalFlood sends s.flood SIGNALs to each victim as one stream of batches.
func (s *hostileState) signalFlood(prefix string) error {
	var calls []*call
	for i := range s.flood {
		for _, v := range s.victims {
			calls = append(calls, &call{req: abi.Request{Op: abi.OpSignal, GID: v, Index: hostileCode, Offset: uint64(i)}})
		}
	}
	start := time.Now()
	if err := s.r.run(s.e, calls); err != nil {
		return fmt.Errorf("SIGNAL flood (%s): %w", prefix, err)
	}
	s.signalTime += time.Since(start)
	s.signals += len(calls)
	s.tally(prefix, calls)
	return nil
}

// round is one pass of every attack; the device is reset and set up anew
// at its end.
func (s *hostileState) round() error {
	r := s.r
	if err := s.signalFlood("signal_norel"); err != nil {
		return err
	}
	// A DMB whose rgid is each victim: now SIGNALs to it pass the
	// relationship check, and only the rate limit stops them.
	var regs []*call
	for i, v := range s.victims {
		regs = append(regs, &call{req: abi.Request{Op: abi.OpRegisterDMB, Addr: r.scratch.Addr(scratchDMB + 4096*(i%2)),
			Len: 4096, GID: v, Index: uint32(i)}})
	}
	if err := r.must(s.e, regs...); err != nil {
		return fmt.Errorf("REGISTER_DMB for a victim: %w", err)
	}
	if err := s.signalFlood("signal_rel"); err != nil {
		return err
	}
	var stale []uint64
	var unregs []*call
	for _, c := range regs {
		stale = append(stale, c.resp.Value)
		unregs = append(unregs, &call{req: abi.Request{Op: abi.OpUnregisterDMB, Token: c.resp.Value}})
	}
	if err := r.must(s.e, unregs...); err != nil {
		return fmt.Errorf("UNREGISTER_DMB of its own DMB: %w", err)
	}

	// Forged tokens: none is live and ours, so every one must be refused.
	var tokens []uint64
	for _, t := range stale {
		tokens = append(tokens, t, t+1, t-1, t^1<<63)
	}
	var rnd [8]byte
	for range 4 {
		if _, err := rand.Read(rnd[:]); err != nil {
			return err
		}
		if t := binary.LittleEndian.Uint64(rnd[:]); t != 0 {
			tokens = append(tokens, t)
		}
	}
	copy(r.scratch.Bytes()[scratchData:], "forged data.....")
	data := []virtq.Seg{pci.SegOf(r.scratch, scratchData, 16)}
	var forged []*call
	for _, t := range tokens {
		forged = append(forged,
			&call{req: abi.Request{Op: abi.OpMove, Token: t, Len: 16}, data: data},
			&call{req: abi.Request{Op: abi.OpAttachDMB, Token: t}},
			&call{req: abi.Request{Op: abi.OpUnregisterDMB, Token: t}},
			&call{req: abi.Request{Op: abi.OpDetachDMB, Token: t}})
	}
	if err := r.run(s.e, forged); err != nil {
		return fmt.Errorf("forged tokens: %w", err)
	}
	s.tally("forged", forged)

	// Malformed chains, each kind once.
	tables := r.scratch.Addr(scratchTables)
	tb := r.scratch.Bytes()[scratchTables:]
	query := abi.Request{Op: abi.OpQueryRGID, GID: r.cfg.GID}
	kinds := []struct {
		name string
		c    *call
	}{
		{"header_outside_ram", &call{req: query, build: func(_, resp uint64) []virtq.Desc {
			return []virtq.Desc{{Addr: outsideRAM, Len: abi.RequestSize, Next: 1}, {Addr: resp, Len: abi.ResponseSize, Write: true, Next: -1}}
		}}},
		{"data_outside_ram", &call{req: abi.Request{Op: abi.OpMove, Token: 1, Len: 64}, build: func(hdr, resp uint64) []virtq.Desc {
			return []virtq.Desc{{Addr: hdr, Len: abi.RequestSize, Next: 1}, {Addr: outsideRAM, Len: 64, Next: 2},
				{Addr: resp, Len: abi.ResponseSize, Write: true, Next: -1}}
		}}},
		{"loop", &call{req: query, build: func(hdr, _ uint64) []virtq.Desc {
			return []virtq.Desc{{Addr: hdr, Len: abi.RequestSize, Next: 1}, {Addr: hdr, Len: abi.RequestSize, Next: 0}}
		}}},
		{"indirect_too_long", &call{req: query, build: func(_, _ uint64) []virtq.Desc {
			return []virtq.Desc{{Addr: tables, Len: 16 * (32768 + 1), Indirect: true, Next: -1}}
		}}},
		{"indirect_nested", &call{req: query, build: func(hdr, resp uint64) []virtq.Desc {
			// Table 1 (at tables) holds only an indirect descriptor
			// pointing at table 2 (at tables+64), a well-formed chain.
			_ = virtq.EncodeDescs(tb[64:], []virtq.Desc{{Addr: hdr, Len: abi.RequestSize, Next: 1}, {Addr: resp, Len: abi.ResponseSize, Write: true, Next: -1}})
			_ = virtq.EncodeDescs(tb, []virtq.Desc{{Addr: tables + 64, Len: 32, Indirect: true, Next: -1}})
			return []virtq.Desc{{Addr: tables, Len: 16, Indirect: true, Next: -1}}
		}}},
		{"no_response_room", &call{req: query, build: func(hdr, _ uint64) []virtq.Desc {
			return []virtq.Desc{{Addr: hdr, Len: abi.RequestSize, Next: -1}}
		}}},
		{"readable_after_writable", &call{req: query, build: func(hdr, resp uint64) []virtq.Desc {
			return []virtq.Desc{{Addr: hdr, Len: abi.RequestSize, Next: 1}, {Addr: resp, Len: abi.ResponseSize, Write: true, Next: 2},
				{Addr: hdr, Len: abi.RequestSize, Next: -1}}
		}}},
		{"address_wraps", &call{req: query, build: func(_, resp uint64) []virtq.Desc {
			return []virtq.Desc{{Addr: 0xffff_ffff_ffff_f000, Len: 0x2000, Next: 1}, {Addr: resp, Len: abi.ResponseSize, Write: true, Next: -1}}
		}}},
		{"lengths_overflow", &call{req: abi.Request{Op: abi.OpMove, Token: 1, Len: 1 << 33}, build: func(hdr, resp uint64) []virtq.Desc {
			d := r.scratch.Addr(scratchData)
			return []virtq.Desc{{Addr: hdr, Len: abi.RequestSize, Next: 1}, {Addr: d, Len: 0xffff_ffff, Next: 2},
				{Addr: d, Len: 0xffff_ffff, Next: 3}, {Addr: resp, Len: abi.ResponseSize, Write: true, Next: -1}}
		}}},
		// Well-formed as a chain, but the header's length is not the
		// data's: the device answers INVALID.
		{"header_lies", &call{req: abi.Request{Op: abi.OpMove, Token: 1, Len: 1 << 40}, data: data}},
	}
	for _, k := range kinds {
		// One at a time: the nested tables are shared scratch memory.
		if err := r.run(s.e, []*call{k.c}); err != nil {
			return fmt.Errorf("malformed chain %s: %w", k.name, err)
		}
		s.counts["malformed."+k.name+"."+k.c.status()]++
	}
	if err := r.harvestEvents(s.events); err != nil {
		return fmt.Errorf("event queue: %w", err)
	}

	// DMBs for the victims again, left registered: the reset below drops
	// them, and each victim gets a GID-gone event naming this device,
	// which its driver must take for what it is.
	for _, c := range regs {
		c.written, c.resp = 0, abi.Response{}
	}
	if err := r.must(s.e, regs...); err != nil {
		return fmt.Errorf("REGISTER_DMB for a victim: %w", err)
	}

	// The avail idx jump: the backend marks the request queue broken
	// until the device is reset, so reset it and start again.
	r.req.CorruptAvailIdx(r.req.Size() + 1)
	s.jumps++
	return s.reopen()
}

// reopen resets the device and sets it up anew.
func (s *hostileState) reopen() error {
	if s.r != nil {
		s.r.close()
		s.r = nil
		s.resets++
	}
	r, err := openRaw(s.dev, s.hpages)
	if err != nil {
		return fmt.Errorf("opening the device again: %w", err)
	}
	s.r = r
	return nil
}

// stillServed shows the device still does what it is asked to.
func (s *hostileState) stillServed() error {
	r := s.r
	if err := r.must(s.e, &call{req: abi.Request{Op: abi.OpQueryRGID, GID: r.cfg.GID}}); err != nil {
		return fmt.Errorf("QUERY_RGID self: %w", err)
	}
	dmb := r.scratch.Bytes()[scratchDMB : scratchDMB+4096]
	clear(dmb)
	reg := &call{req: abi.Request{Op: abi.OpRegisterDMB, Addr: r.scratch.Addr(scratchDMB), Len: 4096, GID: r.cfg.GID, Index: 7}}
	if err := r.must(s.e, reg); err != nil {
		return fmt.Errorf("REGISTER_DMB self: %w", err)
	}
	msg := "still served, after all that"
	copy(r.scratch.Bytes()[scratchData:], msg)
	mv := &call{req: abi.Request{Op: abi.OpMove, Token: reg.resp.Value, Offset: 100, Len: uint64(len(msg))},
		data: []virtq.Seg{pci.SegOf(r.scratch, scratchData, len(msg))}}
	if err := r.must(s.e, mv); err != nil {
		return fmt.Errorf("MOVE to self: %w", err)
	}
	if got := string(dmb[100 : 100+len(msg)]); got != msg {
		return fmt.Errorf("MOVE to self landed as %q", got)
	}
	if err := r.must(s.e, &call{req: abi.Request{Op: abi.OpUnregisterDMB, Token: reg.resp.Value}}); err != nil {
		return fmt.Errorf("UNREGISTER_DMB self: %w", err)
	}
	return nil
}

func hostile(e *Env) error {
	var victims []uint64
	for _, f := range strings.Split(e.Arg("victims", ""), ",") {
		if f == "" {
			continue
		}
		v, err := strconv.ParseUint(f, 0, 64)
		if err != nil || v == 0 {
			return fmt.Errorf("ism.victims: %q is not a GID", f)
		}
		victims = append(victims, v)
	}
	if len(victims) == 0 || len(victims) > 2 {
		return errors.New("ism.victims: one or two GIDs, comma-separated")
	}
	rounds := e.ArgInt("rounds", 0)
	var stop atomic.Bool
	if rounds <= 0 {
		// Opened before flooding=1: the host may write "stop" as soon
		// as it has seen that.
		ctl, err := openHostControl()
		if err != nil {
			return err
		}
		defer ctl.Close()
		go func() {
			if ctl.WaitLine(e.Ctx, "stop") == nil {
				stop.Store(true)
			}
		}()
	}
	devs, err := pci.Find("", pci.VirtioVendor, uint16(pci.VirtioDeviceBase+e.ArgInt("virtio_id", abi.DefaultVirtioID)))
	if err != nil {
		return err
	}
	s := &hostileState{e: e, dev: devs[0], hpages: e.ArgInt("hugepages", 8), victims: victims, flood: e.ArgInt("flood", 256),
		counts: map[string]int{}, events: map[string]int{}}
	if s.flood <= 0 {
		return fmt.Errorf("ism.flood=%d", s.flood)
	}
	if err := s.reopen(); err != nil {
		return err
	}
	defer func() {
		if s.r != nil {
			s.r.close()
		}
	}()
	e.Result("gid", fmt.Sprintf("%#x", s.r.cfg.GID))
	n := 0
	for ; rounds <= 0 && !stop.Load() || rounds > 0 && n < rounds; n++ {
		if e.Ctx.Err() != nil {
			return fmt.Errorf("still flooding after %d rounds at the time limit (no stop from the host)", n)
		}
		if err := s.round(); err != nil {
			return fmt.Errorf("round %d: %w", n, err)
		}
		if n == 0 {
			e.Result("flooding", 1)
		}
	}
	served := s.stillServed()
	if served == nil {
		e.Result("still_served", 1)
	}
	if err := s.r.harvestEvents(s.events); err != nil {
		return err
	}
	e.Result("rounds", n)
	e.Result("avail_jumps", s.jumps)
	e.Result("resets", s.resets)
	e.Result("signals_sent", s.signals)
	if s.signalTime > 0 {
		e.Result("signals_per_s", fmt.Sprintf("%.0f", float64(s.signals)/s.signalTime.Seconds()))
	}
	keys := make([]string, 0, len(s.counts))
	for k := range s.counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		e.Result(k, s.counts[k])
	}
	for k, v := range s.events {
		e.Result("events."+k, v)
	}
	if n := s.counts["forged.OK"]; n > 0 {
		return fmt.Errorf("%d requests with forged tokens were accepted", n)
	}
	return served
}
