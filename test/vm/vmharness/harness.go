// Package vmharness boots QEMU guests (u-root initramfs running ism-agent)
// against the ism-backend for the VM tests in test/vm.
//
// Everything a test starts is registered with t.Cleanup: QEMU and backend
// process groups are killed, QMP connections closed and the run directory
// removed, also when the test fails or panics; on failure the serial
// consoles, QEMU's own output and the backend log are dumped into the test
// log first.
//
// Environment (set by `make vmtest`):
//
//	ISM_VMTEST=1         run VM tests at all (otherwise they skip)
//	ISM_QEMU             qemu-system-x86_64 (>= 11.0, vhost-user-test-device-pci)
//	ISM_KERNEL           guest kernel (bzImage)
//	ISM_SMC_KERNEL       guest kernel with DIBS and the kernel's SMC (VMConfig.SMCKernel)
//	ISM_INITRD           guest initramfs (images/build.sh)
//	ISM_BACKEND          ism-backend binary; empty: tests that need it skip
//	ISM_ACCEL            force "tcg" or "kvm" (default: detected)
//	ISM_VMTEST_KEEP=1    keep the run directory (sockets, logs) after the test
//	ISM_TIMEOUT_SCALE    multiply every timeout by this (default: from the load)
//
// # Timeouts
//
// Every duration a test gives the harness (VMConfig.Timeout, the timeout of
// WaitSerial, WaitResult, Wait and RequireOK) and every wait of the
// harness's own is nominal: what suffices for TCG guests on an otherwise
// idle 2-core machine. The harness multiplies each by one factor,
// Config.TimeoutScale: ISM_TIMEOUT_SCALE when set (any positive number),
// else (loadavg1 + 1) / CPUs clamped to [1, 4], read once per test binary,
// because a TCG vCPU thread gets about CPUs/(load+1) of a core, so
// a guest runs that much slower than on an idle machine (the cap keeps a
// hung guest reported within go test's -timeout). The guest's watchdog
// (ism.timeout) is scaled too, rounded up to whole seconds; VM.Cfg.Timeout
// holds the value the guest got. Tests with waits of their own use
// Run.Scaled. A timeout is only the bound on a failing run: tests wait for
// states (a result line, an exited guest), never for a duration.
//
// # Host-to-guest signals
//
// VMConfig.Control gives a guest a second serial port (ttyS1) on a unix
// socket, and VM.Send writes a line to it: how a test tells a running guest
// that something elsewhere has happened ("C has probed your DMB, you may
// unregister it"). The guest must open ttyS1 before it announces (with an
// ISM-RESULT line) that it waits: the 8250 driver clears the UART's FIFO
// when the port is opened, so bytes sent earlier are lost.
package vmharness

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// Config says which binaries the harness runs.
type Config struct {
	QEMU, Kernel, Initrd string
	// SMCKernel is Linux 7.x with DIBS and SMC built in
	// (scripts/provision-smc-kernel.sh), for VMs with VMConfig.SMCKernel;
	// empty when not provisioned.
	SMCKernel string
	Backend   string // empty when no backend binary was given
	Accel     string // "tcg" or "kvm"
	Keep      bool   // keep the run directory
	// TimeoutScale multiplies every timeout (see the package doc).
	TimeoutScale float64
	// ScaleSource says where TimeoutScale came from (for the test log).
	ScaleSource string
}

// loadScale is the default TimeoutScale, from the 1-minute load average
// when the first test of the binary starts (later tests would see our own
// guests' load, which the nominal timeouts already allow for).
var loadScale = sync.OnceValues(func() (float64, string) {
	ncpu := runtime.NumCPU()
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 1, fmt.Sprintf("default, no load average: %v", err)
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 1, "default, empty /proc/loadavg"
	}
	load, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return 1, fmt.Sprintf("default, /proc/loadavg: %v", err)
	}
	s := min(max((load+1)/float64(ncpu), 1), 4)
	return s, fmt.Sprintf("from load %.2f on %d CPUs; set ISM_TIMEOUT_SCALE to override", load, ncpu)
})

// timeoutScale reads ISM_TIMEOUT_SCALE, else the load-based default.
func timeoutScale() (float64, string, error) {
	if v := os.Getenv("ISM_TIMEOUT_SCALE"); v != "" {
		s, err := strconv.ParseFloat(v, 64)
		if err != nil || !(s > 0) || s > 1000 {
			return 0, "", fmt.Errorf("ISM_TIMEOUT_SCALE=%q: want a number in (0, 1000]", v)
		}
		return s, "ISM_TIMEOUT_SCALE", nil
	}
	s, src := loadScale()
	return s, src, nil
}

// Scaled returns d multiplied by the timeout scale (see the package doc).
func (c Config) Scaled(d time.Duration) time.Duration {
	if c.TimeoutScale <= 0 {
		return d
	}
	return time.Duration(float64(d) * c.TimeoutScale)
}

// ConfigFromEnv reads the ISM_* variables. It skips the test unless
// ISM_VMTEST=1 and fails it when a required path is missing.
func ConfigFromEnv(t testing.TB) Config {
	t.Helper()
	if os.Getenv("ISM_VMTEST") != "1" {
		t.Skip("VM test: set ISM_VMTEST=1 and ISM_QEMU, ISM_KERNEL, ISM_INITRD (ISM_BACKEND) or run `make vmtest`")
	}
	c := Config{
		QEMU:      os.Getenv("ISM_QEMU"),
		Kernel:    os.Getenv("ISM_KERNEL"),
		SMCKernel: os.Getenv("ISM_SMC_KERNEL"),
		Initrd:    os.Getenv("ISM_INITRD"),
		Backend:   os.Getenv("ISM_BACKEND"),
		Accel:     DetectAccel(),
		Keep:      os.Getenv("ISM_VMTEST_KEEP") == "1",
	}
	var err error
	if c.TimeoutScale, c.ScaleSource, err = timeoutScale(); err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]string{"ISM_QEMU": c.QEMU, "ISM_KERNEL": c.Kernel, "ISM_INITRD": c.Initrd} {
		if p == "" {
			t.Fatalf("%s is not set (run `make vmtest`)", name)
		}
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	for name, p := range map[string]string{"ISM_BACKEND": c.Backend, "ISM_SMC_KERNEL": c.SMCKernel} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	return c
}

