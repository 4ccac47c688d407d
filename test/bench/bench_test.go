package bench

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// TestBench is `make bench`'s VM part. It runs only with ISM_BENCH=1 (and the
// ISM_VMTEST=1 / ISM_QEMU / ISM_KERNEL / ISM_INITRD / ISM_BACKEND variables
// the VM harness reads), since it takes minutes:
//
//	inter-VM  guests a (bench-server) and b (bench-client) on one backend,
//	          CLC over a network link between them: smcd-attach, smcd-copy,
//	          kernel-smcd and tcp
//	intra-VM  one guest (bench-local): smcd-attach, smcd-copy, kernel-lo,
//	          tcp over 127.0.0.1, unix
//
// With the SMC kernel provisioned (ISM_SMC_KERNEL, as make bench does) every
// bench guest boots it, so that the kernel's own SMC-D runs beside our Go
// stack in the same guests: kernel-smcd is the kernel's AF_SMC through our
// DIBS driver on each guest's second ISM device (the Go driver has the
// first), kernel-lo the kernel's loopback-ism. Without it the guests boot
// Debian's 6.1 kernel and the kernel transports are left out.
//
// Knobs: ISM_BENCH_DUR (per measurement, default 3s; lat takes twice
// that), ISM_BENCH_ROUNDS
// (default 5), ISM_BENCH_DMB (SMC-D DMB size in bytes, default 1 MiB;
// "default": the stack's smcd.DefaultDMBSize),
// ISM_BENCH_TESTS (the guest's ism.tests; unset: the guest's default, all
// of them), ISM_BENCH_SCOPES (inter,intra,idle),
// ISM_BENCH_WAIT (how the guest driver waits for signals: auto, the driver's
// default, which is interrupts; or poll), ISM_BENCH_IDLE (the idle phase's
// window per wait mode, default 60s), ISM_BENCH_OUT (directory for the JSON,
// CSV and SVG chart, default bench-results/ at the top of the module).
//
//	idle      one guest, 4 idle intra-VM SMC-D connections: the guest's busy
//	          CPU time over ISM_BENCH_IDLE with the driver polling, then
//	          sleeping on interrupts
func TestBench(t *testing.T) {
	if os.Getenv("ISM_BENCH") != "1" {
		t.Skip("ISM_BENCH=1 not set (make bench)")
	}
	started := time.Now()
	dur := envOr("ISM_BENCH_DUR", "3s")
	d, err := time.ParseDuration(dur)
	if err != nil || d <= 0 {
		t.Fatalf("ISM_BENCH_DUR=%q: %v", dur, err)
	}
	rounds, err := strconv.Atoi(envOr("ISM_BENCH_ROUNDS", "5"))
	if err != nil || rounds <= 0 {
		t.Fatalf("ISM_BENCH_ROUNDS: %v", err)
	}
	tests := os.Getenv("ISM_BENCH_TESTS")
	scopes := envOr("ISM_BENCH_SCOPES", "inter,intra,idle")
	idleDur, err := time.ParseDuration(envOr("ISM_BENCH_IDLE", "60s"))
	if err != nil || idleDur <= 0 {
		t.Fatalf("ISM_BENCH_IDLE: %v", err)
	}
	wait := envOr("ISM_BENCH_WAIT", "auto")
	// The guests get 32 huge pages (64 MiB); the driver may use 24 of them
	// for DMA (rings and DMBs: 1 MiB DMBs need more than the default 8).
	args := map[string]string{"dur": dur, "rounds": strconv.Itoa(rounds), "hugepages": "24", "wait": wait}
	// Measurement times (in ism.dur) per transport and round, for the
	// estimate: by default the guest's five (tput, tput32, lat with its
	// three percentiles and twice the time, msgrate, http).
	nTests := 6
	if tests != "" {
		args["tests"] = tests
		nTests = len(strings.Split(tests, ","))
		if strings.Contains(","+tests+",", ",lat,") {
			nTests++
		}
	}
	// 1 MiB DMBs for one connection, as the SMC-D loopback figures used
	// 1 MB buffers; 64 KiB for the 32-connection tests (the agent's
	// defaults). ISM_BENCH_DMB=default: the stack's own default
	// (smcd.DefaultDMBSize) for both.
	switch dmb := envOr("ISM_BENCH_DMB", "1048576"); dmb {
	case "default":
		args["dmb_size"] = strconv.Itoa(smcd.DefaultDMBSize)
		args["dmb_many"] = strconv.Itoa(smcd.DefaultDMBSize)
	default:
		args["dmb_size"] = dmb
	}
	accel := vmharness.DetectAccel()
	qemu := qemuVersion(os.Getenv("ISM_QEMU"))

	// Estimate: each measurement is dur plus about half a second of
	// set-up under TCG; a phase boots its guests in ~40 s.
	est := func(transports int) time.Duration {
		return time.Duration(nTests*rounds*transports)*(d+d/4) + 45*time.Second
	}
	// The SMC kernel adds the kernel's SMC-D to each scope.
	nInter, nIntra := interTransports, intraTransports
	if os.Getenv("ISM_SMC_KERNEL") != "" {
		nInter, nIntra = nInter+1, nIntra+1
	}
	var total time.Duration
	if strings.Contains(scopes, "inter") {
		total += est(nInter)
	}
	if strings.Contains(scopes, "intra") {
		total += est(nIntra)
	}
	if strings.Contains(scopes, "idle") {
		total += 2*idleDur + 45*time.Second
	}
	say("accelerator: %s (%s); %s", accel, accelNote(accel), qemu)
	load0 := loadAvg()
	say("plan: %s; tests %s; %d rounds x %s per measurement; about %v in all",
		scopes, envOr("ISM_BENCH_TESTS", "the guest's default"), rounds, dur, total.Round(10*time.Second))
	say("host load average before: %s (other work on the host skews single rounds: see the spread column)", load0)

	var samples []Sample
	var failures []Failure
	config := map[string]string{}
	// Per phase the guest's own watchdog: the estimate with a wide margin.
	if strings.Contains(scopes, "inter") {
		t.Run("inter", func(t *testing.T) {
			s, f, cfg := runInter(t, args, 3*est(nInter)+2*time.Minute)
			samples = append(samples, s...)
			failures = append(failures, f...)
			config["inter-VM"] = cfg
		})
	}
	if strings.Contains(scopes, "intra") {
		t.Run("intra", func(t *testing.T) {
			s, f, cfg := runIntra(t, args, 3*est(nIntra)+2*time.Minute)
			samples = append(samples, s...)
			failures = append(failures, f...)
			config["intra-VM"] = cfg
		})
	}
	var idle []string
	if strings.Contains(scopes, "idle") {
		t.Run("idle", func(t *testing.T) {
			idle = runIdle(t, idleDur)
			config["idle"] = strings.Join(idle, "; ")
		})
	}
	if len(samples) == 0 && len(idle) == 0 {
		t.Fatal("no samples")
	}
	r := NewReport(samples)
	r.Failures = failures
	r.Started, r.Accel, r.QEMU, r.Config = started.UTC(), accel, qemu, config
	r.VCPUs, r.Rounds, r.Dur = benchVCPUs, rounds, dur
	r.Host = hostInfo()
	r.Load = load0 + " -> " + loadAvg()
	r.Duration = time.Since(started).Round(time.Second).String()

	fmt.Printf("\n== VM benchmark: SMC-D vs TCP (vs UNIX sockets inside one guest), accelerator %s ==\n", accel)
	fmt.Printf("%d rounds x %s per cell, transports interleaved; %d vCPU per guest; %s\n", rounds, dur, benchVCPUs, qemu)
	fmt.Printf("host: %s; load average (1/5/15 min) before -> after: %s\n", r.Host, r.Load)
	for _, sc := range Scopes {
		if c, ok := config[sc]; ok {
			fmt.Printf("%s guest config: %s\n", sc, c)
		}
	}
	if accel != "kvm" {
		fmt.Println("TCG: every guest instruction is emulated; absolute figures mean little, read the ratios.")
	}
	fmt.Printf("guest driver waits by: %s\n", wait)
	fmt.Println()
	if len(samples) > 0 {
		r.WriteTable(os.Stdout)
	}
	if len(idle) > 0 {
		fmt.Println("\nidle SMC-D connections, guest CPU time (1 vCPU):")
		for _, l := range idle {
			fmt.Println("  " + l)
		}
	}
	dir, err := writeFiles(r)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("\nbench: %s/latest.{json,csv,svg} (and time-stamped copies), guest consoles %s/*.serial; took %s\n", dir, dir, r.Duration)
	if len(failures) > 0 {
		t.Errorf("%d measurements failed (listed under the table)", len(failures))
	}
	if t.Failed() {
		fmt.Println("bench: INCOMPLETE: a phase or a measurement failed, see above")
	}
}

