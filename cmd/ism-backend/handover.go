package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/handover"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/ismvirtio"
	"github.com/ism-backend/ism-backend/vhostuser"
)

// Upgrading without a disconnect (docs/handover.md): the running backend
// listens on its handover socket; a new process started with the same
// flags plus -takeover PATH connects there and takes every VM over, fds and
// state, while the guests see a pause.

// stateVersion is the version of the state format this binary writes and
// reads. A change to upgradeState or to what it holds that an older binary
// would misread takes a new version.
const stateVersion = 1

// abortTimeout bounds the sending of an abort.
const abortTimeout = 5 * time.Second

// upgradeState is everything the old process hands over besides the fds
// (FD fields index the fd table sent with it).
type upgradeState struct {
	Handover int    // the handover socket's listener
	Control  int    // the control socket's listener
	Metrics  int    // the -metrics-addr listener; -1: none
	StatsSeq uint64 // the stats file's last seq: the new process goes on from it
	VMs      []vmState
	Fabric   *ism.FabricState
	// The VMs added and removed at runtime (vmctl.go), relative to the
	// old process's -vm: the new process serves its own -vm less Removed,
	// plus Added. Empty unless VMs were added or removed, so that a state
	// without such changes is what version 1 always was; a binary that
	// predates them refuses one with (an unknown field).
	Added   []vmSpec `json:",omitempty"`
	Removed []string `json:",omitempty"`
}

// vmState is one VM: its socket and connection, and the events waiting for
// its driver (nil when its device is not started).
type vmState struct {
	vhostuser.ExportedVM
	Events *ismvirtio.EventsState `json:",omitempty"`
}

