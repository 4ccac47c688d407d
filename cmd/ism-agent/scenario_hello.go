package main

import (
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// hello proves boot, the agent and the serial protocol: it reports the
// kernel release and the guest uptime at the time the scenario ran.
func init() {
	register("hello", func(e *Env) error {
		var u unix.Utsname
		if err := unix.Uname(&u); err != nil {
			return err
		}
		e.Result("uname", unix.ByteSliceToString(u.Sysname[:])+" "+unix.ByteSliceToString(u.Release[:])+" "+unix.ByteSliceToString(u.Machine[:]))
		up, err := os.ReadFile("/proc/uptime")
		if err != nil {
			return err
		}
		e.Result("uptime_seconds", strings.Fields(string(up))[0])
		e.Result("hugepages_total", hugePagesTotal())
		return nil
	})
}

func hugePagesTotal() string {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return "?"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "HugePages_Total:") {
			return strings.TrimSpace(strings.TrimPrefix(l, "HugePages_Total:"))
		}
	}
	return "?"
}