// NeedSMCKernel skips a test that boots the SMC kernel when it was not
// provisioned (`make vmtest` always provides it).
func NeedSMCKernel(t testing.TB, c Config) {
	t.Helper()
	if c.SMCKernel == "" {
		t.Skip("needs ISM_SMC_KERNEL (scripts/provision-smc-kernel.sh; `make vmtest` sets it)")
	}
}

// DetectAccel returns ISM_ACCEL if set, else "kvm" only when the CPU has
// vmx/svm and /dev/kvm opens: /dev/kvm alone is not enough (on these hosts it
// exists, but a KVM guest hangs at boot), else "tcg".
func DetectAccel() string {
	if a := os.Getenv("ISM_ACCEL"); a != "" {
		return a
	}
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "tcg"
	}
	virt := false
	sc := bufio.NewScanner(strings.NewReader(string(info)))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "flags") {
			for _, f := range strings.Fields(l) {
				if f == "vmx" || f == "svm" {
					virt = true
				}
			}
			break
		}
	}
	if !virt {
		return "tcg"
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg"
	}
	f.Close()
	return "kvm"
}

// Run is one test's set of processes and its directory (sockets, logs).
type Run struct {
	T   testing.TB
	Cfg Config
	// Dir is short (/tmp/ismvm-*) because unix socket paths are limited
	// to 108 bytes and t.TempDir() paths can exceed that.
	Dir string

	mu       sync.Mutex
	vms      []*VM
	backends []*Backend
}

// New skips unless ISM_VMTEST=1, then prepares a run directory.
func New(t testing.TB) *Run {
	t.Helper()
	cfg := ConfigFromEnv(t)
	dir, err := os.MkdirTemp("", "ismvm-")
	if err != nil {
		t.Fatal(err)
	}
	r := &Run{T: t, Cfg: cfg, Dir: dir}
	// Registered first, so it runs last: after every process is gone.
	t.Cleanup(func() {
		if cfg.Keep {
			t.Logf("vmharness: keeping %s (ISM_VMTEST_KEEP=1)", dir)
			return
		}
		os.RemoveAll(dir)
	})
	t.Logf("vmharness: run dir %s, accel %s, qemu %s, timeout scale %.2f (%s)", dir, cfg.Accel, cfg.QEMU, cfg.TimeoutScale, cfg.ScaleSource)
	return r
}

// Scaled returns the nominal duration d multiplied by the run's timeout
// scale, for waits a test does itself (see the package doc).
func (r *Run) Scaled(d time.Duration) time.Duration { return r.Cfg.Scaled(d) }

// RequireBackend skips the test when no backend binary was given.
func (r *Run) RequireBackend() {
	r.T.Helper()
	if r.Cfg.Backend == "" {
		r.T.Skip("ISM_BACKEND not set: no ism-backend binary (cmd/ism-backend not built)")
	}
}

// Path returns name inside the run directory (for sockets and files the
// backend and QEMU share).
func (r *Run) Path(name string) string { return filepath.Join(r.Dir, name) }

// startProcess starts cmd in its own process group (so a kill takes any
// children too) with output to logPath; it dies with the test process.
func startProcess(cmd *exec.Cmd, logPath string) (done chan struct{}, waitErr *error, err error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, nil, err
	}
	done = make(chan struct{})
	waitErr = new(error)
	go func() {
		*waitErr = cmd.Wait()
		logf.Close()
		close(done)
	}()
	return done, waitErr, nil
}

func killGroup(cmd *exec.Cmd, sig syscall.Signal) {
	if cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, sig)
	}
}

func readTail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	l := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(l) > lines {
		l = append([]string{fmt.Sprintf("... (%d lines before)", len(l)-lines)}, l[len(l)-lines:]...)
	}
	return strings.Join(l, "\n")
}

// Backend is a running ism-backend.
type Backend struct {
	r       *Run
	cmd     *exec.Cmd
	LogPath string
	// StatsPath is the backend's -stats-file (from its arguments; empty
	// without one): Stats reads it.
	StatsPath string
	done      chan struct{}
	waitErr   *error
	stopped   atomic.Bool // Stop or Kill asked it to exit

	statsMu sync.Mutex
	lastSeq int // the latest stats file's seq Stats has seen

	args []string // its command line, for Handover
}

