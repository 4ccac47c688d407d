package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/pci"
)

// setupGuest prepares what scenarios rely on: hugetlbfs at /dev/hugepages (DMA
// memory), cgroup2 at /sys/fs/cgroup (the SMC option's BPF program attaches
// to a cgroup), extra modules (ism.modules) and eth0 (ism.ip).
func setupGuest(e *Env) error {
	if err := mountHugetlbfs(); err != nil {
		// Not fatal: only DMA scenarios need it, and they will say so.
		e.Logf("hugetlbfs: %v", err)
	}
	if err := mountCgroup2(); err != nil {
		// Not fatal either: smcd then negotiates in band, and says so.
		e.Logf("cgroup2: %v", err)
	}
	if m := e.Arg("modules", ""); m != "" {
		for _, name := range strings.Split(m, ",") {
			if err := loadModule(name); err != nil {
				return err
			}
		}
	}
	if ip := e.Arg("ip", ""); ip != "" {
		if err := setupNet(e, e.Arg("dev", "eth0"), ip); err != nil {
			return fmt.Errorf("network: %w", err)
		}
	}
	return nil
}

// HugetlbfsDir is where setupGuest mounts hugetlbfs (when the kernel has it).
const HugetlbfsDir = "/dev/hugepages"

// Cgroup2Dir is where setupGuest mounts the cgroup v2 hierarchy.
const Cgroup2Dir = "/sys/fs/cgroup"

func mountCgroup2() error {
	mounts, _ := os.ReadFile("/proc/mounts")
	if strings.Contains(string(mounts), " cgroup2 ") {
		return nil
	}
	if err := os.MkdirAll(Cgroup2Dir, 0o755); err != nil {
		return err
	}
	return unix.Mount("cgroup2", Cgroup2Dir, "cgroup2", 0, "")
}

func mountHugetlbfs() error {
	fs, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return err
	}
	if !strings.Contains(string(fs), "hugetlbfs") {
		return errors.New("kernel has no hugetlbfs")
	}
	mounts, _ := os.ReadFile("/proc/mounts")
	if strings.Contains(string(mounts), " "+HugetlbfsDir+" hugetlbfs ") {
		return nil
	}
	if err := os.MkdirAll(HugetlbfsDir, 0o755); err != nil {
		return err
	}
	return unix.Mount("hugetlbfs", HugetlbfsDir, "hugetlbfs", 0, "")
}

// loadModule loads a module and its dependencies from /lib/modules/<release>
// (modules.dep, written by scripts/provision-kernel.sh and, for the SMC
// kernel, scripts/build-kmod.sh); one already loaded or built into the
// kernel (modules.builtin: the SMC kernel has its drivers built in) is fine.
// Only uncompressed .ko files: that is what Debian 6.1 ships.
func loadModule(name string) error {
	name = strings.ReplaceAll(strings.TrimSpace(name), "-", "_")
	if name == "" || moduleLoaded(name) {
		return nil
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return err
	}
	dir := "/lib/modules/" + unix.ByteSliceToString(u.Release[:])
	if moduleBuiltin(dir, name) {
		return nil
	}
	dep, err := os.ReadFile(dir + "/modules.dep")
	if err != nil {
		return fmt.Errorf("load module %s: %w", name, err)
	}
	deps := map[string][]string{} // module name -> [its path, dep paths...]
	for _, l := range strings.Split(string(dep), "\n") {
		p, rest, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		deps[modName(p)] = append([]string{p}, strings.Fields(rest)...)
	}
	d, ok := deps[name]
	if !ok {
		return fmt.Errorf("load module %s: not in %s/modules.dep", name, dir)
	}
	// modules.dep lists dependencies so that the last must load first.
	for i := len(d) - 1; i >= 1; i-- {
		if err := loadModule(modName(d[i])); err != nil {
			return err
		}
	}
	f, err := os.Open(dir + "/" + d[0])
	if err != nil {
		return fmt.Errorf("load module %s: %w", name, err)
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", name, err)
	}
	return nil
}

func modName(path string) string {
	b := path[strings.LastIndex(path, "/")+1:]
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

// moduleBuiltin: name is in dir's modules.builtin (paths, one per line).
func moduleBuiltin(dir, name string) bool {
	b, err := os.ReadFile(dir + "/modules.builtin")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if l != "" && modName(l) == name {
			return true
		}
	}
	return false
}

func moduleLoaded(name string) bool {
	b, err := os.ReadFile("/proc/modules")
	if err != nil {
		return false
	}
	n := strings.ReplaceAll(name, "-", "_")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == n {
			return true
		}
	}
	return false
}

