package ism

// Fault injection, for testing SMC-D stacks against a device that misbehaves
// as no real ISM device does on purpose: an operator (ism-backend's control
// socket) sets standing faults on a VM (lost or late signals, failing MOVEs,
// a slow request queue) and fires one-shot ones (a DMB revoked, a GID-gone
// event). Off by default; the data path pays one atomic load (Fabric.faultsOn)
// while none is set.
//
// Faults name their target VM by its guest name (Fabric.Connect's name), so
// they outlive a reconnect. Each injected fault is counted in the target
// VM's Stats.Faults, by kind.

import (
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
)

// FaultKind is what a fault does.
type FaultKind uint8

const (
	// FaultDropSignals: every Every-th signal toward (or from) the VM is
	// lost: a signalled MOVE copies its data but counts no signal in the
	// owner's SBA and raises no interrupt; a SIGNAL's software event is not
	// posted. The sender is told OK, as by a device that loses it.
	FaultDropSignals FaultKind = iota
	// FaultDelaySignals: those signals are held for Delay and then
	// delivered, in the order they were sent.
	FaultDelaySignals
	// FaultFailMoves: MOVEs from or to the VM (or into one of its DMBs)
	// fail with Status and change nothing, Count times or until cleared.
	FaultFailMoves
	// FaultThrottle: the VM's request queue serves at most Rate chains a
	// second (the transport asks Device.ThrottleChain).
	FaultThrottle
	// FaultRevokeDMB (one-shot, Fabric.RevokeDMB): a DMB unregistered by
	// the device, its owner and rgid told with EventDMB.
	FaultRevokeDMB
	// FaultGIDGone (one-shot, Fabric.SendGIDGone): the VM's peers get
	// EventGID for it, though it stays connected.
	FaultGIDGone

	NumFaultKinds = int(FaultGIDGone) + 1
)

var faultNames = [NumFaultKinds]string{"drop-signals", "delay-signals", "fail-moves", "throttle", "revoke-dmb", "gid-gone"}

func (k FaultKind) String() string {
	if int(k) < NumFaultKinds {
		return faultNames[k]
	}
	return fmt.Sprintf("fault(%d)", k)
}

// ParseFaultKind is the inverse of FaultKind.String.
func ParseFaultKind(s string) (FaultKind, error) {
	for i, n := range faultNames {
		if n == s {
			return FaultKind(i), nil
		}
	}
	return 0, fmt.Errorf("unknown fault kind %q (known: %s)", s, strings.Join(faultNames[:], ", "))
}

// Standing reports whether the kind is set and cleared (the others are
// one-shot actions).
func (k FaultKind) Standing() bool { return k <= FaultThrottle }

// Bounds of a FaultSpec, so that a typo cannot set a fault that never ends
// or never fires.
const (
	MaxFaultEvery = 1 << 20
	MaxFaultCount = 1 << 32
	MaxFaultDelay = time.Hour
	MaxFaultRate  = 1 << 24
	// MaxFaults bounds the standing faults at once.
	MaxFaults = 64
	// faultDelayQueue bounds the signals one delay fault holds; beyond,
	// a signal is dropped (and counted as a drop).
	faultDelayQueue = 4096
)

// FaultSpec is a standing fault as the operator asks for it.
type FaultSpec struct {
	Kind FaultKind
	VM   string // the target VM's name
	// From: signals and MOVEs the VM sends; otherwise those toward it (the
	// VM owns the DMB).
	From bool
	// Token: fail-moves toward the VM only into this DMB of it; 0: any.
	Token  uint64
	Every  uint64        // drop-signals: drop the Every-th, 2·Every-th, ... (1: all)
	Count  uint64        // fail-moves: fail this many, then none; 0: until cleared
	Status abi.Status    // fail-moves: the status the MOVE gets
	Delay  time.Duration // delay-signals
	Rate   uint64        // throttle: request chains per second
}

