package main

// VMs added and removed while the backend runs, through the control socket:
//
//	{"command":"add-vm","vm":"NAME[=GID]"}     ism-backend add-vm [-socket-dir DIR] NAME[=GID]
//	{"command":"remove-vm","vm":"NAME"}        ism-backend remove-vm [-socket-dir DIR] NAME
//
// add-vm takes what -vm takes, with the same rules (parseVM: the name makes
// the socket file's name and cannot leave DIR; the GID is derived from the
// name unless given, never 0; no name or GID twice among the VMs served),
// creates DIR/NAME.sock as the start does (listenUnix: -socket-mode,
// -socket-group, -allow-uid) and serves it before it answers. remove-vm
// ends the VM's Serve: its listener closes, its guest's connection closes
// and the device is torn down exactly as when QEMU disconnects (the peers
// get the GID-gone event, its DMBs and mappings are freed), then the
// socket file is removed; it answers once all that is done. The counters
// of a VM stay in the totals after it is removed, and go on if a VM of the
// same name is added again.
//
// A handover carries the VM list: the state says which VMs were added and
// removed at runtime (relative to the old process's -vm), and the new
// process serves its own -vm less those removed, plus those added.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/ismvirtio"
	"github.com/ism-backend/ism-backend/vhostuser"
)

// vmTable is the VMs this process serves: those of -vm and those added at
// runtime, less those removed.
type vmTable struct {
	ctx    context.Context // the run's; each VM's context derives from it
	srv    *vhostuser.Server
	fabric *ism.Fabric
	opts   *options
	log    *logrus.Logger
	errs   chan<- error    // a VM whose Serve fails (neither removed nor handed over)
	wg     *sync.WaitGroup // every VM's Serve
	tk     *takeover       // the VMs taken over at the start (nil: none)

	// opMu orders adds, removes and a handover: a handover exports the
	// VMs it froze, and a VM added or removed meanwhile would be lost or
	// served twice. closed (guarded by opMu) says why no more change is
	// taken: the run is ending or was handed over.
	opMu   sync.Mutex
	closed string

	mu  sync.Mutex // guards vms; taken alone, briefly (status reads it)
	vms []*servedVM

	// unitSockets are the socket files a systemd socket unit made
	// (activation.go): never unlinked here. Set before serving.
	unitSockets map[string]bool
}

// servedVM is one VM being served.
type servedVM struct {
	vmSpec
	path   string // its socket file
	cancel context.CancelFunc
	done   chan struct{} // closed when its Serve has returned
}

// list returns the VMs served now, in the order they were started.
func (t *vmTable) list() []vmSpec {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]vmSpec, len(t.vms))
	for i, s := range t.vms {
		out[i] = s.vmSpec
	}
	return out
}

// vmList is the VMs served now: -vm before run starts serving (and in
// tests that serve no VM).
func (o *options) vmList() []vmSpec {
	if o.served != nil {
		return o.served.list()
	}
	return o.vms
}

// start serves VM v on ln: a VM taken over (vs not nil; ready is told when
// it is rebuilt) or a new one.
func (t *vmTable) start(v vmSpec, path string, ln *net.UnixListener, vs *vmState, ready chan<- error) *servedVM {
	vctx, cancel := context.WithCancel(t.ctx)
	s := &servedVM{vmSpec: v, path: path, cancel: cancel, done: make(chan struct{})}
	t.mu.Lock()
	t.vms = append(t.vms, s)
	t.mu.Unlock()
	vmLog := t.log.WithFields(logrus.Fields{"vm": v.Name, "gid": fmt.Sprintf("%#016x", v.GID)})
	newBackend := func(name string) (vhostuser.Backend, error) {
		bo, err := t.opts.backendOptions(name)
		if err != nil {
			return nil, err
		}
		b, err := ismvirtio.NewWithOptions(t.fabric, name, v.GID, vmLog, bo)
		if err == nil && vs != nil && vs.Events != nil {
			// The connection taken over (the first) resumes its
			// device; later ones start afresh.
			b.SetImported(t.tk.imp, *vs.Events)
			vs = nil
		}
		return b, err
	}
	vmLog.WithField("socket", ln.Addr().String()).Info("serving VM")
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		defer close(s.done)
		defer cancel()
		var err error
		if vs != nil {
			err = t.srv.ServeImported(vctx, v.Name, ln, vs.Conn, t.tk.fds, newBackend, func(err error) {
				if err != nil {
					err = fmt.Errorf("vm %s: %w", v.Name, err)
				}
				ready <- err
			})
		} else {
			err = t.srv.Serve(vctx, v.Name, ln, newBackend)
		}
		if err != nil && vctx.Err() == nil && !errors.Is(err, vhostuser.ErrHandedOver) {
			select {
			case t.errs <- fmt.Errorf("vm %s: %w", v.Name, err):
			default: // the run is ending already
			}
		}
	}()
	return s
}

