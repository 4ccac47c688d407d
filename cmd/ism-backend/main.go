// Command ism-backend is a vhost-user back-end that gives every connected
// QEMU guest an ISM device (the device under SMC-D) and routes DMB writes
// between them. Each VM connects on its own socket, DIR/NAME.sock.
//
//	ism-backend -socket-dir /run/ism -vm vm1 -vm vm2
//	ism-backend -socket-dir /run/ism -vm vm1 -print-qemu vm1
package main

import (
	"context"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/handover"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/ismvirtio"
	"github.com/ism-backend/ism-backend/metrics"
	"github.com/ism-backend/ism-backend/vhostuser"
)

type options struct {
	socketDir     string
	vms           []vmSpec
	chid          uint16
	virtioID      int
	logLevel      logrus.Level
	logJSON       bool
	printQEMU     string
	statsInterval time.Duration
	statsFile     string

	// What the device offers: -modes for every VM, -vm-modes per VM;
	// attach mode's region, mapped-bytes and attach-memory limits.
	modes     uint16
	vmModes   map[string]uint16
	shmSize   uint64
	maxMapped uint64
	maxAttach uint64

	// What one guest may do to the others: its DMBs, the software events
	// of one sender a guest's queue holds, and the SIGNAL rate.
	maxDMBs         int
	eventsPerSource int
	signalRate      int
	signalBurst     int

	// Caps on each connection's memory table (-max-mem-bytes,
	// -max-mem-regions).
	maxMemBytes   uint64
	maxMemRegions int
	// Prometheus metrics (metrics package), opt-in.
	metricsAddr string
	// Who may reach the sockets: file mode and group, peer uids (none:
	// anyone the file lets through).
	socket    socketAccess
	allowUIDs []uint32

	// Upgrades without a disconnect (handover.go): where this process
	// offers its VMs to a new one, where it takes them from (-takeover),
	// and how long either may take.
	handoverSocket  string
	takeover        string
	handoverTimeout time.Duration

	// served is the VMs served now, -vm and those added at runtime
	// (vmctl.go); run sets it.
	served *vmTable
}

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "status" || os.Args[1] == "add-vm" || os.Args[1] == "remove-vm") {
		var err error
		if os.Args[1] == "status" {
			err = runStatus(os.Args[2:], os.Stdout, os.Stderr)
		} else {
			err = runVMCommand(os.Args[1], os.Args[2:], os.Stdout, os.Stderr)
		}
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "ism-backend %s: %v\n", os.Args[1], err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "fault" {
		err := runFault(os.Args[2:], os.Stdout, os.Stderr)
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "ism-backend fault: %v\n", err)
			os.Exit(1)
		}
		return
	}
	opts, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ism-backend: %v (see -h)\n", err)
		os.Exit(2)
	}
	if opts.printQEMU != "" {
		if err := printQEMU(os.Stdout, opts); err != nil {
			fmt.Fprintln(os.Stderr, "ism-backend:", err)
			os.Exit(2)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, opts); err != nil {
		fmt.Fprintln(os.Stderr, "ism-backend:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string, errOut io.Writer) (*options, error) {
	fs := flag.NewFlagSet("ism-backend", flag.ContinueOnError)
	// Errors are reported by main in one line; the usage only on -h.
	fs.SetOutput(io.Discard)
	opts := &options{}
	var chid, level string
	fs.StringVar(&opts.socketDir, "socket-dir", "/run/ism", "directory for the per-VM sockets `DIR`/NAME.sock")
	fs.Func("vm", "a VM to serve, `NAME[=GID]` (repeatable); the GID defaults to one derived from NAME", func(s string) error {
		v, err := parseVM(s)
		if err != nil {
			return err
		}
		opts.vms = append(opts.vms, v)
		return nil
	})
	fs.StringVar(&chid, "chid", fmt.Sprintf("%#x", abi.DefaultCHID), "channel id of the fabric (0xFF00..0xFFFE: emulated ISM)")
	fs.IntVar(&opts.virtioID, "virtio-id", abi.DefaultVirtioID, "virtio device id for -print-qemu (QEMU 11.1 accepts 38, 39, 45)")
	fs.StringVar(&level, "log-level", "info", "log level: error, warn, info, debug, trace")
	fs.BoolVar(&opts.logJSON, "log-json", false, "log as JSON lines")
	fs.StringVar(&opts.printQEMU, "print-qemu", "", "print the QEMU options VM `NAME` needs and exit")
	fs.DurationVar(&opts.statsInterval, "stats-interval", 0, "log device statistics (and write -stats-file) this often (0: only on SIGUSR1 and at exit)")
	fs.StringVar(&opts.metricsAddr, "metrics-addr", "", "serve Prometheus metrics at http://`HOST:PORT`/metrics (off when empty)")
	fs.StringVar(&opts.statsFile, "stats-file", "", "also write device statistics as JSON to `PATH` (replaced atomically) on SIGUSR1, each -stats-interval and at exit")
	modes := "copy,attach"
	fs.StringVar(&modes, "modes", modes, "DMB modes every VM's device offers: copy, attach or copy,attach")
	opts.vmModes = map[string]uint16{}
	fs.Func("vm-modes", "the modes one VM's device offers, `NAME=MODES` (repeatable; overrides -modes)", func(s string) error {
		name, m, ok := strings.Cut(s, "=")
		if !ok || !vmName.MatchString(name) {
			return fmt.Errorf("want NAME=MODES, got %q", s)
		}
		v, err := abi.ParseModes(m)
		if err != nil {
			return err
		}
		opts.vmModes[name] = v
		return nil
	})
	opts.socket = socketAccess{mode: defaultSocketMode, gid: -1}
	fs.Func("socket-mode", "permission bits of the sockets, octal `MODE` (default 0600, whatever the umask)", func(s string) (err error) {
		opts.socket.mode, err = parseSocketMode(s)
		return err
	})
	fs.Func("socket-group", "group of the sockets, `NAME` or gid (default: the backend's)", func(s string) (err error) {
		opts.socket.gid, err = parseGroup(s)
		return err
	})
	fs.Func("allow-uid", "accept connections only from processes of these users, `UID[,UID...]` or names (repeatable; default: anyone the socket's mode lets in)", func(s string) error {
		uids, err := parseUIDs(s)
		opts.allowUIDs = append(opts.allowUIDs, uids...)
		return err
	})
	fs.Uint64Var(&opts.shmSize, "shm-size", ismvirtio.DefaultShmSize, "bytes of each VM's shared-memory region (attach mode; a multiple of 4096)")
	fs.Uint64Var(&opts.maxMapped, "max-mapped", 0, "bytes of DMBs one VM may have mapped in its region at once, its own and those it attached (0: -shm-size)")
	fs.Uint64Var(&opts.maxAttach, "max-attach-memory", 0, "bytes of attach-mode DMBs one VM may own: the host memory it makes the backend hold (0: -max-mapped)")
	fs.IntVar(&opts.maxDMBs, "max-dmbs", abi.MaxDMBs, fmt.Sprintf("DMBs one VM may have registered at once (1..%d)", abi.MaxDMBs))
	fs.IntVar(&opts.eventsPerSource, "events-per-source", ismvirtio.DefaultEventsPerSource,
		fmt.Sprintf("software events (SIGNALs) of one sender that may wait in a VM's event queue; more are refused (1..%d)", ismvirtio.MaxPendingEvents))
	fs.IntVar(&opts.signalRate, "signal-rate", ism.DefaultSignalRate, "SIGNALs per second one VM may send, after -signal-burst; more are refused")
	fs.IntVar(&opts.signalBurst, "signal-burst", ism.DefaultSignalBurst, "SIGNALs one VM may send at once")
	fs.Uint64Var(&opts.maxMemBytes, "max-mem-bytes", vhostuser.DefaultMaxMemBytes, "bytes of guest memory one VM's connection may have mapped (its memory table: guest RAM and attach-mode mappings)")
	fs.IntVar(&opts.maxMemRegions, "max-mem-regions", vhostuser.MaxMemSlots, fmt.Sprintf("regions one VM's memory table may have, 1..%d (what GET_MAX_MEM_SLOTS answers)", vhostuser.MaxMemSlots))
	fs.StringVar(&opts.handoverSocket, "handover-socket", "", "where a new process may take this one's VMs over, `PATH` (default DIR/ism-backend.handover)")
	fs.StringVar(&opts.takeover, "takeover", "", "take every VM over from the backend running with handover socket `PATH` (an upgrade: the guests see a pause)")
	fs.DurationVar(&opts.handoverTimeout, "handover-timeout", 60*time.Second, "how long a handover may take before it is given up (the old process then serves on)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(errOut)
			fmt.Fprintln(errOut, "usage: ism-backend -socket-dir DIR -vm NAME[=GID] ... | -print-qemu NAME | status [-json] | fault VERB ... | add-vm NAME[=GID] | remove-vm NAME")
			fs.PrintDefaults()
		}
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q (flags only; see -h)", fs.Arg(0))
	}
	if opts.maxDMBs < 1 || opts.maxDMBs > abi.MaxDMBs {
		return nil, fmt.Errorf("-max-dmbs %d: want 1 to %d", opts.maxDMBs, abi.MaxDMBs)
	}
	if opts.eventsPerSource < 1 { // 0 would be Options' default
		return nil, fmt.Errorf("-events-per-source %d: want 1 to %d", opts.eventsPerSource, ismvirtio.MaxPendingEvents)
	}
	if opts.signalRate < 1 || opts.signalBurst < 1 {
		return nil, fmt.Errorf("-signal-rate %d, -signal-burst %d: want at least 1", opts.signalRate, opts.signalBurst)
	}
	var err error
	if opts.modes, err = abi.ParseModes(modes); err != nil {
		return nil, fmt.Errorf("-modes: %w", err)
	}
	for name := range opts.vmModes {
		if _, err := opts.backendOptions(name); err != nil {
			return nil, fmt.Errorf("-vm-modes %s: %w", name, err)
		}
	}
	if _, err := opts.backendOptions(""); err != nil {
		return nil, err
	}
	if opts.maxMemBytes == 0 {
		return nil, errors.New("-max-mem-bytes must not be 0")
	}
	if opts.maxMemRegions < 1 || opts.maxMemRegions > vhostuser.MaxMemSlots {
		return nil, fmt.Errorf("-max-mem-regions %d: want 1..%d", opts.maxMemRegions, vhostuser.MaxMemSlots)
	}
	c, err := strconv.ParseUint(chid, 0, 16)
	if err != nil {
		return nil, fmt.Errorf("-chid %q: not a 16-bit number", chid)
	}
	opts.chid = uint16(c)
	if opts.logLevel, err = logrus.ParseLevel(level); err != nil {
		return nil, fmt.Errorf("-log-level %q: want error, warn, info, debug or trace", level)
	}
	if opts.virtioID <= 0 || opts.virtioID > 0xffff-0x1040 {
		return nil, fmt.Errorf("-virtio-id %d: out of range", opts.virtioID)
	}
	if opts.socketDir == "" {
		return nil, errors.New("-socket-dir must not be empty")
	}
	if opts.metricsAddr != "" {
		_, port, err := net.SplitHostPort(opts.metricsAddr)
		if p, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil || (p == 0 && port != "0") {
			return nil, fmt.Errorf("-metrics-addr %q: want HOST:PORT (port 0: any free one)", opts.metricsAddr)
		}
	}
	if opts.handoverSocket == "" {
		opts.handoverSocket = filepath.Join(opts.socketDir, "ism-backend.handover")
	}
	if opts.handoverTimeout <= 0 {
		return nil, errors.New("-handover-timeout must be positive")
	}
	if opts.printQEMU != "" && !vmName.MatchString(opts.printQEMU) {
		return nil, fmt.Errorf("-print-qemu %q: not a VM name", opts.printQEMU)
	}
	if opts.printQEMU == "" {
		if err := checkVMs(opts.vms); err != nil {
			return nil, err
		}
	}
	return opts, nil
}

// printQEMU prints the QEMU options that attach VM name to this backend.
// Guest RAM must be shared (memfd, share=on) so the backend can map it.
func printQEMU(w io.Writer, opts *options) error {
	sock, err := filepath.Abs(filepath.Join(opts.socketDir, opts.printQEMU+".sock"))
	if err != nil {
		return err
	}
	chardev := fmt.Sprintf("socket,id=ism0,path=%s", sock)
	device := fmt.Sprintf("vhost-user-test-device-pci,chardev=ism0,virtio-id=%d,num_vqs=%d,config_size=%d,vq_size=256",
		opts.virtioID, abi.NumQueues, abi.ConfigSize)
	fmt.Fprintf(w, "-object memory-backend-memfd,id=mem,size=<RAM>,share=on -machine q35,memory-backend=mem -m <RAM> "+
		"-chardev %s -device %s\n", chardev, device)
	// libvirt has no element for QEMU's generic vhost-user device: the
	// device goes in as qemu:commandline; the memory must still be a
	// shared memfd, which memoryBacking says.
	var esc strings.Builder
	xmlAttr := func(v string) string {
		esc.Reset()
		xml.EscapeText(&esc, []byte(v))
		return strings.ReplaceAll(esc.String(), "'", "&#39;")
	}
	fmt.Fprintf(w, `
<!-- libvirt: the domain element needs xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' and a q35 machine -->
<memoryBacking>
  <source type='memfd'/>
  <access mode='shared'/>
</memoryBacking>
<qemu:commandline>
  <qemu:arg value='-chardev'/>
  <qemu:arg value='%s'/>
  <qemu:arg value='-device'/>
  <qemu:arg value='%s'/>
</qemu:commandline>
`, xmlAttr(chardev), xmlAttr(device))
	return nil
}

// run serves the VMs until ctx is done (main: SIGTERM or SIGINT) or a
// socket fails.
func run(ctx context.Context, opts *options) error {
	log := logrus.New()
	log.SetLevel(opts.logLevel)
	if opts.logJSON {
		log.SetFormatter(&logrus.JSONFormatter{})
	}
	if err := os.MkdirAll(opts.socketDir, 0o755); err != nil {
		return fmt.Errorf("socket dir: %w", err)
	}
	var stats *statsWriter
	if opts.statsFile != "" {
		if fi, err := os.Stat(filepath.Dir(opts.statsFile)); err != nil || !fi.IsDir() {
			return fmt.Errorf("-stats-file %s: no such directory", opts.statsFile)
		}
		stats = &statsWriter{path: opts.statsFile, opts: opts}
	}
	// Before any socket exists: whoever waits for the sockets may signal
	// at once, and SIGUSR1's default action would end the process.
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)

	ctx, stop := context.WithCancel(ctx)
	defer stop()

	fabric := ism.NewFabric(opts.chid, logrus.NewEntry(log)) // adds the chid field itself
	fabric.SetLimits(opts.limits())
	server := vhostuser.NewServer(log.WithField("component", "vhostuser"))
	server.MaxMemBytes, server.MaxMemRegions = opts.maxMemBytes, opts.maxMemRegions
	server.AllowUIDs = opts.allowUIDs

	// An upgrade: the running backend's state and fds first. The VMs to serve: -vm, and after an upgrade as the old process
	// had them (VMs added or removed at runtime, vmctl.go).
	var tk *takeover
	vms := opts.vms
	if opts.takeover != "" {
		var err error
		if tk, err = startTakeover(opts.takeover, fabric, opts.handoverTimeout); err != nil {
			return fmt.Errorf("takeover: %w", err)
		}
		if vms, err = servedAfterTakeover(opts.vms, tk.st.Added, tk.st.Removed); err != nil {
			return fmt.Errorf("takeover: %w", tk.abort(err))
		}
		if err := tk.checkVMs(vms); err != nil {
			return fmt.Errorf("takeover: %w", tk.abort(err))
		}
		if stats != nil {
			stats.seq.Store(tk.st.StatsSeq)
		}
		server.Hold() // nothing runs until the old process let go
	}

	// Sockets systemd holds for us (socket activation); a takeover gets
	// its listeners from the old process instead.
	act := activated{}
	if tk == nil {
		lns, err := activatedListeners(os.Getenv, os.Getpid(), listenFDsStart)
		if err != nil {
			return err
		}
		act = lns
		if len(act) > 0 {
			log.WithField("sockets", len(act)).Info("socket activation: serving the sockets systemd passed")
		}
	}
	defer act.close() // on a return before they are handed out

	// Listen on every socket first, so a failure leaves nothing half-started.
	// The socket files this process made (owned) are removed at its
	// exit, not when their listeners close: after a handover they are
	// the new process's, and a listener closed by Serve must not unlink
	// them. Those taken over become this process's at the commit; from
	// then on (vmsOurs) the VMs' are those of the VMs served, vt's.
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	vt := &vmTable{ctx: ctx, srv: server, fabric: fabric, opts: opts, log: log, errs: errs, wg: &wg, tk: tk,
		unitSockets: map[string]bool{}}
	listeners := make([]*net.UnixListener, 0, len(vms))
	paths := make([]string, 0, len(vms))
	var owned, takenOver, vmOwned []string
	handedOver, vmsOurs := false, false
	defer func() {
		for _, ln := range listeners {
			ln.Close()
		}
		if handedOver {
			return
		}
		for _, p := range owned {
			os.Remove(p)
		}
		if vmsOurs {
			vmOwned = vt.paths()
		}
		for _, p := range vmOwned {
			os.Remove(p)
		}
	}()
	for _, v := range vms {
		path := filepath.Join(opts.socketDir, v.Name+".sock")
		var ln *net.UnixListener
		var err error
		if vs := tk.vm(v.Name); vs != nil {
			ln, err = vhostuser.ListenerOf(tk.fds, vs.Listener)
			takenOver = append(takenOver, path)
		} else if ln = act.take(path); ln != nil {
			vt.unitSockets[path] = true // the socket unit's file
		} else if ln, err = listenUnix(path, opts.socket); err == nil {
			vmOwned = append(vmOwned, path)
		}
		if err != nil {
			if tk != nil {
				return fmt.Errorf("takeover: %w", tk.abort(err))
			}
			return err
		}
		ln.SetUnlinkOnClose(false)
		listeners = append(listeners, ln)
		paths = append(paths, path)
	}
	var hoLn *net.UnixListener
	if tk != nil {
		ln, err := handover.FileListener(tk.fdAt(tk.st.Handover))
		if err != nil {
			return fmt.Errorf("takeover: %w", tk.abort(err))
		}
		hoLn = ln
		takenOver = append(takenOver, opts.takeover)
	} else if ln := act.take(opts.handoverSocket); ln != nil {
		hoLn = ln
	} else {
		ln, err := handover.Listen(opts.handoverSocket)
		if err != nil {
			return err
		}
		hoLn = ln
		owned = append(owned, opts.handoverSocket)
	}
	hoLn.SetUnlinkOnClose(false)
	defer hoLn.Close()

	// The control socket and the metrics listener: the old process's
	// after an upgrade (the address is in use until it exits), else new.
	var ctl *net.UnixListener
	ctlPath := filepath.Join(opts.socketDir, controlName)
	if tk != nil {
		ln, err := handover.FileListener(tk.fdAt(tk.st.Control))
		if err != nil {
			return fmt.Errorf("takeover: control socket: %w", tk.abort(err))
		}
		ctl = ln
		takenOver = append(takenOver, ctlPath)
	} else if ln := act.take(ctlPath); ln != nil {
		ctl = ln
	} else {
		ln, err := listenControl(opts.socketDir)
		if err != nil {
			return fmt.Errorf("control socket: %w", err)
		}
		ctl = ln
		owned = append(owned, ctlPath)
	}
	if err := act.unused(); err != nil {
		return err
	}
	ctl.SetUnlinkOnClose(false)
	defer ctl.Close()
	var metricsLn *net.TCPListener
	if tk != nil && tk.st.Metrics >= 0 {
		ln, err := inheritTCPListener(tk.fdAt(tk.st.Metrics))
		if err != nil {
			return fmt.Errorf("takeover: metrics listener: %w", tk.abort(err))
		}
		if opts.metricsAddr == "" {
			ln.Close() // the new flags ask for none
		} else {
			metricsLn = ln
		}
	}
	if metricsLn == nil && opts.metricsAddr != "" {
		ln, err := net.Listen("tcp", opts.metricsAddr)
		if err != nil {
			if tk != nil {
				return fmt.Errorf("takeover: -metrics-addr: %w", tk.abort(err))
			}
			return fmt.Errorf("-metrics-addr: %w", err)
		}
		metricsLn = ln.(*net.TCPListener)
	}

	ready := make(chan error, len(vms))
	imported := 0
	for i, v := range vms {
		vs := tk.vm(v.Name)
		if vs != nil {
			imported++
		}
		vt.start(v, paths[i], listeners[i], vs, ready)
	}
	listeners = nil // each Serve closes its own
	if tk == nil {
		vmsOurs = true
	}
	if tk != nil {
		// Every VM rebuilt and held: ready, and go on once the old
		// process let go. On a failure this process exits at once: the
		// VMs it holds never ran here, and nothing of them is torn
		// down (that would tell the peers their devices are gone).
		for ; imported > 0; imported-- {
			if err := <-ready; err != nil {
				return fmt.Errorf("takeover: %w", tk.abort(err))
			}
		}
		if err := tk.commit(log); err != nil {
			return fmt.Errorf("takeover: %w", err)
		}
		server.Unhold()
		owned = append(owned, takenOver...) // this process's now
		vmsOurs = true
		log.Info("took over from the old process")
	}
	opts.served = vt
	go serveControl(ctx, ctl, fabric, opts, log)
	if metricsLn != nil {
		vms := func() []metrics.VM {
			var out []metrics.VM
			for _, v := range vt.list() {
				out = append(out, metrics.VM{Name: v.Name, GID: v.GID})
			}
			return out
		}
		metrics.Serve(ctx, metricsLn, metrics.Registry(metrics.NewLiveCollector(fabric, vms, server.Stats)))
		log.WithField("url", "http://"+metricsLn.Addr().String()+"/metrics").Info("serving metrics")
	}
	names := make([]string, len(vms))
	for i, v := range vms {
		names[i] = v.Name
	}
	// A handover sees every VM: each Serve is under way first.
	if err := server.WaitServing(ctx, names...); err != nil {
		return err
	}
	old := &oldSide{log: log, opts: opts, vt: vt, srv: server, fabric: fabric, hoLn: hoLn, stats: stats, done: make(chan struct{}), timeout: opts.handoverTimeout,
		lns: listenersToHand{handover: hoLn, control: ctl, metrics: metricsLn}}
	go old.serve(ctx)

	report := func() {
		logStats(log, fabric)
		if stats != nil {
			if err := stats.write(fabric); err != nil {
				log.WithError(err).Warn("writing the stats file")
			}
		}
	}
	var tick <-chan time.Time
	if opts.statsInterval > 0 {
		t := time.NewTicker(opts.statsInterval)
		defer t.Stop()
		tick = t.C
	}
	var runErr error
loop:
	for {
		select {
		case <-ctx.Done():
			log.Info("shutting down")
			break loop
		case <-old.done:
			// Handed over: the new process serves every VM, this one
			// only waits for its Serve calls to return. No stats at
			// exit and no socket file removed: they are the new
			// process's now.
			handedOver = true
			wg.Wait()
			return nil
		case runErr = <-errs:
			stop()
			break loop
		case <-usr1:
			report()
		case <-tick:
			report()
		}
	}
	vt.close("the backend is shutting down")
	stop() // every VM's Serve ends
	wg.Wait()
	report()
	return runErr
}