// Check validates s (the VM's existence is the caller's to check).
func (s FaultSpec) Check() error {
	if s.VM == "" {
		return errors.New("a fault needs a target VM")
	}
	if !s.Kind.Standing() {
		return fmt.Errorf("%v is not a standing fault", s.Kind)
	}
	bad := func(field string, v any, want string) error {
		return fmt.Errorf("%v: %s %v out of range (%s)", s.Kind, field, v, want)
	}
	if s.Token != 0 && (s.Kind != FaultFailMoves || s.From) {
		return fmt.Errorf("%v: a DMB token only for fail-moves toward its owner", s.Kind)
	}
	if s.Kind == FaultThrottle && s.From {
		return errors.New("throttle: a VM's queue has no direction")
	}
	switch s.Kind {
	case FaultDropSignals:
		if s.Every < 1 || s.Every > MaxFaultEvery {
			return bad("every", s.Every, fmt.Sprintf("1..%d", MaxFaultEvery))
		}
	case FaultDelaySignals:
		if s.Delay <= 0 || s.Delay > MaxFaultDelay {
			return bad("delay", s.Delay, "above 0, at most "+MaxFaultDelay.String())
		}
	case FaultFailMoves:
		if s.Count > MaxFaultCount {
			return bad("count", s.Count, fmt.Sprintf("0 (until cleared) to %d", uint64(MaxFaultCount)))
		}
		if s.Status == abi.StatusOK || int(s.Status) >= NumStatus {
			return bad("status", s.Status, fmt.Sprintf("1..%d, an abi status other than ok", NumStatus-1))
		}
	case FaultThrottle:
		if s.Rate < 1 || s.Rate > MaxFaultRate {
			return bad("rate", s.Rate, fmt.Sprintf("1..%d chains per second", MaxFaultRate))
		}
	}
	return nil
}

