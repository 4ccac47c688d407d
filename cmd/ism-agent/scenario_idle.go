package main

// smcd-idle  what idle SMC-D connections cost the guest's CPU, per wait
//            mode: for each of ism.modes (default "poll,interrupts") it
//            opens the device in that mode, sets up ism.conns (default 4)
//            intra-VM SMC-D connections, exchanges one message on each, then
//            leaves them idle for ism.idle (default 60s) and reports the
//            guest's busy CPU time (all of /proc/stat but idle and iowait)
//            and this process's own (getrusage) over that time:
//            idle.<mode>.guest_cpu_ms, idle.<mode>.agent_cpu_ms.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
	"github.com/ism-backend/ism-backend/guestdriver/smcdev"
)

func init() {
	register("smcd-idle", smcdIdle)
}

func smcdIdle(e *Env) error {
	conns := e.ArgInt("conns", 4)
	idle := e.ArgDuration("idle", time.Minute)
	if conns <= 0 || idle <= 0 {
		return fmt.Errorf("ism.conns=%d ism.idle=%v", conns, idle)
	}
	for _, mode := range splitList(e.Arg("modes", "poll,interrupts")) {
		if err := idleRound(e, mode, conns, idle); err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
	}
	return nil
}

func idleRound(e *Env, mode string, conns int, idle time.Duration) error {
	d, err := openDriverWait(e, mode)
	if err != nil {
		return err
	}
	defer d.Close()
	if mode == "interrupts" && !d.Interrupts() {
		return errors.New("the driver could not use interrupts")
	}
	dev := smcdev.New(d)
	ln, err := (&smcd.Server{Logf: e.Logf}).Listen(dev, "tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	var open []net.Conn
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	accepted := make(chan net.Conn, conns)
	go func() {
		for range conns {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			go func() { _, _ = io.Copy(c, c) }() // echo, then idle in Read
			accepted <- c
		}
	}()
	dialer := &smcd.Dialer{}
	for i := range conns {
		c, err := dialer.DialContext(e.Ctx, dev, "tcp", ln.Addr().String())
		if err != nil {
			return fmt.Errorf("dial %d: %w", i, err)
		}
		open = append(open, c)
		if !smcd.IsSMC(c) {
			return fmt.Errorf("connection %d fell back to TCP", i)
		}
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		var b [4]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return fmt.Errorf("echo %d: %w", i, err)
		}
		s, ok := <-accepted
		if !ok {
			return errors.New("accept failed")
		}
		open = append(open, s)
	}
	e.Logf("idle: %d SMC-D connections open, waiting by %s; measuring %v", conns, mode, idle)
	g0, err := guestBusy()
	if err != nil {
		return err
	}
	a0 := agentCPU()
	time.Sleep(idle) // the measurement window itself, not a wait for a state
	g1, err := guestBusy()
	if err != nil {
		return err
	}
	a1 := agentCPU()
	e.Result("idle."+mode+".seconds", fmt.Sprintf("%.1f", idle.Seconds()))
	e.Result("idle."+mode+".guest_cpu_ms", (g1 - g0).Milliseconds())
	e.Result("idle."+mode+".agent_cpu_ms", (a1 - a0).Milliseconds())
	return nil
}

// guestBusy is the guest's CPU time not idle, from /proc/stat's cpu line.
func guestBusy() (time.Duration, error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 || fs[0] != "cpu" {
			continue
		}
		var busy uint64
		for i, v := range fs[1:] {
			if i == 3 || i == 4 { // idle, iowait
				continue
			}
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return 0, err
			}
			busy += n
		}
		// USER_HZ is 100 on Linux/x86.
		return time.Duration(busy) * 10 * time.Millisecond, nil
	}
	return 0, errors.New("no cpu line in /proc/stat")
}

// agentCPU is this process's user plus system time.
func agentCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