// logStats logs the fabric's statistics and, for each VM whose guest was
// refused SIGNALs or lost events, those counters, so that a flood and its
// victims show in the log, not only in the stats file.
func logStats(log *logrus.Logger, f *ism.Fabric) {
	log.WithField("stats", strings.TrimSpace(fmt.Sprintf("%+v", f.Stats()))).Info("device statistics")
	for _, d := range f.DeviceStats() {
		s := d.Stats
		if s.SWEventsDropped+s.DeviceEventsDropped+s.SignalsRefusedPeer+s.SignalsRefusedRate+s.SignalsRefusedQueue == 0 {
			continue
		}
		log.WithFields(logrus.Fields{
			"vm":                    d.Name,
			"sw_events_dropped":     s.SWEventsDropped,
			"device_events_dropped": s.DeviceEventsDropped,
			"signals_refused_peer":  s.SignalsRefusedPeer,
			"signals_refused_rate":  s.SignalsRefusedRate,
			"signals_refused_queue": s.SignalsRefusedQueue,
		}).Info("event drops and refused SIGNALs")
	}
}

// limits are the fabric's limits the flags set.
func (o *options) limits() ism.Limits {
	return ism.Limits{DeviceDMBs: o.maxDMBs, SignalRate: o.signalRate, SignalBurst: o.signalBurst}
}

// backendOptions are the device options of VM name.
func (o *options) backendOptions(name string) (ismvirtio.Options, error) {
	bo := ismvirtio.Options{Modes: o.modes, ShmSize: o.shmSize, MaxMapped: o.maxMapped, MaxAttach: o.maxAttach,
		EventsPerSource: o.eventsPerSource}
	if m, ok := o.vmModes[name]; ok {
		bo.Modes = m
	}
	err := bo.Check()
	return bo, err
}

// inheritTCPListener makes a listener of a TCP listening socket's fd handed
// over by the old process (the fd stays the caller's).
func inheritTCPListener(fd int) (*net.TCPListener, error) {
	ln, err := handover.NetListener(fd)
	if err != nil {
		return nil, err
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		ln.Close()
		return nil, errors.New("not a TCP listener")
	}
	return tl, nil
}