// String describes s for a log line or a listing.
func (s FaultSpec) String() string {
	dir := "to"
	if s.From {
		dir = "from"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%v %s %s", s.Kind, dir, s.VM)
	if s.Kind == FaultThrottle {
		b.Reset()
		fmt.Fprintf(&b, "%v %s", s.Kind, s.VM)
	}
	switch s.Kind {
	case FaultDropSignals:
		fmt.Fprintf(&b, " every %d", s.Every)
	case FaultDelaySignals:
		fmt.Fprintf(&b, " delay %v", s.Delay)
	case FaultFailMoves:
		if s.Token != 0 {
			fmt.Fprintf(&b, " dmb %#x", s.Token)
		}
		if s.Count == 0 {
			b.WriteString(" all")
		} else {
			fmt.Fprintf(&b, " count %d", s.Count)
		}
		fmt.Fprintf(&b, " status %s", s.Status.Name())
	case FaultThrottle:
		fmt.Fprintf(&b, " rate %d/s", s.Rate)
	}
	return b.String()
}

// Fault is a standing fault as Fabric.Faults lists it.
type Fault struct {
	ID uint64
	FaultSpec
	Since    time.Time
	By       string // who set it (the control socket's peer)
	Injected uint64 // signals dropped or delayed, MOVEs failed, chains held back
	Left     uint64 // fail-moves with a Count: failures still to come
}

// fault is one standing fault.
type fault struct {
	id    uint64
	spec  FaultSpec
	since time.Time
	by    string

	seen     atomic.Uint64 // matching signals so far (drop-signals)
	injected atomic.Uint64
	left     atomic.Uint64 // fail-moves with a Count

	// throttle: a token bucket of one chain, refilled at spec.Rate
	tmu  sync.Mutex
	next time.Time

	// delay-signals: held signals in order, and the goroutine that
	// delivers them; stop makes it deliver the rest at once and exit.
	held chan heldSignal
	stop chan struct{}
	done chan struct{}
}

// heldSignal is a signal a delay fault holds: a signalled MOVE's (owner,
// DMB, DMBE) or a SIGNAL's event for target.
type heldSignal struct {
	due    time.Time
	owner  *Device
	e      *dmbEntry
	dmbe   uint32
	target *Device
	ev     abi.Event
}

// faultSet is a fabric's standing faults.
type faultSet struct {
	mu     sync.RWMutex
	list   []*fault
	nextID uint64
}

// FaultsOn reports whether any standing fault is set: the one check the
// data path makes.
func (f *Fabric) FaultsOn() bool { return f.faultsOn.Load() }

// SetFault adds a standing fault and logs one warning line naming it and
// by (who asked). It returns the fault's id, for ClearFault.
func (f *Fabric) SetFault(s FaultSpec, by string) (uint64, error) {
	if err := s.Check(); err != nil {
		return 0, err
	}
	x := &fault{spec: s, since: time.Now(), by: by}
	x.left.Store(s.Count)
	f.faults.mu.Lock()
	if len(f.faults.list) >= MaxFaults {
		f.faults.mu.Unlock()
		return 0, fmt.Errorf("%d faults are set already: clear some first", MaxFaults)
	}
	f.faults.nextID++
	x.id = f.faults.nextID
	if s.Kind == FaultDelaySignals {
		x.held = make(chan heldSignal, faultDelayQueue)
		x.stop, x.done = make(chan struct{}), make(chan struct{})
		go x.deliver()
	}
	f.faults.list = append(f.faults.list, x)
	f.faultsOn.Store(true)
	f.faults.mu.Unlock()
	f.log.WithFields(logrus.Fields{"fault": x.id, "by": by}).Warn("ism: FAULT INJECTION ON: " + s.String())
	return x.id, nil
}

// ClearFault removes the standing fault id (0: every one) and logs it.
// Signals a delay fault holds are delivered before it returns. It returns
// the faults it removed.
func (f *Fabric) ClearFault(id uint64, by string) ([]Fault, error) {
	f.faults.mu.Lock()
	var gone []*fault
	f.faults.list = slices.DeleteFunc(f.faults.list, func(x *fault) bool {
		if id == 0 || x.id == id {
			gone = append(gone, x)
			return true
		}
		return false
	})
	f.faultsOn.Store(len(f.faults.list) > 0)
	f.faults.mu.Unlock()
	if id != 0 && len(gone) == 0 {
		return nil, fmt.Errorf("no fault %d is set", id)
	}
	out := make([]Fault, 0, len(gone))
	for _, x := range gone {
		if x.stop != nil {
			close(x.stop)
			<-x.done
		}
		out = append(out, x.info())
		f.log.WithFields(logrus.Fields{"fault": x.id, "by": by, "injected": x.injected.Load()}).
			Warn("ism: fault injection off: " + x.spec.String())
	}
	return out, nil
}

// Faults lists the standing faults, oldest first.
func (f *Fabric) Faults() []Fault {
	f.faults.mu.RLock()
	defer f.faults.mu.RUnlock()
	out := make([]Fault, 0, len(f.faults.list))
	for _, x := range f.faults.list {
		out = append(out, x.info())
	}
	return out
}

func (x *fault) info() Fault {
	return Fault{ID: x.id, FaultSpec: x.spec, Since: x.since, By: x.by, Injected: x.injected.Load(), Left: x.left.Load()}
}

// count counts one injected fault on dev, the fault's target.
func (x *fault) count(dev *Device) {
	x.injected.Add(1)
	dev.stats.faults[x.spec.Kind].Add(1)
}

// matches reports whether x applies to a signal or MOVE from sender to
// owner (the receiving device), and which of the two is its target.
func (x *fault) matches(sender, owner *Device) *Device {
	if x.spec.From {
		if sender.name == x.spec.VM {
			return sender
		}
		return nil
	}
	if owner.name == x.spec.VM {
		return owner
	}
	return nil
}

// signalFault decides the fate of a signal from sender to target: drop it,
// hold it on a delay fault, or deliver it (neither). Every matching drop
// fault counts the signal, so "every N" is exact per fault.
func (f *Fabric) signalFault(sender, target *Device) (drop bool, delay *fault) {
	f.faults.mu.RLock()
	defer f.faults.mu.RUnlock()
	for _, x := range f.faults.list {
		if x.spec.Kind != FaultDropSignals && x.spec.Kind != FaultDelaySignals {
			continue
		}
		dev := x.matches(sender, target)
		if dev == nil {
			continue
		}
		switch {
		case x.spec.Kind == FaultDropSignals:
			if x.seen.Add(1)%x.spec.Every == 0 {
				x.count(dev)
				drop = true
			}
		case delay == nil:
			delay = x
			x.count(dev)
		}
	}
	if drop {
		delay = nil
	}
	return drop, delay
}

// moveFault returns the status a fail-moves fault gives a MOVE from sender
// into e (StatusOK: none).
func (f *Fabric) moveFault(sender *Device, e *dmbEntry, token uint64) abi.Status {
	f.faults.mu.RLock()
	defer f.faults.mu.RUnlock()
	for _, x := range f.faults.list {
		if x.spec.Kind != FaultFailMoves {
			continue
		}
		dev := x.matches(sender, e.owner)
		if dev == nil || (x.spec.Token != 0 && x.spec.Token != token) {
			continue
		}
		if x.spec.Count != 0 && !takeOne(&x.left) {
			continue // spent
		}
		x.count(dev)
		return x.spec.Status
	}
	return abi.StatusOK
}

// takeOne decrements n unless it is 0, and says whether it did.
func takeOne(n *atomic.Uint64) bool {
	for {
		v := n.Load()
		if v == 0 {
			return false
		}
		if n.CompareAndSwap(v, v-1) {
			return true
		}
	}
}

// ThrottleChain is asked by the transport before it takes a request chain
// while FaultsOn: 0 means go on; otherwise the queue is throttled and may
// take the next chain after that long (the transport stops, and wakes the
// queue then).
func (d *Device) ThrottleChain(now time.Time) time.Duration {
	f := d.f
	f.faults.mu.RLock()
	defer f.faults.mu.RUnlock()
	for _, x := range f.faults.list {
		if x.spec.Kind != FaultThrottle || x.spec.VM != d.name {
			continue
		}
		x.tmu.Lock()
		wait := x.next.Sub(now)
		if wait <= 0 {
			x.next = now.Add(time.Second / time.Duration(x.spec.Rate))
		}
		x.tmu.Unlock()
		if wait > 0 {
			x.count(d)
			return wait
		}
	}
	return 0
}

// hold queues a signal on the delay fault x; a full queue drops it.
func (x *fault) hold(s heldSignal) {
	s.due = time.Now().Add(x.spec.Delay)
	select {
	case x.held <- s:
	default:
	}
}

// deliver is a delay fault's goroutine: it delivers each held signal when
// it is due, in order, and the rest at once when the fault is cleared.
func (x *fault) deliver() {
	defer close(x.done)
	flushing := false
	for {
		var s heldSignal
		select {
		case s = <-x.held:
		case <-x.stop:
			flushing = true
			select {
			case s = <-x.held:
			default:
				return
			}
		}
		if !flushing {
			if wait := time.Until(s.due); wait > 0 {
				t := time.NewTimer(wait)
				select {
				case <-t.C:
				case <-x.stop:
					t.Stop()
					flushing = true
				}
			}
		}
		s.send()
	}
}

// send delivers a held signal, if its target is still there to take it.
func (s heldSignal) send() {
	if s.target != nil {
		s.target.post(s.ev)
		return
	}
	s.owner.lateSignal(s.e, s.dmbe)
}

// lateSignal counts a held signal of a MOVE into e in o's SBA and raises
// the interrupt, as moveLocked does, unless the DMB or the SBA is gone
// meanwhile. A fault in the owner's RAM (a shrunk memory file) loses the
// signal instead of the process.
func (o *Device) lateSignal(e *dmbEntry, dmbe uint32) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil && !faultOutside(r, nil) {
			panic(r)
		}
	}()
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.gone || !e.live || !o.sbaSet {
		return
	}
	mem := o.mem.Acquire()
	defer mem.Release()
	b, err := mem.Bytes(o.sbaGPA, abi.SBASize)
	if err != nil {
		return
	}
	sba, err := abi.NewSBA(b)
	if err != nil {
		return
	}
	sba.Signal(e.index, dmbe)
	if o.interrupts {
		o.n.Interrupt()
		o.stats.interrupts.Add(1)
	}
}

