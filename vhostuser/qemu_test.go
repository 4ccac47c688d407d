package vhostuser_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/vhostuser"
	"github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
	"github.com/ism-backend/ism-backend/virtq"
	"golang.org/x/sys/unix"
)

// TestRealQEMU runs the library against a real QEMU 11 with the qtest
// accelerator: the test plays the guest driver through qtest (PCI config,
// virtio-pci common config, rings written into guest RAM), so QEMU's own
// vhost-user front-end sends what it sends for a real guest: the realize
// handshake, SET_MEM_TABLE and ring setup at DRIVER_OK, kicks through
// ioeventfd, and SHMEM_MAP into the shared-memory BAR. QEMU comes from
// $QEMU or the provisioned $ISM_CACHE/qemu (default ../.cache/qemu); without
// it, or without its qtest accelerator, the test is skipped.
func TestRealQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	qemu := os.Getenv("QEMU")
	if qemu == "" {
		cache := os.Getenv("ISM_CACHE") // the Makefile's provisioning cache
		if cache == "" {
			cache = "../.cache"
		}
		qemu = filepath.Join(cache, "qemu/qemu-system-x86_64")
	}
	if _, err := os.Stat(qemu); err != nil {
		t.Skipf("no QEMU (%v): run scripts/provision-qemu.sh or set QEMU", err)
	}
	dir := t.TempDir()
	e := newEnv(t)
	const shmSize = 16 << 20
	vmSock := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{shmem: []uint64{shmSize}} })

	qtPath := filepath.Join(dir, "qtest.sock")
	qln, err := net.ListenUnix("unix", &net.UnixAddr{Name: qtPath, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer qln.Close()
	cmd := exec.Command(qemu, "-machine", "q35,memory-backend=mem", "-accel", "qtest", "-m", "256",
		"-object", "memory-backend-memfd,id=mem,size=256M,share=on",
		"-nodefaults", "-display", "none", "-qtest", "unix:"+qtPath,
		"-chardev", "socket,id=c0,path="+vmSock,
		"-device", "vhost-user-test-device-pci,chardev=c0,virtio-id=38,num_vqs=2,config_size=64")
	// The provisioned private root keeps its modules (accel-qtest.so)
	// where its QEMU does not look by default.
	if mod := filepath.Join(filepath.Dir(qemu), "root/usr/lib/x86_64-linux-gnu/qemu"); os.Getenv("QEMU_MODULE_DIR") == "" {
		if _, err := os.Stat(mod); err == nil {
			abs, _ := filepath.Abs(mod)
			cmd.Env = append(os.Environ(), "QEMU_MODULE_DIR="+abs)
		}
	}
	var qout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qout, &qout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("QEMU output:\n%s", qout.String())
		}
	}()
	var qc net.Conn
	for deadline := time.Now().Add(vhostusertest.Timeout); qc == nil; {
		qln.SetDeadline(time.Now().Add(100 * time.Millisecond))
		qc, err = qln.Accept()
		select {
		case <-exited:
			if strings.Contains(qout.String(), "invalid accelerator qtest") {
				t.Skip("this QEMU has no qtest accelerator")
			}
			t.Fatal("QEMU exited")
		default:
		}
		if qc == nil && time.Now().After(deadline) {
			t.Fatal("QEMU did not connect to qtest:", err)
		}
	}
	defer qc.Close()
	qt := &qtest{t: t, c: qc, r: bufio.NewReader(qc)}

	// Find the device on bus 0.
	slot := -1
	for dev := 0; dev < 32; dev++ {
		if qt.cfgRead(dev, 0) == 0x10661af4 {
			slot = dev
			break
		}
	}
	if slot < 0 {
		t.Fatal("virtio device 1af4:1066 not found")
	}
	// Place the BARs: 2 (virtio structures) and 4 (shared memory, 64-bit).
	bars := map[int]uint64{2: 0xc0000000, 4: 0xd0000000}
	for bar, addr := range bars {
		off := 0x10 + 4*bar
		v := qt.cfgRead(slot, off)
		qt.cfgWrite(slot, off, uint32(addr))
		if v&6 == 4 {
			qt.cfgWrite(slot, off+4, uint32(addr>>32))
		}
	}
	qt.cfgWrite(slot, 4, qt.cfgRead(slot, 4)|0x6) // memory space + bus master

	// Walk the vendor capabilities.
	type capability struct {
		bar         int
		id          uint8
		offset, len uint64
		notifyMult  uint32
		present     bool
	}
	caps := map[uint8]*capability{}
	for p := qt.cfgRead(slot, 0x34) & 0xff; p != 0; {
		w := qt.cfgRead(slot, int(p))
		next := (w >> 8) & 0xff
		if w&0xff == 0x09 {
			typ := uint8(w >> 24)
			w1 := qt.cfgRead(slot, int(p)+4)
			c := &capability{bar: int(w1 & 0xff), id: uint8(w1 >> 8), present: true,
				offset: uint64(qt.cfgRead(slot, int(p)+8)), len: uint64(qt.cfgRead(slot, int(p)+12))}
			if typ == 2 {
				c.notifyMult = qt.cfgRead(slot, int(p)+16)
			}
			if typ == 8 {
				c.offset |= uint64(qt.cfgRead(slot, int(p)+16)) << 32
				c.len |= uint64(qt.cfgRead(slot, int(p)+20)) << 32
			}
			if caps[typ] == nil {
				caps[typ] = c
			}
		}
		p = next
	}
	for _, typ := range []uint8{1, 2, 4, 8} {
		if caps[typ] == nil {
			t.Fatalf("virtio capability %d missing (have %v)", typ, caps)
		}
	}
	if caps[8].len != shmSize {
		t.Fatalf("shared-memory region of %#x bytes, want %#x", caps[8].len, shmSize)
	}
	addr := func(c *capability) uint64 { return bars[c.bar] + c.offset }
	common, notify, devcfg, shm := addr(caps[1]), addr(caps[2]), addr(caps[4]), addr(caps[8])

	// Device config comes from the backend through GET_CONFIG.
	if v := qt.read("readl", devcfg+4); v != 0x07060504 {
		t.Errorf("device config word at 4: %#x", v)
	}

	// Driver init: features (VERSION_1 only), one queue, DRIVER_OK.
	qt.write("writeb", common+20, 0)
	qt.write("writeb", common+20, vhostuser.StatusAcknowledge|vhostuser.StatusDriver)
	qt.write("writel", common+8, 1)
	qt.write("writel", common+12, 1) // VERSION_1 (bit 32)
	qt.write("writel", common+8, 0)
	qt.write("writel", common+12, 0)
	qt.write("writeb", common+20, vhostuser.StatusAcknowledge|vhostuser.StatusDriver|vhostuser.StatusFeaturesOK)
	if qt.read("readb", common+20)&vhostuser.StatusFeaturesOK == 0 {
		t.Fatal("FEATURES_OK not accepted")
	}
	const qsize, desc, avail, used, reqBuf, respBuf = 16, 0x100000, 0x101000, 0x102000, 0x103000, 0x104000
	qt.write("writew", common+22, 0)
	qt.write("writew", common+24, qsize)
	qt.write("writeq", common+32, desc)
	qt.write("writeq", common+40, avail)
	qt.write("writeq", common+48, used)
	notifyOff := qt.read("readw", common+30)
	qt.write("writew", common+28, 1)
	qt.write("writeb", common+20, vhostuser.StatusAcknowledge|vhostuser.StatusDriver|vhostuser.StatusFeaturesOK|vhostuser.StatusDriverOK)

	dev := e.srv.Guest("vm")
	if dev == nil || !dev.Started() {
		t.Fatal("device not started after DRIVER_OK")
	}

	// One request through the ring, kicked through QEMU's ioeventfd.
	payload := make([]byte, 64)
	for i := range payload {
		payload[i] = byte(0xa0 + i)
	}
	qt.mem(reqBuf, payload)
	table := make([]byte, 32)
	_ = virtq.EncodeDescs(table, []virtq.Desc{{Addr: reqBuf, Len: 64, Next: 1}, {Addr: respBuf, Len: 64, Write: true, Next: -1}})
	qt.mem(desc, table)
	qt.mem(avail, []byte{0, 0, 1, 0, 0, 0})
	qt.write("writew", notify+notifyOff*uint64(caps[2].notifyMult), 0)
	deadline := time.Now().Add(vhostusertest.Timeout)
	for qt.read("readw", used+2) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("request not completed")
		}
		time.Sleep(time.Millisecond)
	}
	if n := qt.read("readl", used+8); n != 64 {
		t.Errorf("used length %d", n)
	}
	if got := qt.readMem(respBuf, 64); !bytes.Equal(got, payload) {
		t.Errorf("echo: % x", got[:8])
	}

	// Attach: map a memfd into the shared-memory BAR; QEMU sends a new
	// memory table before it answers.
	memfd, err := unix.MemfdCreate("dmb", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(memfd)
	unix.Ftruncate(memfd, 1<<16)
	host, err := unix.Mmap(memfd, 0, 1<<16, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(host)
	copy(host, "attached DMB")
	before := dev.Stats().Messages
	if err := dev.ShmemMap(0, memfd, 0, 1<<20, 1<<16, true); err != nil {
		t.Fatal("SHMEM_MAP:", err)
	}
	if got := qt.readMem(shm+1<<20, 12); string(got) != "attached DMB" {
		t.Errorf("guest view of the mapped DMB: %q", got)
	}
	qt.mem(shm+1<<20+100, []byte("guest wrote"))
	if string(host[100:111]) != "guest wrote" {
		t.Errorf("host view after the guest wrote: %q", host[100:111])
	}
	t.Logf("front-end messages during SHMEM_MAP: %d", dev.Stats().Messages-before)
	if err := dev.ShmemUnmap(0, 1<<20, 1<<16); err != nil {
		t.Fatal("SHMEM_UNMAP:", err)
	}

	// The ring still works after the memory table changed twice.
	qt.mem(avail, []byte{0, 0, 2, 0, 0, 0, 0, 0})
	qt.write("writew", notify+notifyOff*uint64(caps[2].notifyMult), 0)
	for qt.read("readw", used+2) != 2 {
		if time.Now().After(deadline) {
			t.Fatal("second request not completed")
		}
		time.Sleep(time.Millisecond)
	}
	if s := dev.Stats(); s.BadMessages != 0 || s.BadChains != 0 {
		t.Errorf("stats %+v", s)
	}

	// Guest reset: the device stops; a map is refused.
	qt.write("writeb", common+20, 0)
	if dev.Started() {
		t.Error("device still started after the guest reset")
	}
	if err := dev.ShmemMap(0, memfd, 0, 0, 4096, true); err == nil {
		t.Error("SHMEM_MAP after reset accepted")
	}
}

// qtest speaks QEMU's qtest line protocol.
type qtest struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func (q *qtest) cmd(format string, a ...any) string {
	q.t.Helper()
	q.c.SetDeadline(time.Now().Add(vhostusertest.Timeout))
	if _, err := fmt.Fprintf(q.c, format+"\n", a...); err != nil {
		q.t.Fatal(err)
	}
	for {
		line, err := q.r.ReadString('\n')
		if err != nil {
			q.t.Fatalf("qtest %q: %v", fmt.Sprintf(format, a...), err)
		}
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "IRQ") {
			continue
		}
		if !strings.HasPrefix(line, "OK") {
			q.t.Fatalf("qtest %q: %s", fmt.Sprintf(format, a...), line)
		}
		return strings.TrimSpace(strings.TrimPrefix(line, "OK"))
	}
}