// conflict says why v cannot join vms: its name or its GID is taken.
func conflict(vms []vmSpec, v vmSpec) error {
	for _, o := range vms {
		if o.Name == v.Name {
			return fmt.Errorf("VM %s is served already", v.Name)
		}
		if o.GID == v.GID {
			return fmt.Errorf("GID %#x is VM %s's", v.GID, o.Name)
		}
	}
	return nil
}

// add serves a new VM and returns its socket file once the VM is served
// (a handover from then on carries it).
func (t *vmTable) add(v vmSpec) (string, error) {
	t.opMu.Lock()
	defer t.opMu.Unlock()
	if t.closed != "" {
		return "", errors.New(t.closed)
	}
	if err := conflict(t.list(), v); err != nil {
		return "", err
	}
	path := filepath.Join(t.opts.socketDir, v.Name+".sock")
	ln, err := listenUnix(path, t.opts.socket)
	if err != nil {
		return "", err
	}
	// Removed by remove or at the run's end, never by a close: after a
	// handover the file is the new process's.
	ln.SetUnlinkOnClose(false)
	s := t.start(v, path, ln, nil, nil)
	// Under way before the answer: a handover asked for next sees it.
	ctx, cancel := context.WithCancel(t.ctx)
	defer cancel()
	go func() {
		select {
		case <-s.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := t.srv.WaitServing(ctx, v.Name); err != nil {
		return "", fmt.Errorf("VM %s: not served: %w", v.Name, err)
	}
	t.log.WithFields(logrus.Fields{"vm": v.Name, "gid": fmt.Sprintf("%#016x", v.GID), "socket": path}).Info("VM added")
	return path, nil
}

// remove ends VM name: its listener, its connection and its device (torn
// down as on a disconnect), then its socket file. It returns once all of
// that is done.
func (t *vmTable) remove(name string) (vmSpec, error) {
	t.opMu.Lock()
	defer t.opMu.Unlock()
	if t.closed != "" {
		return vmSpec{}, errors.New(t.closed)
	}
	t.mu.Lock()
	i := slices.IndexFunc(t.vms, func(s *servedVM) bool { return s.Name == name })
	var s *servedVM
	if i >= 0 {
		s = t.vms[i]
	}
	t.mu.Unlock()
	if s == nil {
		return vmSpec{}, fmt.Errorf("no VM %s is served", name)
	}
	// Serve closes the listener and the connection, and tears the device
	// down (Backend.Stop: the fabric disconnect sends the GID-gone event to
	// its peers and frees its DMBs) before it returns.
	s.cancel()
	<-s.done
	if t.unitSockets[s.path] {
		// The socket unit's: it holds the socket on.
	} else if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.log.WithError(err).WithField("vm", name).Warn("removing the socket file")
	}
	t.mu.Lock()
	t.vms = slices.DeleteFunc(t.vms, func(o *servedVM) bool { return o == s })
	t.mu.Unlock()
	t.log.WithFields(logrus.Fields{"vm": name, "gid": fmt.Sprintf("%#016x", s.GID)}).Info("VM removed")
	return s.vmSpec, nil
}

// close takes no more adds or removes, for why; it waits for one under way.
func (t *vmTable) close(why string) {
	t.opMu.Lock()
	if t.closed == "" {
		t.closed = why
	}
	t.opMu.Unlock()
}

// paths are the socket files of the VMs served that this process made.
func (t *vmTable) paths() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for _, s := range t.vms {
		if !t.unitSockets[s.path] {
			out = append(out, s.path)
		}
	}
	return out
}