// deviceByName returns the connected device of the VM called name.
func (f *Fabric) deviceByName(name string) *Device {
	f.mu.RLock()
	defer f.mu.RUnlock()
	rec := f.names[name]
	if rec == nil {
		return nil
	}
	last := rec.devs[len(rec.devs)-1]
	if f.devices[last.gid] != last {
		return nil
	}
	return last
}

// Errors of RevokeDMB and SendGIDGone.
var (
	ErrNotConnected = errors.New("ism: VM not connected")
	ErrNoSuchDMB    = errors.New("ism: no such DMB")
)

// RevokeDMB unregisters a DMB of the VM owner as if its driver had, picked
// by token or, with token 0, by its DMB index. The device then tells the
// owner (EventDMB, code abi.DMBRevoked, with the token and the owner's own
// GID) and the DMB's rgid (the same event) that it is gone: SMC would
// otherwise learn of it only from the next MOVE's NOENTRY, and the owner
// never. Attachers also get the UNREGISTER's own EventDMB. It returns the
// token.
func (f *Fabric) RevokeDMB(owner string, token uint64, index uint32, by string) (uint64, error) {
	d := f.deviceByName(owner)
	if d == nil {
		return 0, fmt.Errorf("%w: %q", ErrNotConnected, owner)
	}
	var e *dmbEntry
	d.mu.RLock()
	if token != 0 {
		e = d.dmbs[token]
	} else {
		for tok, x := range d.dmbs {
			if x.index == index {
				e, token = x, tok
			}
		}
	}
	d.mu.RUnlock()
	if e == nil {
		if token != 0 {
			return 0, fmt.Errorf("%w: VM %q owns no DMB with token %#x", ErrNoSuchDMB, owner, token)
		}
		return 0, fmt.Errorf("%w: VM %q has no DMB at index %d", ErrNoSuchDMB, owner, index)
	}
	// Attachers also get the UNREGISTER's own EventDMB (code DMBGone),
	// which unmaps their view; the revoke's says why.
	if err := d.UnregisterDMB(token); err != nil {
		return 0, fmt.Errorf("VM %q: DMB %#x: %w", owner, token, err)
	}
	d.stats.faults[FaultRevokeDMB].Add(1)
	ev := abi.Event{Type: abi.EventDMB, Code: abi.DMBRevoked, Token: token, GID: d.gid}
	d.post(ev)
	if r := f.device(e.rgid); r != nil && r != d {
		r.post(ev)
	}
	f.log.WithFields(logrus.Fields{"vm": owner, "token": hex(token), "index": e.index, "rgid": hex(e.rgid), "by": by}).
		Warn("ism: FAULT INJECTION: DMB revoked")
	return token, nil
}