// StartBackend runs ISM_BACKEND with args (paths usually from r.Path) and
// waits until each of sockets exists, failing the test if the backend exits
// or the sockets don't appear within 10 s (scaled). QEMU must only start after that:
// the vhost-user handshake runs while QEMU realizes the device.
func (r *Run) StartBackend(args []string, sockets ...string) *Backend {
	t := r.T
	t.Helper()
	r.RequireBackend()
	b := r.startBackend(args)
	limit := r.Scaled(10 * time.Second)
	deadline := time.Now().Add(limit)
	for _, s := range sockets {
		for {
			if fi, err := os.Stat(s); err == nil && fi.Mode()&os.ModeSocket != 0 {
				break
			}
			if exited, err := b.Exited(); exited {
				t.Fatalf("backend exited before creating %s: %v\n%s", s, err, readTail(b.LogPath, 50))
			}
			if time.Now().After(deadline) {
				t.Fatalf("backend did not create %s within %v\n%s", s, limit, readTail(b.LogPath, 50))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return b
}

// startBackend starts ISM_BACKEND with args and registers its cleanup.
// A wrap command line (e.g. prlimit and its flags) runs the backend.
func (r *Run) startBackend(args []string, wrap ...string) *Backend {
	t := r.T
	t.Helper()
	argv := append(append(slices.Clone(wrap), r.Cfg.Backend), args...)
	b := &Backend{r: r, cmd: exec.Command(argv[0], argv[1:]...), LogPath: r.Path(fmt.Sprintf("backend%d.log", len(r.backends))),
		StatsPath: flagValue(args, "stats-file"), args: slices.Clone(args)}
	done, werr, err := startProcess(b.cmd, b.LogPath)
	if err != nil {
		t.Fatalf("start backend: %v", err)
	}
	b.done, b.waitErr = done, werr
	r.mu.Lock()
	r.backends = append(r.backends, b)
	r.mu.Unlock()
	t.Cleanup(func() {
		// A backend that died on its own during the test is a failure
		// even if every guest passed.
		if exited, err := b.Exited(); exited && !b.stopped.Load() {
			t.Errorf("backend exited during the test: %v", err)
		}
		if err := b.Stop(); err != nil {
			t.Logf("backend stop: %v", err)
		}
		if t.Failed() {
			t.Logf("=== backend log %s ===\n%s", b.LogPath, readTail(b.LogPath, 200))
		}
	})
	return b
}

// handoverPath is old's handover socket: its -handover-socket, else
// DIR/ism-backend.handover of its -socket-dir.
func (old *Backend) handoverPath() string {
	if p := flagValue(old.args, "handover-socket"); p != "" {
		return p
	}
	return filepath.Join(flagValue(old.args, "socket-dir"), "ism-backend.handover")
}

// Handover upgrades old in place: it starts a new backend with old's
// arguments plus -takeover (old's handover socket) and waits until old
// has exited with status 0, the sign that the new process took every VM
// over (cmd/ism-backend, docs/handover.md). It fails the test if the new
// process exits first, or old exits otherwise, or neither happens within
// 60 s (scaled). The new backend has old's stats file.
func (r *Run) Handover(old *Backend) *Backend {
	t := r.T
	t.Helper()
	old.stopped.Store(true) // it is to exit on its own
	nb := r.startBackend(append(slices.Clone(old.args), "-takeover", old.handoverPath()))
	limit := r.Scaled(60 * time.Second)
	select {
	case <-old.done:
		if err := *old.waitErr; err != nil {
			t.Fatalf("the old backend exited with %v after the handover\n%s", err, readTail(old.LogPath, 50))
		}
	case <-nb.done:
		t.Fatalf("the new backend exited during the handover: %v\n%s", *nb.waitErr, readTail(nb.LogPath, 50))
	case <-time.After(limit):
		t.Fatalf("no handover within %v\nold:\n%s\nnew:\n%s", limit, readTail(old.LogPath, 30), readTail(nb.LogPath, 30))
	}
	if exited, err := nb.Exited(); exited {
		t.Fatalf("the new backend exited after the handover: %v\n%s", err, readTail(nb.LogPath, 50))
	}
	return nb
}

// FailedHandover starts a new backend, run by wrap (e.g. prlimit with
// too few fds), to take old over, and expects that to fail: the new
// process must exit non-zero within 60 s (scaled) while old serves on. It
// fails the test otherwise, and returns the new process's log.
func (r *Run) FailedHandover(old *Backend, wrap ...string) string {
	t := r.T
	t.Helper()
	nb := r.startBackend(append(slices.Clone(old.args), "-takeover", old.handoverPath()), wrap...)
	nb.stopped.Store(true) // it is to exit on its own
	limit := r.Scaled(60 * time.Second)
	select {
	case <-nb.done:
	case <-old.done:
		t.Fatalf("the running backend exited during a handover that was to fail: %v\n%s", *old.waitErr, readTail(old.LogPath, 50))
	case <-time.After(limit):
		t.Fatalf("the new backend did not give up within %v\nold:\n%s\nnew:\n%s", limit, readTail(old.LogPath, 30), readTail(nb.LogPath, 30))
	}
	if *nb.waitErr == nil {
		t.Fatalf("the new backend exited 0 from a handover that was to fail\n%s", readTail(nb.LogPath, 50))
	}
	if exited, err := old.Exited(); exited {
		t.Fatalf("the running backend exited after a failed handover: %v\n%s", err, readTail(old.LogPath, 50))
	}
	b, _ := os.ReadFile(nb.LogPath)
	return string(b)
}

// flagValue returns the value of the last -name flag in args (-name V,
// --name V, -name=V or --name=V), or "".
func flagValue(args []string, name string) string {
	v := ""
	for i := 0; i < len(args); i++ {
		if !strings.HasPrefix(args[i], "-") {
			continue
		}
		a := strings.TrimPrefix(strings.TrimPrefix(args[i], "-"), "-")
		if a == name && i+1 < len(args) {
			v = args[i+1]
			i++
		} else if val, ok := strings.CutPrefix(a, name+"="); ok {
			v = val
		}
	}
	return v
}

// Counters are one VM's or the whole fabric's statistics as the backend's
// -stats-file has them (cmd/ism-backend/stats.go).
type Counters struct {
	Devices    int    `json:"devices"` // BackendStats.Total only: connected devices
	DMBs       uint64 `json:"dmbs"`    // live DMBs
	Registered uint64 `json:"registered"`
	Moves      uint64 `json:"moves"`      // MOVEs sent (signals are zero-length MOVEs)
	MoveBytes  uint64 `json:"move_bytes"` // bytes the backend copied for this sender
	Signals    uint64 `json:"signals"`    // signalled MOVEs sent
	SWEvents   uint64 `json:"sw_events"`
	Interrupts uint64 `json:"interrupts"`
	Events     uint64 `json:"events"`
	Maps       uint64 `json:"maps"`   // SHMEM_MAPs into this VM's region
	Unmaps     uint64 `json:"unmaps"` // SHMEM_UNMAPs of this VM's region
	// Attach-mode gauges of the connected device, now.
	AttachDMBs  uint64 `json:"attach_dmbs"`
	Attached    uint64 `json:"attached"`
	MappedBytes uint64 `json:"mapped_bytes"`
	// Refused requests by status ("no_entry", "permission", ...).
	Refused      map[string]uint64 `json:"refused"`
	RefusedTotal uint64            `json:"refused_total"`
	// SIGNALs this VM sent that were refused, by reason; events for it
	// that were not queued.
	SignalsRefusedPeer  uint64 `json:"signals_refused_peer"`
	SignalsRefusedRate  uint64 `json:"signals_refused_rate"`
	SignalsRefusedQueue uint64 `json:"signals_refused_queue"`
	SWEventsDropped     uint64 `json:"sw_events_dropped"`
	DeviceEventsDropped uint64 `json:"device_events_dropped"`
	// Request chains refused as malformed, and request queues broken by
	// an avail idx jump.
	BadChains    uint64 `json:"bad_chains"`
	QueuesBroken uint64 `json:"queues_broken"`
	// Faults injected with this VM as the target, by kind
	// ("drop-signals", "revoke-dmb", ...).
	Faults map[string]uint64 `json:"faults_injected"`
}

// VMStats is one -vm of the backend. Its counters add up over all its
// connections; DMBs and the gauges are its connected device's (0 when not
// connected).
type VMStats struct {
	Name      string   `json:"name"`
	GID       string   `json:"gid"`
	Modes     string   `json:"modes"` // "copy", "attach" or "copy,attach"
	Connected bool     `json:"connected"`
	Stats     Counters `json:"stats"`
}

// BackendStats is one write of the backend's -stats-file.
type BackendStats struct {
	Time  time.Time `json:"time"`
	Seq   int       `json:"seq"`
	CHID  string    `json:"chid"`
	Total Counters  `json:"total"`
	VMs   []VMStats `json:"vms"`
}

// VM returns the entry of the VM called name.
func (s BackendStats) VM(name string) (VMStats, bool) {
	for _, v := range s.VMs {
		if v.Name == name {
			return v, true
		}
	}
	return VMStats{}, false
}

// ReadStats parses the stats file as it is (e.g. the one the backend wrote
// at exit), without asking for a new one.
func (b *Backend) ReadStats() (BackendStats, error) {
	var s BackendStats
	if b.StatsPath == "" {
		return s, errors.New("the backend was started without -stats-file")
	}
	raw, err := os.ReadFile(b.StatsPath)
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(raw, &s); err != nil {
		// The backend renames a whole file into place: never torn.
		return s, fmt.Errorf("%s: %w", b.StatsPath, err)
	}
	return s, nil
}

// Stats asks the running backend for fresh statistics (SIGUSR1) and returns
// them once it has written them: a write with a seq after any Stats has
// seen and after the file's before the signal (with -stats-interval, that
// can be a tick's write from just before the signal). The backend must have
// been started with -stats-file. It fails if the backend exits or has not
// written within 10 s (scaled).
func (b *Backend) Stats() (BackendStats, error) {
	b.statsMu.Lock()
	defer b.statsMu.Unlock()
	if b.StatsPath == "" {
		return BackendStats{}, errors.New("Stats: the backend was started without -stats-file")
	}
	last := b.lastSeq
	if s, err := b.ReadStats(); err == nil {
		last = max(last, s.Seq)
	} else if !errors.Is(err, os.ErrNotExist) {
		return BackendStats{}, err
	}
	if exited, err := b.Exited(); exited {
		return BackendStats{}, fmt.Errorf("Stats: the backend has exited: %v", err)
	}
	if err := b.cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		return BackendStats{}, fmt.Errorf("Stats: SIGUSR1: %w", err)
	}
	limit := b.r.Scaled(10 * time.Second)
	deadline := time.Now().Add(limit)
	for {
		s, err := b.ReadStats()
		switch {
		case err == nil && s.Seq > last:
			b.lastSeq = s.Seq
			return s, nil
		case err != nil && !errors.Is(err, os.ErrNotExist):
			return s, err
		}
		if exited, err := b.Exited(); exited {
			return BackendStats{}, fmt.Errorf("Stats: the backend exited before writing %s: %v", b.StatsPath, err)
		}
		if time.Now().After(deadline) {
			return BackendStats{}, fmt.Errorf("Stats: no write of %s after seq %d within %v", b.StatsPath, last, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Exited reports whether the backend has exited, and how.
func (b *Backend) Exited() (bool, error) {
	select {
	case <-b.done:
		return true, *b.waitErr
	default:
		return false, nil
	}
}

// PID is the backend's process id (for sampling its /proc entries).
func (b *Backend) PID() int { return b.cmd.Process.Pid }

// Log returns the backend's output so far.
func (b *Backend) Log() string {
	s, _ := os.ReadFile(b.LogPath)
	return string(s)
}

// Stop sends SIGTERM, waits up to 5 s (scaled), then SIGKILLs the process
// group. It returns the exit error (nil for a clean exit after SIGTERM).
func (b *Backend) Stop() error {
	if exited, err := b.Exited(); exited {
		return err
	}
	b.stopped.Store(true)
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	limit := b.r.Scaled(5 * time.Second)
	select {
	case <-b.done:
		return *b.waitErr
	case <-time.After(limit):
	}
	killGroup(b.cmd, syscall.SIGKILL)
	<-b.done
	return fmt.Errorf("backend ignored SIGTERM for %v, killed: %v", limit, *b.waitErr)
}

// Kill SIGKILLs the backend's process group and waits for it.
func (b *Backend) Kill() {
	b.stopped.Store(true)
	killGroup(b.cmd, syscall.SIGKILL)
	<-b.done
}

// ISMDevice is one vhost-user-test-device-pci talking to the backend.
type ISMDevice struct {
	Socket     string // the backend's socket for this VM
	VirtioID   int    // default 38 (see notes/vhost-user-qemu11.md)
	NumVQs     int    // default 2
	ConfigSize int    // default 64
	VQSize     int    // ring size, default 256 (as ism-backend -print-qemu; QEMU's own default is 64)
}

// NetEnd is one side of a guest network link between two QEMUs: a NIC
// (virtio-net by default) on a -netdev stream over 127.0.0.1. Get both ends
// from NetPair.
type NetEnd struct {
	Port   int
	Server bool
	MAC    string
	// Model is the QEMU NIC device: NICVirtio ("" means it too) or
	// NICE1000. The guest agent loads the driver for whichever it finds.
	Model string
}

// NIC models for NetEnd.Model.
const (
	// NICVirtio is virtio-net, what guests under KVM normally have.
	NICVirtio = "virtio-net-pci"
	// NICE1000 is the emulated Intel 82540EM.
	NICE1000 = "e1000"
)

func (n NetEnd) model() string {
	if n.Model == "" {
		return NICVirtio
	}
	return n.Model
}

// NetPair returns the two ends of a link on a free 127.0.0.1 port. Start the
// VM with the server end first: StartVM waits for its port to listen before
// starting the client.
func (r *Run) NetPair() (server, client NetEnd) {
	r.T.Helper()
	p := FreePort(r.T)
	return NetEnd{Port: p, Server: true, MAC: "52:54:00:49:53:01"}, NetEnd{Port: p, MAC: "52:54:00:49:53:02"}
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// VMConfig describes one guest.
type VMConfig struct {
	Name      string            // names the log files; default vm0, vm1...
	Scenario  string            // ism.scenario
	Args      map[string]string // more ism.<key>=<value> (ip, peer, ...)
	Append    []string          // raw extra kernel arguments
	MemMB     int               // guest RAM, memfd-backed and shared; default 512
	HugePages int               // hugepages=N on the command line; default 8
	// CPUs is the number of vCPUs (-smp); default 1, the harshest case
	// for shared-memory races (the device and the driver never run at
	// once on the guest side).
	CPUs int
	// Timeout is the agent's watchdog (ism.timeout, default 120 s), nominal:
	// StartVM scales it (see the package doc) and VM.Cfg.Timeout holds the
	// scaled value. The host waits this plus two minutes (scaled; boot
	// under TCG on a busy machine) before killing QEMU.
	Timeout time.Duration
	ISM     []ISMDevice
	Net     *NetEnd
	// SMCKernel boots Config.SMCKernel (Linux 7.x with DIBS and the
	// kernel's SMC; the image carries our DIBS driver for it) instead of
	// Config.Kernel. Tests call NeedSMCKernel first.
	SMCKernel bool
	// Control adds the host-to-guest line channel (ttyS1; VM.Send).
	Control   bool
	ExtraArgs []string // appended to QEMU's command line
}

// VM is a running QEMU guest.
type VM struct {
	r          *Run
	Cfg        VMConfig
	cmd        *exec.Cmd
	SerialPath string
	LogPath    string // QEMU's own stdout/stderr
	QMPPath    string
	// ControlPath is the unix socket behind the guest's ttyS1 (only with
	// VMConfig.Control).
	ControlPath string
	Started     time.Time
	done        chan struct{}
	waitErr     *error

	mon    *qmp.SocketMonitor
	evMu   sync.Mutex
	events []qmp.Event

	ctlMu sync.Mutex
	ctl   net.Conn // to ControlPath, opened by the first Send
}

func kernelArgs(c VMConfig) string {
	a := []string{"console=ttyS0", "panic=-1", "quiet", fmt.Sprintf("hugepages=%d", c.HugePages)}
	if c.Scenario != "" {
		a = append(a, "ism.scenario="+c.Scenario)
	}
	if c.Timeout > 0 {
		a = append(a, fmt.Sprintf("ism.timeout=%d", int(c.Timeout.Seconds()+0.5)))
	}
	keys := make([]string, 0, len(c.Args))
	for k := range c.Args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := c.Args[k]
		if strings.ContainsAny(v, " \t") {
			v = `"` + v + `"` // the agent splits the command line as the kernel does
		}
		a = append(a, "ism."+k+"="+v)
	}
	return strings.Join(append(a, c.Append...), " ")
}

func (r *Run) kernel(c VMConfig) string {
	if c.SMCKernel {
		return r.Cfg.SMCKernel
	}
	return r.Cfg.Kernel
}

func (r *Run) qemuArgs(c VMConfig, serial, qmpSock, control string) []string {
	a := []string{
		"-accel", r.Cfg.Accel, "-m", fmt.Sprint(c.MemMB), "-smp", fmt.Sprint(max(c.CPUs, 1)),
		"-nodefaults", "-display", "none", "-no-reboot",
		// Guest RAM must be shared memory for the vhost-user backend to map it.
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", c.MemMB),
		"-machine", "q35,memory-backend=mem",
		"-chardev", "file,id=ser0,path=" + serial, "-serial", "chardev:ser0",
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off",
		"-kernel", r.kernel(c), "-initrd", r.Cfg.Initrd,
		"-append", kernelArgs(c),
	}
	if c.Control {
		// The second -serial is COM2 (ttyS1 in the guest). QEMU listens
		// and does not wait: the host connects on its first Send.
		a = append(a,
			"-chardev", "socket,id=ctl0,path="+control+",server=on,wait=off",
			"-serial", "chardev:ctl0")
	}
	if r.Cfg.Accel == "kvm" {
		a = append(a, "-cpu", "host")
	}
	for i, d := range c.ISM {
		a = append(a,
			"-chardev", fmt.Sprintf("socket,id=ism%d,path=%s", i, d.Socket),
			"-device", fmt.Sprintf("vhost-user-test-device-pci,chardev=ism%d,virtio-id=%d,num_vqs=%d,config_size=%d,vq_size=%d",
				i, d.VirtioID, d.NumVQs, d.ConfigSize, d.VQSize))
	}
	if n := c.Net; n != nil {
		srv := "off"
		if n.Server {
			srv = "on"
		}
		a = append(a,
			"-netdev", fmt.Sprintf("stream,id=n0,server=%s,addr.type=inet,addr.host=127.0.0.1,addr.port=%d", srv, n.Port),
			"-device", n.model()+",netdev=n0,mac="+n.MAC)
	}
	return append(a, c.ExtraArgs...)
}

// StartVM starts a guest and connects QMP. It does not wait for the agent:
// use Wait/RequireOK. Defaults fill zero fields of c.
func (r *Run) StartVM(c VMConfig) *VM {
	t := r.T
	t.Helper()
	r.mu.Lock()
	if c.Name == "" {
		c.Name = fmt.Sprintf("vm%d", len(r.vms))
	}
	r.mu.Unlock()
	if c.SMCKernel && r.Cfg.SMCKernel == "" {
		t.Fatalf("VM %s wants the SMC kernel and ISM_SMC_KERNEL is not set (call NeedSMCKernel first)", c.Name)
	}
	if c.MemMB == 0 {
		c.MemMB = 512
	}
	if c.HugePages == 0 {
		c.HugePages = 8
	}
	if c.CPUs == 0 {
		c.CPUs = 1
	}
	if c.Timeout == 0 {
		c.Timeout = 120 * time.Second
	}
	// Whole seconds, rounded up: what the guest is told (ism.timeout=N)
	// and what it reports ("timeout after Ns") must match c.Timeout.
	c.Timeout = (r.Scaled(c.Timeout) + time.Second - 1).Truncate(time.Second)
	for i := range c.ISM {
		d := &c.ISM[i]
		if d.VirtioID == 0 {
			d.VirtioID = 38
		}
		if d.NumVQs == 0 {
			d.NumVQs = 2
		}
		if d.VQSize == 0 {
			d.VQSize = 256
		}
		if d.ConfigSize == 0 {
			d.ConfigSize = 64
		}
	}
	if c.Net != nil && !c.Net.Server {
		// The stream client fails if nobody listens yet.
		if err := waitListening(c.Net.Port, r.Scaled(20*time.Second)); err != nil {
			t.Fatalf("%s: %v (start the NetPair server VM first)", c.Name, err)
		}
	}
	v := &VM{
		r: r, Cfg: c,
		SerialPath: r.Path(c.Name + ".serial"),
		LogPath:    r.Path(c.Name + ".qemu.log"),
		QMPPath:    r.Path(c.Name + ".qmp"),
	}
	if c.Control {
		v.ControlPath = r.Path(c.Name + ".ctl")
	}
	r.mu.Lock()
	for _, o := range r.vms {
		if o.Cfg.Name == c.Name && !o.Exited() {
			r.mu.Unlock()
			t.Fatalf("StartVM: a VM named %q is still running", c.Name)
		}
	}
	r.mu.Unlock()
	// A name may be reused after its VM exited: QEMU will not bind over
	// the old QMP socket.
	os.Remove(v.QMPPath)
	if v.ControlPath != "" {
		os.Remove(v.ControlPath)
	}
	args := r.qemuArgs(c, v.SerialPath, v.QMPPath, v.ControlPath)
	v.cmd = exec.Command(r.Cfg.QEMU, args...)
	v.Started = time.Now()
	done, werr, err := startProcess(v.cmd, v.LogPath)
	if err != nil {
		t.Fatalf("%s: start QEMU: %v", c.Name, err)
	}
	v.done, v.waitErr = done, werr
	r.mu.Lock()
	r.vms = append(r.vms, v)
	r.mu.Unlock()
	t.Cleanup(func() {
		v.Kill()
		if v.mon != nil {
			v.mon.Disconnect()
		}
		v.ctlMu.Lock()
		if v.ctl != nil {
			v.ctl.Close()
		}
		v.ctlMu.Unlock()
		if t.Failed() {
			t.Logf("=== %s: %s %s", c.Name, r.Cfg.QEMU, strings.Join(args, " "))
			t.Logf("=== %s QEMU output ===\n%s", c.Name, readTail(v.LogPath, 50))
			t.Logf("=== %s serial ===\n%s", c.Name, readTail(v.SerialPath, 150))
		}
	})
	if err := v.connectQMP(r.Scaled(15 * time.Second)); err != nil {
		t.Fatalf("%s: QMP: %v", c.Name, err)
	}
	return v
}

// waitListening polls /proc/net/tcp (no connection: a probe would be taken
// for the peer by QEMU's stream server) until 127.0.0.1:port listens.
func waitListening(port int, d time.Duration) error {
	want := fmt.Sprintf("0100007F:%04X", port)
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile("/proc/net/tcp")
		for _, l := range strings.Split(string(b), "\n") {
			f := strings.Fields(l)
			if len(f) > 3 && f[1] == want && f[3] == "0A" {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on 127.0.0.1:%d after %v", port, d)
}

func (v *VM) connectQMP(d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		if _, err := os.Stat(v.QMPPath); err == nil {
			break
		}
		if v.Exited() {
			return fmt.Errorf("QEMU exited at start: %v\n%s", *v.waitErr, readTail(v.LogPath, 30))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no QMP socket after %v", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The socket file appears at bind(), a moment before listen():
	// "connection refused" until then.
	var mon *qmp.SocketMonitor
	var err error
	for {
		mon, err = qmp.NewSocketMonitor("unix", v.QMPPath, 5*time.Second)
		if err == nil {
			break
		}
		if v.Exited() || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Connect has no timeout of its own: it blocks reading the greeting.
	res := make(chan error, 1)
	go func() { res <- mon.Connect() }()
	select {
	case err = <-res:
	case <-time.After(time.Until(deadline) + time.Second):
		mon.Disconnect()
		return fmt.Errorf("QMP handshake timed out")
	}
	if err != nil {
		return err
	}
	// Events must be drained or command replies can block behind them.
	evs, err := mon.Events(nil)
	if err != nil {
		mon.Disconnect()
		return err
	}
	go func() {
		for e := range evs {
			v.evMu.Lock()
			v.events = append(v.events, e)
			v.evMu.Unlock()
		}
	}()
	v.mon = mon
	return nil
}

// QMP runs a command (with args marshalled to JSON, nil for none) and returns
// its "return" value. It fails after 10 s, scaled (e.g. QEMU wedged).
func (v *VM) QMP(command string, args any) (json.RawMessage, error) {
	if v.mon == nil {
		return nil, errors.New("no QMP connection")
	}
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	type reply struct {
		b   []byte
		err error
	}
	ch := make(chan reply, 1)
	go func() {
		b, err := v.mon.Run(b)
		ch <- reply{b, err}
	}()
	select {
	case rp := <-ch:
		if rp.err != nil {
			return nil, fmt.Errorf("QMP %s: %w", command, rp.err)
		}
		var r struct {
			Return json.RawMessage `json:"return"`
		}
		if err := json.Unmarshal(rp.b, &r); err != nil {
			return nil, fmt.Errorf("QMP %s: %w", command, err)
		}
		return r.Return, nil
	case <-time.After(v.r.Scaled(10 * time.Second)):
		return nil, fmt.Errorf("QMP %s: no reply in %v", command, v.r.Scaled(10*time.Second))
	}
}

// Status returns query-status's "status" ("running", "paused", ...).
func (v *VM) Status() (string, error) {
	raw, err := v.QMP("query-status", nil)
	if err != nil {
		return "", err
	}
	var s struct{ Status string }
	err = json.Unmarshal(raw, &s)
	return s.Status, err
}

// PCIDevice is one function from query-pci.
type PCIDevice struct {
	Bus, Slot, Function int
	Vendor, Device      uint16
	Class               uint16
	Desc                string
	QdevID              string
}

// QueryPCI returns every PCI function QEMU has, bridges' buses included.
func (v *VM) QueryPCI() ([]PCIDevice, error) {
	raw, err := v.QMP("query-pci", nil)
	if err != nil {
		return nil, err
	}
	type dev struct {
		Bus, Slot, Function int
		ClassInfo           struct {
			Class uint16
			Desc  string
		} `json:"class_info"`
		ID struct {
			Vendor, Device uint16
		}
		QdevID    string `json:"qdev_id"`
		PCIBridge *struct {
			Bus struct {
				Number int
			}
			Devices []json.RawMessage
		} `json:"pci_bridge"`
	}
	var buses []struct {
		Bus     int
		Devices []json.RawMessage
	}
	if err := json.Unmarshal(raw, &buses); err != nil {
		return nil, err
	}
	var out []PCIDevice
	var walk func([]json.RawMessage) error
	walk = func(ds []json.RawMessage) error {
		for _, rd := range ds {
			var d dev
			if err := json.Unmarshal(rd, &d); err != nil {
				return err
			}
			out = append(out, PCIDevice{Bus: d.Bus, Slot: d.Slot, Function: d.Function,
				Vendor: d.ID.Vendor, Device: d.ID.Device, Class: d.ClassInfo.Class, Desc: d.ClassInfo.Desc, QdevID: d.QdevID})
			if d.PCIBridge != nil {
				if err := walk(d.PCIBridge.Devices); err != nil {
					return err
				}
			}
		}
		return nil
	}
	for _, b := range buses {
		if err := walk(b.Devices); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Events returns the QMP events seen so far (SHUTDOWN, ...).
func (v *VM) Events() []qmp.Event {
	v.evMu.Lock()
	defer v.evMu.Unlock()
	return append([]qmp.Event(nil), v.events...)
}

// Quit asks QEMU to exit through QMP (as if the host stopped the VM) and
// waits up to 10 s (scaled) for it.
func (v *VM) Quit() error {
	if _, err := v.QMP("quit", nil); err != nil && !v.Exited() {
		return err
	}
	limit := v.r.Scaled(10 * time.Second)
	select {
	case <-v.done:
		return nil
	case <-time.After(limit):
		return fmt.Errorf("QEMU still running %v after quit", limit)
	}
}

// Send writes line and a newline to the guest's control port (ttyS1; needs
// VMConfig.Control). Send only once the guest has said it listens (see the
// package doc): earlier bytes can be lost.
func (v *VM) Send(line string) error {
	if v.ControlPath == "" {
		return fmt.Errorf("%s: Send needs VMConfig.Control", v.Cfg.Name)
	}
	if strings.ContainsAny(line, "\r\n") {
		return fmt.Errorf("%s: Send: %q is more than one line", v.Cfg.Name, line)
	}
	v.ctlMu.Lock()
	defer v.ctlMu.Unlock()
	if v.ctl == nil {
		// Kept open until the VM's cleanup: QEMU reads the socket only as
		// fast as the UART takes bytes, and a hang-up could drop the rest.
		c, err := net.DialTimeout("unix", v.ControlPath, v.r.Scaled(5*time.Second))
		if err != nil {
			return fmt.Errorf("%s: control port: %w", v.Cfg.Name, err)
		}
		v.ctl = c
	}
	if err := v.ctl.SetWriteDeadline(time.Now().Add(v.r.Scaled(10 * time.Second))); err != nil {
		return err
	}
	if _, err := v.ctl.Write([]byte(line + "\n")); err != nil {
		return fmt.Errorf("%s: control port: %w", v.Cfg.Name, err)
	}
	return nil
}

// Kill SIGKILLs QEMU's process group (a crashed host process, as far as the
// backend can tell) and waits for it. Safe to call more than once.
func (v *VM) Kill() {
	if v.Exited() {
		return
	}
	killGroup(v.cmd, syscall.SIGKILL)
	<-v.done
}

// Exited reports whether QEMU has exited.
func (v *VM) Exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

// Serial returns the guest console output so far.
func (v *VM) Serial() string {
	b, _ := os.ReadFile(v.SerialPath)
	return string(b)
}

// Outcome parses the serial output so far.
func (v *VM) Outcome() Outcome { return ParseSerial(v.Serial()) }

// WaitSerial waits until the serial output contains substr (for acting on a
// guest mid-run, e.g. after "ISM-RESULT ready=1"). It returns an error on
// timeout (nominal: scaled here) or when QEMU exits first.
func (v *VM) WaitSerial(substr string, timeout time.Duration) error {
	timeout = v.r.Scaled(timeout)
	deadline := time.Now().Add(timeout)
	for {
		if strings.Contains(v.Serial(), substr) {
			return nil
		}
		if v.Exited() {
			if strings.Contains(v.Serial(), substr) {
				return nil
			}
			return fmt.Errorf("%s: QEMU exited before %q appeared", v.Cfg.Name, substr)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %q not seen within %v", v.Cfg.Name, substr, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Wait waits for QEMU to exit (the agent powers off after its END marker),
// killing it after timeout from its start (nominal, scaled here; 0: the
// agent's timeout plus two minutes), and returns the agent's outcome,
// QEMU's run time, and an error if QEMU had to be killed or exited with an
// error status.
func (v *VM) Wait(timeout time.Duration) (Outcome, time.Duration, error) {
	if timeout == 0 {
		timeout = v.Cfg.Timeout + v.r.Scaled(2*time.Minute) // Cfg.Timeout is already scaled
	} else {
		timeout = v.r.Scaled(timeout)
	}
	var err error
	select {
	case <-v.done:
		if *v.waitErr != nil {
			err = fmt.Errorf("%s: QEMU exited: %v", v.Cfg.Name, *v.waitErr)
		}
	case <-time.After(timeout - time.Since(v.Started)):
		v.Kill()
		err = fmt.Errorf("%s: QEMU still running after %v: killed", v.Cfg.Name, timeout)
	}
	return v.Outcome(), time.Since(v.Started), err
}

// RequireOK waits as Wait does and fails the test unless QEMU exited cleanly
// after "ISM-AGENT-END ok". It logs the boot-to-exit time.
func (v *VM) RequireOK(timeout time.Duration) Outcome {
	t := v.r.T
	t.Helper()
	o, took, err := v.Wait(timeout)
	switch {
	case err != nil:
		t.Fatalf("%v (agent: began=%v ended=%v fail=%q)", err, o.Began, o.Ended, o.Fail)
	case !o.Began:
		t.Fatalf("%s: no ISM-AGENT-BEGIN on the serial console", v.Cfg.Name)
	case !o.Ended:
		t.Fatalf("%s: no ISM-AGENT-END on the serial console", v.Cfg.Name)
	case !o.OK:
		t.Fatalf("%s: scenario %s failed: %s", v.Cfg.Name, o.Scenario, o.Fail)
	}
	t.Logf("%s: %s ok in %.1fs: %v", v.Cfg.Name, o.Scenario, took.Seconds(), o.Results)
	return o
}

// WaitResult waits for "ISM-RESULT key=..." from a guest that is still
// running (e.g. a receiver's token that the sender's command line needs)
// and returns the value.
func (v *VM) WaitResult(key string, timeout time.Duration) (string, error) {
	if err := v.WaitSerial("ISM-RESULT "+key+"=", timeout); err != nil {
		return "", err
	}
	// The line may still be arriving: wait for its newline.
	deadline := time.Now().Add(v.r.Scaled(5 * time.Second))
	for {
		s := v.Serial()
		i := strings.Index(s, "ISM-RESULT "+key+"=")
		if j := strings.IndexByte(s[i:], '\n'); j >= 0 {
			return ParseSerial(s[:i+j+1]).Results[key], nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s: unterminated ISM-RESULT %s line", v.Cfg.Name, key)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
