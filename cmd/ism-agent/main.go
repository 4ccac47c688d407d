// Command ism-agent is the guest side of the VM tests. u-root's init runs it
// (-uinitcmd); it reads ism.* arguments from the kernel command line, sets up
// the guest (modules, hugetlbfs, eth0), runs the scenario named by
// ism.scenario and reports on the serial console:
//
//	ISM-AGENT-BEGIN <scenario>
//	ISM-RESULT <key>=<value>          (any number)
//	ISM-AGENT-END ok | ISM-AGENT-END fail: <error>
//
// then powers the guest off, so QEMU (-no-reboot) exits.
//
// Kernel arguments it understands itself:
//
//	ism.scenario=<name>     scenario to run (required)
//	ism.timeout=<dur>       watchdog for the whole run (default 120s; "90" = 90s)
//	ism.ip=<addr/len>       configure eth0 (loads the NIC's driver if needed: virtio_net or e1000) and bring it up
//	ism.dev=<ifname>        interface for ism.ip (default eth0)
//	ism.modules=<a,b>       extra kernel modules to load first (e.g. virtio_pci)
//	ism.wait_peer=<ip>      wait until ip answers ICMP before the scenario
//	ism.poweroff=0          stay up after the scenario (debugging)
//
// Everything else under ism.* is for the scenario (Env.Arg).
//
// The agent runs the scenario in a child process (itself, re-executed) so that
// a panic in any goroutine, or a hang, still ends with an END marker and a
// power-off instead of a guest that sits at a dead console until the host
// harness times out.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	roleEnv      = "ISM_AGENT_ROLE"
	exitEndFail  = 3 // child printed "END fail" itself
	defaultLimit = 120 * time.Second
)

var (
	cmdlinePath = flag.String("cmdline", "/proc/cmdline", "file holding the kernel command line")
	noPoweroff  = flag.Bool("no-poweroff", false, "do not power off at the end (for running outside a guest)")
	noSetup     = flag.Bool("no-setup", false, "skip guest setup: modules, mounts, network (for running outside a guest)")
)

func main() {
	flag.Parse()
	raw, err := os.ReadFile(*cmdlinePath)
	if err != nil {
		fmt.Printf("ISM-AGENT-END fail: read %s: %v\n", *cmdlinePath, err)
		finish(nil)
		return
	}
	args := parseCmdline(string(raw))
	if os.Getenv(roleEnv) == "scenario" {
		os.Exit(runChild(args))
	}
	supervise(args)
	finish(args)
}

// timeoutOf reads ism.timeout: a Go duration or a number of seconds.
func timeoutOf(args map[string]string) time.Duration {
	v, ok := args["timeout"]
	if !ok {
		return defaultLimit
	}
	if n, err := strconv.Atoi(v); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	if d, err := time.ParseDuration(v); err == nil && d > 0 {
		return d
	}
	fmt.Printf("ism-agent: bad ism.timeout=%q, using %v\n", v, defaultLimit)
	return defaultLimit
}

// supervise runs the scenario child and prints the END marker whenever the
// child could not (crash, signal, timeout).
func supervise(args map[string]string) {
	limit := timeoutOf(args)
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	// gobusybox dispatches on argv[0], so keep ours.
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), roleEnv+"=scenario")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Printf("ISM-AGENT-BEGIN %s\n", args["scenario"])
		fmt.Printf("ISM-AGENT-END fail: start scenario process: %v\n", err)
		return
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &ee) && ee.ExitCode() == exitEndFail:
		default:
			fmt.Printf("ISM-AGENT-END fail: scenario process died: %v\n", err)
		}
	case <-time.After(limit):
		_ = cmd.Process.Kill()
		<-done
		fmt.Printf("ISM-AGENT-END fail: timeout after %v (ism.timeout)\n", limit)
	}
}

// runChild sets up the guest, runs the scenario and prints the markers; its
// exit code tells the supervisor whether END was printed.
func runChild(args map[string]string) (code int) {
	name := args["scenario"]
	limit := timeoutOf(args)
	// Leave the scenario a margin to report before the supervisor kills it.
	ctx, cancel := context.WithTimeout(context.Background(), limit-limit/10)
	defer cancel()
	env := &Env{Args: args, Ctx: ctx, out: os.Stdout}
	env.println("ISM-AGENT-BEGIN " + oneLine(name))
	end := func(err error) int {
		if err != nil {
			env.println("ISM-AGENT-END fail: " + oneLine(err.Error()))
			return exitEndFail
		}
		env.println("ISM-AGENT-END ok")
		return 0
	}
	defer func() {
		if r := recover(); r != nil {
			env.Logf("panic: %v\n%s", r, debug.Stack())
			code = end(fmt.Errorf("panic: %v", r))
		}
	}()
	fn, ok := lookupScenario(name)
	if !ok {
		return end(fmt.Errorf("unknown scenario %q (have: %s)", name, strings.Join(scenarioNames(), ", ")))
	}
	if !*noSetup {
		if err := setupGuest(env); err != nil {
			return end(fmt.Errorf("setup: %w", err))
		}
	}
	if p := env.Arg("wait_peer", ""); p != "" {
		if err := env.WaitPeer(p); err != nil {
			return end(err)
		}
	}
	start := time.Now()
	err := fn(env)
	env.Result("agent.scenario_seconds", fmt.Sprintf("%.3f", time.Since(start).Seconds()))
	return end(err)
}

// finish flushes the console and powers the guest off.
func finish(args map[string]string) {
	drainConsole()
	if *noPoweroff {
		return
	}
	if args["poweroff"] == "0" {
		// Returning would let u-root's init exit and the kernel panic;
		// stay until the host stops the VM. (Not select{}: with no
		// other goroutine the runtime calls that a deadlock and exits.)
		for {
			time.Sleep(time.Hour)
		}
	}
	syscall.Sync()
	if err := syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		fmt.Printf("ism-agent: power off: %v\n", err)
		os.Exit(1)
	}
}