// SendGIDGone posts EventGID for the VM called name to each device its
// disconnect would tell (the rgids of its DMBs, the owners of DMBs whose
// rgid it is), while it stays connected. It returns how many were told.
func (f *Fabric) SendGIDGone(name, by string) (int, error) {
	d := f.deviceByName(name)
	if d == nil {
		return 0, fmt.Errorf("%w: %q", ErrNotConnected, name)
	}
	rgids := map[uint64]bool{}
	d.mu.RLock()
	for _, e := range d.dmbs {
		rgids[e.rgid] = true
	}
	d.mu.RUnlock()
	f.dmbs.Range(func(_ uint64, e *dmbEntry) bool {
		if e.rgid == d.gid {
			rgids[e.owner.gid] = true
		}
		return true
	})
	delete(rgids, d.gid)
	n := 0
	for g := range rgids {
		if p := f.device(g); p != nil && p.post(abi.Event{Type: abi.EventGID, GID: d.gid}) == postQueued {
			n++
		}
	}
	d.stats.faults[FaultGIDGone].Add(1)
	f.log.WithFields(logrus.Fields{"vm": name, "gid": hex(d.gid), "peers": n, "by": by}).
		Warn("ism: FAULT INJECTION: GID-gone event sent to the VM's peers")
	return n, nil
}