// nicDrivers maps the PCI ids of the NICs the VM harness gives guests
// (vmharness.NetEnd.Model) to the driver behind the interface and the
// modules that provide it, in load order.
var nicDrivers = []struct {
	vendor, device uint16
	driver         string
	modules        []string
}{
	// virtio-net-pci: transitional (QEMU's default), and modern-only
	// (disable-legacy=on).
	{0x1af4, 0x1000, "virtio_net", []string{"virtio_pci", "virtio_net"}},
	{0x1af4, 0x1041, "virtio_net", []string{"virtio_pci", "virtio_net"}},
	// QEMU's e1000, an Intel 82540EM.
	{0x8086, 0x100e, "e1000", []string{"e1000"}},
}

// nicModules returns the modules that drive the NICs among the PCI devices
// under root (pci.DefaultSysfsRoot if empty), each once, in load order.
func nicModules(root string) ([]string, error) {
	devs, err := pci.List(root)
	if err != nil {
		return nil, err
	}
	var mods, seen []string
	for _, d := range devs {
		for _, n := range nicDrivers {
			if d.Vendor != n.vendor || d.DeviceID != n.device {
				continue
			}
			for _, m := range n.modules {
				if !slices.Contains(mods, m) {
					mods = append(mods, m)
				}
			}
		}
		seen = append(seen, fmt.Sprintf("%04x:%04x", d.Vendor, d.DeviceID))
	}
	if len(mods) == 0 {
		return nil, fmt.Errorf("no NIC this agent knows among the PCI devices (%s)", strings.Join(seen, " "))
	}
	return mods, nil
}

// setupNet gives dev the address cidr and brings it up. When the interface
// does not exist yet, it loads the driver for the NIC it finds on the PCI
// bus and waits for the interface to appear (bounded only by the
// scenario's time). It reports the interface's driver as "nic".
//
// virtio_pci binds every virtio PCI function it finds, the ISM device
// too. The guest driver takes that back when it opens the device
// (guestdriver/takeover.go). The agent does not keep virtio_pci off the
// device beforehand (driver_override): that path is the one kernels with
// virtio_pci built in (Debian 6.12 and later) always take, so the VM tests
// exercise it on every run instead of never.
func setupNet(e *Env, dev, cidr string) error {
	if _, err := os.Stat("/sys/class/net/" + dev); err != nil {
		mods, err := nicModules("")
		if err != nil {
			return err
		}
		for _, m := range mods {
			if err := loadModule(m); err != nil {
				return err
			}
		}
		start := time.Now()
		if err := waitNetdev(e.Ctx, dev); err != nil {
			return fmt.Errorf("%w after loading %s", err, strings.Join(mods, ", "))
		}
		e.Logf("%s appeared %v after loading %s", dev, time.Since(start).Round(time.Millisecond), strings.Join(mods, ", "))
	}
	drv, err := os.Readlink("/sys/class/net/" + dev + "/device/driver")
	if err != nil {
		return fmt.Errorf("%s: no driver: %w", dev, err)
	}
	e.Result("nic", filepath.Base(drv))
	if err := runCmd("ip", "addr", "add", cidr, "dev", dev); err != nil {
		return err
	}
	if err := runCmd("ip", "link", "set", dev, "up"); err != nil {
		return err
	}
	e.Logf("%s (%s): %s up", dev, filepath.Base(drv), cidr)
	return nil
}

// waitNetdev waits until network interface dev exists, or ctx ends. The
// driver's probe creates it; under TCG on a busy host that takes anything
// from milliseconds to seconds.
func waitNetdev(ctx context.Context, dev string) error {
	for {
		if _, err := os.Stat("/sys/class/net/" + dev); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s did not appear: %w", dev, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// runCmd runs a u-root command (they live in /bbin) and returns its output
// in the error when it fails.
func runCmd(name string, args ...string) error {
	path, err := exec.LookPath(name)
	if err != nil {
		path = "/bbin/" + name
	}
	out, err := exec.Command(path, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// drainConsole waits until the serial console has sent what we wrote, so the
// END marker is not lost to the power-off.
func drainConsole() {
	for _, f := range []*os.File{os.Stdout, os.Stderr} {
		// TCSBRK with a non-zero argument is tcdrain(3); it fails
		// harmlessly on a non-tty.
		_ = unix.IoctlSetInt(int(f.Fd()), unix.TCSBRK, 1)
	}
	syscall.Sync()
	time.Sleep(50 * time.Millisecond)
}