// changes are the VMs added and removed at runtime, relative to -vm: what a
// handover's state carries. A VM of -vm served with another GID (removed,
// then added again) is in both.
func (t *vmTable) changes() (added []vmSpec, removed []string) {
	served := t.list()
	for _, v := range served {
		if !slices.Contains(t.opts.vms, v) {
			added = append(added, v)
		}
	}
	for _, v := range t.opts.vms {
		if !slices.Contains(served, v) {
			removed = append(removed, v.Name)
		}
	}
	return added, removed
}

// servedAfterTakeover is the VM list a new process serves: its -vm (flags)
// less the VMs the old process had removed, plus those it had added. An
// added VM whose name or GID the flags give to another VM is an error.
func servedAfterTakeover(flags []vmSpec, added []vmSpec, removed []string) ([]vmSpec, error) {
	var out []vmSpec
	for _, v := range flags {
		if !slices.Contains(removed, v.Name) {
			out = append(out, v)
		}
	}
	for _, v := range added {
		if slices.Contains(out, v) {
			continue
		}
		if err := conflict(out, v); err != nil {
			return nil, fmt.Errorf("VM %s=%#x, added to the running backend: %w", v.Name, v.GID, err)
		}
		out = append(out, v)
	}
	return out, nil
}

// vmAnswer is an add-vm or remove-vm answer: the VM and its socket file.
type vmAnswer struct {
	Name   string `json:"name"`
	GID    string `json:"gid"`
	Socket string `json:"socket"`
}

// handleVMControl runs an add-vm or remove-vm request.
func handleVMControl(t *vmTable, req controlRequest) controlAnswer {
	if t == nil {
		return controlAnswer{Error: "this backend serves no VM table"}
	}
	switch req.Command {
	case "add-vm":
		v, err := parseVM(req.VM)
		if err != nil {
			return controlAnswer{Error: fmt.Sprintf("add-vm %q: %v", req.VM, err)}
		}
		path, err := t.add(v)
		if err != nil {
			return controlAnswer{Error: fmt.Sprintf("add-vm %s: %v", v.Name, err)}
		}
		return controlAnswer{VM: &vmAnswer{Name: v.Name, GID: gidString(v.GID), Socket: path}}
	default: // remove-vm
		if !vmName.MatchString(req.VM) {
			return controlAnswer{Error: fmt.Sprintf("remove-vm %q: not a VM name", req.VM)}
		}
		v, err := t.remove(req.VM)
		if err != nil {
			return controlAnswer{Error: fmt.Sprintf("remove-vm %s: %v", req.VM, err)}
		}
		return controlAnswer{VM: &vmAnswer{Name: v.Name, GID: gidString(v.GID),
			Socket: filepath.Join(t.opts.socketDir, v.Name+".sock")}}
	}
}

// runVMCommand is `ism-backend add-vm [-socket-dir DIR] NAME[=GID]` and
// `ism-backend remove-vm [-socket-dir DIR] NAME`: it asks the backend
// serving DIR and prints what it did.
func runVMCommand(command string, args []string, out, errOut io.Writer) error {
	fs := flag.NewFlagSet("ism-backend "+command, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dir := fs.String("socket-dir", "/run/ism", "the backend's socket directory `DIR` (its control socket is DIR/"+controlName+")")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the backend")
	usage := "usage: ism-backend add-vm [-socket-dir DIR] NAME[=GID]"
	if command == "remove-vm" {
		usage = "usage: ism-backend remove-vm [-socket-dir DIR] NAME"
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(errOut)
			fmt.Fprintln(errOut, usage)
			fs.PrintDefaults()
		}
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("want one VM, got %d arguments (%s)", fs.NArg(), usage)
	}
	arg := fs.Arg(0)
	// Checked here too, so that a typo gets its error without a backend.
	if command == "add-vm" {
		if _, err := parseVM(arg); err != nil {
			return fmt.Errorf("%q: %v", arg, err)
		}
	} else if !vmName.MatchString(arg) {
		return fmt.Errorf("%q: not a VM name", arg)
	}
	a, err := askControlRequest(*dir, controlRequest{Command: command, VM: arg}, *timeout)
	if err != nil {
		return err
	}
	if a.VM == nil {
		return errors.New("the backend answered without the VM")
	}
	verb := "added"
	if command == "remove-vm" {
		verb = "removed"
	}
	_, err = fmt.Fprintf(out, "%s VM %s (GID %s), socket %s\n", verb, a.VM.Name, a.VM.GID, a.VM.Socket)
	return err
}