func (q *qtest) read(op string, addr uint64) uint64 {
	q.t.Helper()
	v, err := strconv.ParseUint(q.cmd("%s %#x", op, addr), 0, 64)
	if err != nil {
		q.t.Fatal(err)
	}
	return v
}

func (q *qtest) write(op string, addr, v uint64) { q.t.Helper(); q.cmd("%s %#x %#x", op, addr, v) }

func (q *qtest) mem(addr uint64, b []byte) {
	q.t.Helper()
	q.cmd("write %#x %#x 0x%s", addr, len(b), hex.EncodeToString(b))
}

func (q *qtest) readMem(addr uint64, n int) []byte {
	q.t.Helper()
	s := strings.TrimPrefix(q.cmd("read %#x %#x", addr, n), "0x")
	b, err := hex.DecodeString(s)
	if err != nil {
		q.t.Fatal(err)
	}
	return b
}

func (q *qtest) cfgRead(dev, off int) uint32 {
	q.t.Helper()
	q.cmd("outl 0xcf8 %#x", 0x80000000|dev<<11|off&^3)
	v, err := strconv.ParseUint(q.cmd("inl 0xcfc"), 0, 32)
	if err != nil {
		q.t.Fatal(err)
	}
	return uint32(v)
}

func (q *qtest) cfgWrite(dev, off int, v uint32) {
	q.t.Helper()
	q.cmd("outl 0xcf8 %#x", 0x80000000|dev<<11|off&^3)
	q.cmd("outl 0xcfc %#x", v)
}