// decodeState decodes a state of format version, checking its shape (the
// imports check every value): a hostile or truncated state is an error.
func decodeState(version uint32, b []byte) (*upgradeState, error) {
	if version != stateVersion {
		return nil, fmt.Errorf("state version %d: this binary reads version %d", version, stateVersion)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var st upgradeState
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	if dec.More() {
		return nil, errors.New("state: data after the state")
	}
	if st.Fabric == nil {
		return nil, errors.New("state: no fabric")
	}
	seen := map[string]bool{}
	for _, vm := range st.VMs {
		if !vmName.MatchString(vm.Name) || seen[vm.Name] {
			return nil, fmt.Errorf("state: VM name %q", vm.Name)
		}
		seen[vm.Name] = true
		if vm.Conn != nil && vm.Conn.Started != (vm.Events != nil) {
			return nil, fmt.Errorf("state: VM %s: events without a started device, or none with one", vm.Name)
		}
	}
	var added []vmSpec
	for _, v := range st.Added {
		if !vmName.MatchString(v.Name) || v.GID == 0 {
			return nil, fmt.Errorf("state: added VM %q GID %#x", v.Name, v.GID)
		}
		if err := conflict(added, v); err != nil {
			return nil, fmt.Errorf("state: added VMs: %w", err)
		}
		added = append(added, v)
	}
	for _, name := range st.Removed {
		if !vmName.MatchString(name) {
			return nil, fmt.Errorf("state: removed VM %q", name)
		}
	}
	return &st, nil
}

// listenersToHand are the process's own listeners a new process takes
// over with the VMs' (nil: none).
type listenersToHand struct {
	handover, control *net.UnixListener
	metrics           *net.TCPListener
}

// exportState describes the frozen server, the fabric and the listeners;
// the caller owns the fds.
func exportState(fz *vhostuser.Frozen, srv *vhostuser.Server, fabric *ism.Fabric, vt *vmTable, lns listenersToHand, stats *statsWriter) ([]byte, []int, error) {
	vms, fds, err := fz.Export()
	if err != nil {
		return nil, nil, err
	}
	fail := func(err error) ([]byte, []int, error) {
		closeFDs(fds)
		return nil, nil, err
	}
	fst, ffds, err := fabric.Export()
	if err != nil {
		return fail(err)
	}
	for i := range fst.Devices {
		for j := range fst.Devices[i].DMBs {
			if e := &fst.Devices[i].DMBs[j]; e.BufFD >= 0 {
				e.BufFD += len(fds)
			}
		}
	}
	fds = append(fds, ffds...)
	st := upgradeState{Fabric: fst}
	st.Added, st.Removed = vt.changes()
	if stats != nil {
		st.StatsSeq = stats.seq.Load()
	}
	add := func(ln syscall.Conn) (int, error) {
		fd, err := handover.ListenerFD(ln)
		if err != nil {
			return -1, err
		}
		fds = append(fds, fd)
		return len(fds) - 1, nil
	}
	if st.Handover, err = add(lns.handover); err != nil {
		return fail(err)
	}
	if st.Control, err = add(lns.control); err != nil {
		return fail(err)
	}
	st.Metrics = -1
	if lns.metrics != nil {
		if st.Metrics, err = add(lns.metrics); err != nil {
			return fail(err)
		}
	}
	for _, vm := range vms {
		vs := vmState{ExportedVM: vm}
		if vm.Conn != nil && vm.Conn.Started {
			d := srv.Guest(vm.Name)
			if d == nil {
				return fail(fmt.Errorf("VM %s: no device to export", vm.Name))
			}
			b, ok := d.Backend().(*ismvirtio.Backend)
			if !ok {
				return fail(fmt.Errorf("VM %s: no ISM backend to export", vm.Name))
			}
			ev := b.ExportEvents()
			vs.Events = &ev
		}
		st.VMs = append(st.VMs, vs)
	}
	b, err := json.Marshal(&st)
	if err != nil {
		return fail(err)
	}
	return b, fds, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// oldSide is the running backend's half: it serves handover requests on
// hoLn until one succeeds (done is closed then) or ctx ends.
type oldSide struct {
	log     *logrus.Logger
	opts    *options
	vt      *vmTable // no VM is added or removed during a handover
	srv     *vhostuser.Server
	fabric  *ism.Fabric
	hoLn    *net.UnixListener
	lns     listenersToHand
	stats   *statsWriter // nil without -stats-file
	done    chan struct{}
	timeout time.Duration
}

func (o *oldSide) serve(ctx context.Context) {
	for {
		c, err := handover.Accept(o.hoLn)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			o.log.WithError(err).Warn("handover socket: connection refused")
			continue
		}
		paused, err := o.handOver(ctx, c)
		c.Close()
		if err == nil {
			o.log.WithField("paused", paused.Round(time.Millisecond)).Info("handed over to the new process; exiting")
			close(o.done)
			return
		}
		f := o.log.WithError(err)
		if paused > 0 {
			f = f.WithField("paused", paused.Round(time.Millisecond))
		}
		f.Warn("handover failed; serving on as before")
	}
}

// handOver runs one handover; on an error everything goes on as before.
// paused is how long the VMs were held here: from the freeze until the
// commit went out (or until the thaw, on an error after the freeze). The
// new process starts them right after the commit.
func (o *oldSide) handOver(ctx context.Context, c *handover.Conn) (paused time.Duration, err error) {
	c.SetDeadline(time.Now().Add(o.timeout))
	vs, err := c.ReadHello()
	if err != nil {
		return 0, err
	}
	if !slices.Contains(vs, stateVersion) {
		err := fmt.Errorf("this backend writes state version %d, the new binary reads %v", stateVersion, vs)
		c.Abort(err.Error())
		return 0, err
	}
	// The VMs frozen are the VMs exported: none added or removed until
	// the handover is done, and none after one that succeeded.
	o.vt.opMu.Lock()
	defer o.vt.opMu.Unlock()
	if o.vt.closed != "" {
		err := errors.New(o.vt.closed)
		c.Abort(err.Error())
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	frozen := time.Now()
	fz, err := o.srv.Freeze(ctx)
	if err != nil {
		c.SetDeadline(time.Now().Add(abortTimeout))
		c.Abort(err.Error())
		return 0, err
	}
	b, fds, err := exportState(fz, o.srv, o.fabric, o.vt, o.lns, o.stats)
	if err == nil {
		err = c.SendState(stateVersion, b, fds)
		closeFDs(fds)
	}
	if err == nil {
		err = c.AwaitReady()
	}
	if err != nil {
		// Abort before the VMs go on here: the new process runs none
		// of them until commit, and exits on the abort. A fresh
		// deadline: the old one may be what failed.
		c.SetDeadline(time.Now().Add(abortTimeout))
		c.Abort(err.Error())
		fz.Thaw()
		return time.Since(frozen), err
	}
	fz.Release()
	o.vt.closed = "the backend was handed over to a new process"
	if err := c.Commit(); err != nil {
		// The new process takes a closed connection after ready for
		// a commit (this process let go either way).
		o.log.WithError(err).Warn("handover: commit not sent")
	}
	return time.Since(frozen), nil
}

// takeover is the new process's half: it connects to the running backend,
// takes its state and fds, and rebuilds the fabric and every VM, held. It
// returns what run serves.
type takeover struct {
	c      *handover.Conn
	st     *upgradeState
	fds    []int
	imp    *ism.Imported
	byName map[string]*vmState
}

func startTakeover(path string, fabric *ism.Fabric, timeout time.Duration) (*takeover, error) {
	c, err := handover.Dial(path)
	if err != nil {
		return nil, err
	}
	t := &takeover{c: c}
	fail := func(err error) (*takeover, error) {
		c.Abort(err.Error())
		c.Close()
		closeFDs(t.fds)
		return nil, err
	}
	c.SetDeadline(time.Now().Add(timeout))
	if err := c.Hello([]uint32{stateVersion}); err != nil {
		return fail(err)
	}
	version, b, fds, err := c.ReadState()
	if err != nil {
		c.Close()
		return nil, err
	}
	t.fds = fds
	if t.st, err = decodeState(version, b); err != nil {
		return fail(err)
	}
	if t.imp, err = fabric.Import(t.st.Fabric, fds); err != nil {
		return fail(err)
	}
	t.byName = map[string]*vmState{}
	for i := range t.st.VMs {
		t.byName[t.st.VMs[i].Name] = &t.st.VMs[i]
	}
	return t, nil
}

// abort ends a takeover that failed before ready.
func (t *takeover) abort(err error) error {
	// Nothing of the imported fabric is torn down: a device's
	// disconnect would tell its peers, in guest memory, that it is
	// gone. The process exits, and the old one serves on.
	t.c.Abort(err.Error())
	t.c.Close()
	closeFDs(t.fds)
	return err
}

// checkVMs refuses a takeover that would drop a VM the old process serves.
func (t *takeover) checkVMs(vms []vmSpec) error {
	for name := range t.byName {
		if !slices.ContainsFunc(vms, func(v vmSpec) bool { return v.Name == name }) {
			return fmt.Errorf("VM %s is served by the running backend but not given with -vm", name)
		}
	}
	return nil
}

// commit says ready (every VM rebuilt and held) and waits for the old
// process to let go. A connection that ends without commit or abort means
// the old process is gone: serving is then right.
func (t *takeover) commit(log *logrus.Logger) error {
	if pending := t.imp.Pending(); len(pending) > 0 {
		return t.abort(fmt.Errorf("devices of %v not taken over", pending))
	}
	closeFDs(t.fds)
	t.fds = nil
	defer t.c.Close()
	if err := t.c.Ready(); err != nil {
		return err
	}
	// No deadline: the old process commits, aborts or ends, each
	// promptly after ready (its own deadline bounds its wait for it).
	t.c.SetDeadline(time.Time{})
	err := t.c.AwaitCommit()
	if errors.Is(err, handover.ErrAborted) {
		return err
	}
	if err != nil {
		log.WithError(err).Warn("takeover: the old process ended without a commit; serving")
	}
	return nil
}

// vm returns the state of VM name, or nil (also on a nil takeover).
func (t *takeover) vm(name string) *vmState {
	if t == nil {
		return nil
	}
	return t.byName[name]
}

// fdAt is fd i of the table, or -1 (FileListener then fails).
func (t *takeover) fdAt(i int) int {
	if i < 0 || i >= len(t.fds) {
		return -1
	}
	return t.fds[i]
}