// benchVCPUs is every bench guest's vCPU count (the chart's title says it).
const benchVCPUs = 1

// Transports per scope, for the time estimate: smcd-attach, smcd-copy, tcp
// (and unix inside one guest), and with the SMC kernel one more each
// (kernelTransports).
const interTransports, intraTransports = 3, 4

// kernelTransports are the scopes' transports of the kernel's own SMC-D.
var kernelTransports = map[string]string{"inter-VM": "kernel-smcd", "intra-VM": "kernel-lo"}

// withKernel returns args with the scope's kernel transport added to the
// guests' transports, if the SMC kernel is there.
func withKernel(c vmharness.Config, scope string, args map[string]string, def []string) map[string]string {
	if c.SMCKernel == "" {
		return args
	}
	out := map[string]string{}
	for k, v := range args {
		out[k] = v
	}
	out["transports"] = strings.Join(append(def, kernelTransports[scope]), ",")
	return out
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func say(format string, a ...any) {
	fmt.Printf("bench: "+format+"\n", a...)
}

func accelNote(a string) string {
	if a == "kvm" {
		return "CPU has vmx/svm and /dev/kvm opens"
	}
	if os.Getenv("ISM_ACCEL") != "" {
		return "forced by ISM_ACCEL"
	}
	return "no vmx/svm on this CPU: emulated"
}

func qemuVersion(q string) string {
	if q == "" {
		return "qemu ?"
	}
	out, err := exec.Command(q, "--version").Output()
	if err != nil {
		return "qemu ?"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func hostInfo() string {
	n := 0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		n = strings.Count(string(b), "\nprocessor")
		if strings.HasPrefix(string(b), "processor") {
			n++
		}
	}
	h, _ := os.Hostname()
	return fmt.Sprintf("%s, %d CPUs", h, n)
}

// follow prints the guest's "bench ..." progress lines while it runs.
func follow(v *vmharness.VM, label string) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		printed, last := 0, false
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			lines := strings.Split(v.Serial(), "\n")
			if len(lines) > 0 && !last {
				lines = lines[:len(lines)-1] // maybe incomplete
			}
			for _, l := range lines[min(printed, len(lines)):] {
				if i := strings.Index(l, "ism-agent: bench"); i >= 0 {
					fmt.Printf("  %s: %s\n", label, strings.TrimPrefix(l[i:], "ism-agent: "))
				}
			}
			printed = max(printed, len(lines))
			if last {
				return
			}
			select {
			case <-done:
				last = true // one more pass: the lines since the last tick
			case <-tick.C:
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

func runInter(t *testing.T, args map[string]string, timeout time.Duration) ([]Sample, []Failure, string) {
	r := vmharness.New(t)
	r.RequireBackend()
	smcKernel := r.Cfg.SMCKernel != ""
	args = withKernel(r.Cfg, "inter-VM", args, []string{"smcd-attach", "smcd-copy", "tcp"})
	sa, sb := r.Path("a.sock"), r.Path("b.sock")
	devA, devB := []vmharness.ISMDevice{{Socket: sa}}, []vmharness.ISMDevice{{Socket: sb}}
	vms := []string{"-vm", "a", "-vm", "b"}
	socks := []string{sa, sb}
	if smcKernel {
		// A second device per guest for the kernel's SMC-D (our DIBS
		// driver), its own VM on the backend: the Go driver keeps the first.
		ka, kb := r.Path("a-kernel.sock"), r.Path("b-kernel.sock")
		vms = append(vms, "-vm", "a-kernel", "-vm", "b-kernel")
		socks = append(socks, ka, kb)
		devA, devB = append(devA, vmharness.ISMDevice{Socket: ka}), append(devB, vmharness.ISMDevice{Socket: kb})
	}
	r.StartBackend(append([]string{"-socket-dir", r.Dir}, vms...), socks...)
	srv, cli := r.NetPair()
	serverArgs := map[string]string{"ip": "169.254.7.1/24", "hugepages": args["hugepages"], "wait": args["wait"]}
	for _, k := range []string{"dmb_size", "dmb_many", "transports"} {
		if v, ok := args[k]; ok {
			serverArgs[k] = v
		}
	}
	clientArgs := map[string]string{"ip": "169.254.7.2/24", "connect": "169.254.7.1"}
	for k, v := range args {
		clientArgs[k] = v
	}
	say("inter-VM: booting guests a (bench-server) and b (bench-client), CLC over virtio-net, %s", kernelName(smcKernel))
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "bench-server", Net: &srv, Timeout: timeout, SMCKernel: smcKernel,
		HugePages: 32, CPUs: benchVCPUs, Args: serverArgs, ISM: devA})
	b := r.StartVM(vmharness.VMConfig{Name: "b", Scenario: "bench-client", Net: &cli, Timeout: timeout, SMCKernel: smcKernel,
		HugePages: 32, CPUs: benchVCPUs, Args: clientArgs, ISM: devB})
	stop := follow(b, "inter-VM")
	ob := waitAgent(t, b)
	stop()
	waitAgent(t, a)
	keepSerial(t, "inter-VM", a, b)
	s, f, err := ParseResults("inter-VM", ob.Results)
	if err != nil {
		t.Fatal(err)
	}
	if len(f) > 0 {
		// Fails the phase, so the harness dumps the consoles (with the
		// agent's goroutine dump) and the backend log.
		t.Errorf("%d inter-VM measurements failed", len(f))
	}
	return s, f, ob.Results["bench.config"]
}

func kernelName(smc bool) string {
	if smc {
		return "on the SMC kernel (Linux 7.x with DIBS; the kernel's SMC-D beside ours)"
	}
	return "on Debian's 6.1 kernel (no SMC kernel provisioned: no kernel SMC-D rows)"
}

// waitAgent waits for the guest to finish and fails the test (keeping what it
// reported) unless its agent ended ok.
func waitAgent(t *testing.T, v *vmharness.VM) vmharness.Outcome {
	t.Helper()
	o, took, err := v.Wait(0)
	switch {
	case err != nil:
		t.Errorf("%s: %v", v.Cfg.Name, err)
	case !o.OK:
		t.Errorf("%s: scenario %s failed after %v: %s", v.Cfg.Name, v.Cfg.Scenario, took.Round(time.Second), o.Fail)
	}
	return o
}

func runIntra(t *testing.T, args map[string]string, timeout time.Duration) ([]Sample, []Failure, string) {
	r := vmharness.New(t)
	r.RequireBackend()
	sock := r.Path("a.sock")
	r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a"}, sock)
	smcKernel := r.Cfg.SMCKernel != ""
	args = withKernel(r.Cfg, "intra-VM", args, []string{"smcd-attach", "smcd-copy", "tcp", "unix"})
	say("intra-VM: booting one guest (bench-local), %s", kernelName(smcKernel))
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "bench-local", Timeout: timeout, HugePages: 32, SMCKernel: smcKernel,
		CPUs: benchVCPUs, Args: args, ISM: []vmharness.ISMDevice{{Socket: sock}}})
	stop := follow(a, "intra-VM")
	o := waitAgent(t, a)
	stop()
	keepSerial(t, "intra-VM", a)
	s, f, err := ParseResults("intra-VM", o.Results)
	if err != nil {
		t.Fatal(err)
	}
	if len(f) > 0 {
		t.Errorf("%d intra-VM measurements failed", len(f))
	}
	return s, f, o.Results["bench.config"]
}

// runIdle measures what 4 idle SMC-D connections cost the guest's CPU with
// the driver polling and with it sleeping on interrupts (scenario smcd-idle),
// in one guest, one mode after the other.
func runIdle(t *testing.T, window time.Duration) []string {
	r := vmharness.New(t)
	r.RequireBackend()
	sock := r.Path("a.sock")
	r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a"}, sock)
	say("idle: booting one guest (smcd-idle), 4 idle SMC-D connections, %v per wait mode", window)
	a := r.StartVM(vmharness.VMConfig{Name: "a", Scenario: "smcd-idle", Timeout: 2*window + 3*time.Minute,
		Args: map[string]string{"idle": window.String(), "conns": "4"}, ISM: []vmharness.ISMDevice{{Socket: sock}}})
	o := waitAgent(t, a)
	keepSerial(t, "idle", a)
	var lines []string
	for _, mode := range []string{"poll", "interrupts"} {
		g, ok := o.Results["idle."+mode+".guest_cpu_ms"]
		if !ok {
			t.Errorf("idle: no figure for %s", mode)
			continue
		}
		ms, _ := strconv.ParseFloat(g, 64)
		lines = append(lines, fmt.Sprintf("%-10s guest busy %6s ms in %ss (%.1f%% of the vCPU), ism-agent %s ms",
			mode, g, o.Results["idle."+mode+".seconds"], ms/window.Seconds()/10, o.Results["idle."+mode+".agent_cpu_ms"]))
	}
	return lines
}

// keepSerial saves the guests' consoles as <out>/<scope>-<vm>.serial (the
// harness removes its run directory).
func keepSerial(t *testing.T, scope string, vms ...*vmharness.VM) {
	dir, err := outDir()
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	for _, v := range vms {
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, scope+"-"+v.Cfg.Name+".serial"), []byte(v.Serial()), 0o644)
		}
	}
	if err != nil {
		t.Logf("keeping the consoles: %v", err)
	}
}

func outDir() (string, error) {
	if dir := os.Getenv("ISM_BENCH_OUT"); dir != "" {
		return dir, nil
	}
	top, err := moduleRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(top, "bench-results"), nil
}

// writeFiles writes the report as JSON, CSV and the SVG chart, time-stamped
// and as latest.*, into ISM_BENCH_OUT or bench-results/ at the module's top
// (which ignores itself for git). The chart in docs/ is a copy a person
// updates deliberately (cmd/benchchart), never this.
func writeFiles(r *Report) (string, error) {
	dir, err := outDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, ".gitignore"), []byte("# written by test/bench: results stay out of git\n*\n"), 0o644); err != nil {
		return "", err
	}
	js, err := r.EncodeJSON()
	if err != nil {
		return "", err
	}
	var csvBuf, svgBuf bytes.Buffer
	if err := r.WriteCSV(&csvBuf); err != nil {
		return "", err
	}
	if err := r.WriteSVG(&svgBuf); err != nil {
		return "", err
	}
	stamp := r.Started.Format("20060102T150405Z")
	for _, name := range []string{"vm-" + stamp, "latest"} {
		for ext, b := range map[string][]byte{".json": js, ".csv": csvBuf.Bytes(), ".svg": svgBuf.Bytes()} {
			if err := os.WriteFile(filepath.Join(dir, name+ext), b, 0o644); err != nil {
				return "", err
			}
		}
	}
	return dir, nil
}

func moduleRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		p := filepath.Dir(d)
		if p == d {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		d = p
	}
}

func TestWriteFiles(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("ISM_BENCH_OUT", dir)
	r := synthReport()
	got, err := writeFiles(r)
	if err != nil || got != dir {
		t.Fatalf("writeFiles: %q, %v", got, err)
	}
	for _, name := range []string{"latest", "vm-20250601T123456Z"} {
		for _, ext := range []string{".json", ".csv", ".svg"} {
			if fi, err := os.Stat(filepath.Join(dir, name+ext)); err != nil || fi.Size() == 0 {
				t.Errorf("%s%s: %v", name, ext, err)
			}
		}
	}
	// latest.json reads back into the same chart as latest.svg.
	f, err := os.Open(filepath.Join(dir, "latest.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	back, err := ReadReport(f)
	if err != nil {
		t.Fatal(err)
	}
	var svg bytes.Buffer
	back.WriteSVG(&svg)
	if want, _ := os.ReadFile(filepath.Join(dir, "latest.svg")); !bytes.Equal(svg.Bytes(), want) {
		t.Error("latest.json does not redraw latest.svg")
	}
}
