package main

// Scenarios for the ISM guest driver (package guestdriver) and the pci
// transport under it.
//
//	ism-probe   open the device, report gid/chid/config, register and
//	            unregister a few DMBs (rgid = own GID), QUERY_RGID self.
//	ism-recv    receiver of a two-VM copy-mode transfer (below).
//	ism-send    sender of it.
//	ism-forge   MOVE with a forged token (expect NOENTRY) and into a DMB
//	            whose rgid is another GID (expect PERMISSION).
//	ism-stress  ism.conns goroutines (default 32), each with its own DMB
//	            (rgid = own GID) and buffer, MOVE ism.moves signalled
//	            chunks into it concurrently and check each landed.
//	virtio-rng  drive QEMU's virtio-rng-pci (1af4:1044) with the pci
//	            transport alone: proves rings, DMA addresses and notify.
//
// Two-VM transfer protocol. Both sides know ism.bytes, ism.chunk,
// ism.slots and ism.seed (defaults 1 MiB, 32 KiB, 8, 1). The receiver
// (ism.peer = the sender's GID) registers one DMB of slots*chunk bytes with
// rgid = peer and prints "ISM-RESULT token=0x...". The harness then boots
// the sender with ism.token=<that token>. The sender MOVEs chunk s of the
// seeded byte stream into slot s%slots with DMBE bit s%slots signalled, and
// never has more than `slots` chunks unacknowledged. The receiver consumes
// slots in order as their DMBE bits arrive, checks each byte against the
// stream, and acknowledges with SIGNAL(peer, code 1, info = chunks consumed);
// the sender reads those from its event queue. (The DMB is what lets the
// receiver SIGNAL the sender: the device accepts a SIGNAL only between GIDs
// that share one; an ack refused for the rate limit is sent again.) DMBE bits (one per slot) say
// exactly which slots are complete: the device sets them only after the
// copy. Both print sha256 of the bytes (sent / received) and the harness
// compares them. The sender's GID must be known to the harness before the
// receiver starts: GIDs are stable per VM name (or run ism-probe first).
// With ism.hold=1 the receiver keeps its DMB registered after the transfer
// and prints "ISM-RESULT holding=1" until the host writes the line
// "release" to its control port (ttyS1, vmharness VMConfig.Control), so a
// third VM can probe the DMB while it certainly exists, whichever guest
// boots or finishes first.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/guestdriver"
	"github.com/ism-backend/ism-backend/pci"
	"github.com/ism-backend/ism-backend/virtq"
)

const ackCode = 1 // SIGNAL code of the transfer's acknowledgements

func init() {
	register("ism-probe", ismProbe)
	register("ism-recv", ismRecv)
	register("ism-send", ismSend)
	register("ism-forge", ismForge)
	register("ism-stress", ismStress)
	register("virtio-rng", virtioRNG)
}

// openDriver opens the ISM device with the options the kernel command line
// gives: ism.wait=auto|poll|interrupts (default auto: interrupts through
// uio_pci_generic, which it loads), ism.pci, ism.hugepages, ism.event_idx.
func openDriver(e *Env) (*guestdriver.Driver, error) {
	return openDriverWait(e, e.Arg("wait", "auto"))
}

// openDriverWait is openDriver with the wait mode given.
func openDriverWait(e *Env, mode string) (*guestdriver.Driver, error) {
	wait, err := guestdriver.ParseWaitMode(mode)
	if err != nil {
		return nil, err
	}
	if wait != guestdriver.WaitPoll {
		if err := loadModule("uio_pci_generic"); err != nil {
			if wait == guestdriver.WaitInterrupts {
				return nil, err
			}
			e.Logf("no interrupts: %v", err)
		}
	}
	var modes uint16 // 0: whatever the device offers
	if arg := e.Arg("modes", ""); arg != "" {
		if modes, err = abi.ParseModes(arg); err != nil {
			return nil, fmt.Errorf("ism.modes: %w", err)
		}
	}
	d, err := guestdriver.Open(guestdriver.Options{
		Modes:        modes,
		VirtioID:     e.ArgInt("virtio_id", abi.DefaultVirtioID),
		Addr:         e.Arg("pci", ""),
		MaxHugePages: e.ArgInt("hugepages", 8),
		NoEventIdx:   e.Arg("event_idx", "1") == "0",
		Wait:         wait,
		Logf:         e.Logf,
	})
	if err != nil {
		return nil, fmt.Errorf("open ISM device: %w", err)
	}
	return d, nil
}

func argU64(e *Env, key string, def uint64) (uint64, error) {
	s := e.Arg(key, "")
	if s == "" {
		return def, nil
	}
	v, err := strconv.ParseUint(s, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("ism.%s=%q: %w", key, s, err)
	}
	return v, nil
}

// statusName is the ABI's name of a status carried by err ("OK" for nil).
func statusName(err error) string {
	if err == nil {
		return "OK"
	}
	var st abi.Status
	if !errors.As(err, &st) {
		return "ERROR(" + err.Error() + ")"
	}
	names := []string{"OK", "INVALID", "UNSUPPORTED", "NOENTRY", "PERMISSION", "RANGE", "FAULT", "NOSPACE", "BUSY", "NOTREADY", "INTERNAL"}
	if int(st) < len(names) {
		return names[st]
	}
	return fmt.Sprintf("STATUS(%d)", uint32(st))
}

func reportConfig(e *Env, d *guestdriver.Driver) {
	c := d.Config()
	e.Result("pci", d.PCIAddr())
	e.Result("gid", fmt.Sprintf("%#x", d.GID()))
	e.Result("chid", fmt.Sprintf("%#x", d.CHID()))
	e.Result("config", fmt.Sprintf("version=%d modes=%#x max_dmbs=%d max_dmb_size=%d max_move_len=%d shm_size=%d queue_size=%d",
		c.Version, c.Modes, c.MaxDMBs, c.MaxDMBSize, c.MaxMoveLen, c.ShmSize, c.QueueSize))
	e.Result("interrupts", d.Interrupts())
}

func ismProbe(e *Env) error {
	d, err := openDriver(e)
	if err != nil {
		return err
	}
	defer d.Close()
	reportConfig(e, d)
	e.Result("query_self", statusName(d.QueryRGID(d.GID())))
	sizes := []int{4096, 65536, int(min(d.Config().MaxDMBSize, 1<<20))}
	var dmbs []*guestdriver.DMB
	for i, sz := range sizes {
		m, err := d.RegisterDMB(sz, d.GID())
		if err != nil {
			return fmt.Errorf("REGISTER_DMB %d bytes: %w", sz, err)
		}
		e.Result(fmt.Sprintf("dmb%d", i), fmt.Sprintf("size=%d index=%d token=%#x", sz, m.Index(), m.Token()))
		dmbs = append(dmbs, m)
	}
	for _, m := range dmbs {
		if err := d.UnregisterDMB(m); err != nil {
			return fmt.Errorf("UNREGISTER_DMB %#x: %w", m.Token(), err)
		}
	}
	// A dead token must now be refused.
	e.Result("move_dead_token", statusName(d.Move(dmbs[0].Token(), 0, true, 0, nil, 0, 0)))
	e.Result("unregistered", len(dmbs))

	// Close resets the device; a second Open must bring it up again (the
	// backend restarts it on the next DRIVER_OK), with fresh tokens.
	if err := d.Close(); err != nil {
		return fmt.Errorf("close: %w", err)
	}
	d2, err := openDriver(e)
	if err != nil {
		return fmt.Errorf("reopen: %w", err)
	}
	defer d2.Close()
	m, err := d2.RegisterDMB(4096, d2.GID())
	if err != nil {
		return fmt.Errorf("REGISTER_DMB after reopen: %w", err)
	}
	e.Result("reopen", fmt.Sprintf("index=%d token=%#x", m.Index(), m.Token()))
	return d2.UnregisterDMB(m)
}

// xfer is the shape of a transfer, the same on both sides.
type xfer struct {
	bytes, chunk, slots int
	seed                uint64
}

func xferArgs(e *Env, d *guestdriver.Driver) (xfer, error) {
	x := xfer{bytes: e.ArgInt("bytes", 1<<20), chunk: e.ArgInt("chunk", 32<<10), slots: e.ArgInt("slots", 8)}
	seed, err := argU64(e, "seed", 1)
	if err != nil {
		return x, err
	}
	x.seed = seed
	c := d.Config()
	switch {
	case x.bytes <= 0 || x.chunk <= 0 || x.slots <= 0 || x.slots > abi.MaxDMBEs:
		return x, fmt.Errorf("bad transfer shape %+v (slots at most %d)", x, abi.MaxDMBEs)
	case uint64(x.chunk) > uint64(c.MaxMoveLen):
		return x, fmt.Errorf("ism.chunk=%d over the device's max_move_len %d", x.chunk, c.MaxMoveLen)
	case uint64(x.chunk)*uint64(x.slots) > uint64(c.MaxDMBSize):
		return x, fmt.Errorf("slots*chunk = %d over the device's max_dmb_size %d", x.chunk*x.slots, c.MaxDMBSize)
	}
	return x, nil
}

func (x xfer) chunks() int { return (x.bytes + x.chunk - 1) / x.chunk }

func (x xfer) chunkLen(s int) int { return min(x.chunk, x.bytes-s*x.chunk) }

// fill writes the seeded stream's bytes [off, off+len(b)) into b: byte p is
// byte p%8 of splitmix64(seed + p/8).
func (x xfer) fill(b []byte, off int) {
	var w uint64
	for i := range b {
		p := off + i
		if i == 0 || p%8 == 0 { // one generator step per 8 bytes: TCG is slow
			w = splitmix64(x.seed + uint64(p/8))
		}
		b[i] = byte(w >> (8 * (p % 8)))
	}
}

func splitmix64(z uint64) uint64 {
	z += 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func ismRecv(e *Env) error {
	d, err := openDriver(e)
	if err != nil {
		return err
	}
	defer d.Close()
	peer, err := argU64(e, "peer", 0)
	if err != nil || peer == 0 {
		return fmt.Errorf("ism.peer (the sender's GID) is required: %v", err)
	}
	x, err := xferArgs(e, d)
	if err != nil {
		return err
	}
	var ctl *hostControl
	if e.Arg("hold", "0") == "1" {
		// Opened before the token is printed: the host may send
		// "release" any time after it has seen the token.
		if ctl, err = openHostControl(); err != nil {
			return err
		}
		defer ctl.Close()
	}
	reportConfig(e, d)
	m, err := d.RegisterDMB(x.slots*x.chunk, peer)
	if err != nil {
		return fmt.Errorf("REGISTER_DMB: %w", err)
	}
	e.Result("token", fmt.Sprintf("%#x", m.Token()))
	h := sha256.New()
	want := make([]byte, x.chunk)
	var got uint32
	next, n := 0, x.chunks()
	var start time.Time
	for next < n {
		select {
		case <-m.Signalled():
		case <-e.Ctx.Done():
			return fmt.Errorf("receiver: %d of %d chunks after the time limit", next, n)
		}
		if start.IsZero() {
			start = time.Now()
		}
		got |= m.TakeDMBEs()
		done := next
		for next < n && got&(1<<(next%x.slots)) != 0 {
			got &^= 1 << (next % x.slots)
			l := x.chunkLen(next)
			slot := m.Bytes()[(next%x.slots)*x.chunk:][:l]
			x.fill(want[:l], next*x.chunk)
			for i := range slot {
				if slot[i] != want[i] {
					return fmt.Errorf("chunk %d byte %d: got %#x, want %#x", next, i, slot[i], want[i])
				}
			}
			h.Write(slot)
			next++
		}
		if next > done {
			if err := signalRetry(e.Ctx, d, peer, ackCode, uint64(next)); err != nil {
				return fmt.Errorf("ack %d: %w", next, err)
			}
		}
	}
	el := time.Since(start)
	e.Result("bytes", x.bytes)
	e.Result("sha256", hex.EncodeToString(h.Sum(nil)))
	e.Result("elapsed", el)
	if ctl != nil {
		e.Result("holding", 1)
		if err := ctl.WaitLine(e.Ctx, "release"); err != nil {
			return fmt.Errorf("holding the DMB for the host: %w", err)
		}
	}
	if err := d.UnregisterDMB(m); err != nil {
		return fmt.Errorf("UNREGISTER_DMB: %w", err)
	}
	return nil
}

// signalRetry sends a SIGNAL, again while the backend refuses it for its
// rate limit (BUSY) or for the peer's full event queue (NOSPACE): an ack
// must not be lost, or the sender waits for ever.
func signalRetry(ctx context.Context, d *guestdriver.Driver, rgid uint64, code uint16, info uint64) error {
	for {
		err := d.Signal(rgid, code, info)
		if !errors.Is(err, abi.StatusBusy) && !errors.Is(err, abi.StatusNoSpace) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Millisecond):
		}
	}
}

// hostControl is the line channel from the host test into this guest: the
// second serial port, on a socket the harness writes (VMConfig.Control).
type hostControl struct {
	f *os.File
	r *bufio.Reader
}

const hostControlTTY = "/dev/ttyS1"

// openHostControl opens the control port in raw mode. Open it before
// telling the host you listen: opening resets the UART's FIFO.
func openHostControl() (*hostControl, error) {
	// O_NONBLOCK: do not wait for a carrier that a socket-backed port
	// may never raise; Go's poller makes reads block anyway.
	f, err := os.OpenFile(hostControlTTY, os.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("host control port: %w", err)
	}
	fd := int(f.Fd())
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("host control port: %w", err)
	}
	// Raw bytes: no echo back to the host, no CR/NL rewriting, no
	// signals; CLOCAL so the missing modem lines do not matter.
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag = t.Cflag&^(unix.CSIZE|unix.PARENB) | unix.CS8 | unix.CLOCAL | unix.CREAD
	t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
		f.Close()
		return nil, fmt.Errorf("host control port: %w", err)
	}
	return &hostControl{f: f, r: bufio.NewReader(f)}, nil
}

// WaitLine reads lines from the host until one is want (others are
// skipped) or ctx ends.
func (h *hostControl) WaitLine(ctx context.Context, want string) error {
	got := make(chan error, 1)
	go func() {
		for {
			l, err := h.r.ReadString('\n')
			if strings.TrimSpace(l) == want {
				got <- nil
				return
			}
			if err != nil {
				got <- err
				return
			}
		}
	}()
	select {
	case err := <-got:
		if err != nil {
			return fmt.Errorf("host control port: %w before %q", err, want)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("host never sent %q on %s: %w", want, hostControlTTY, ctx.Err())
	}
}

func (h *hostControl) Close() error { return h.f.Close() }

func ismSend(e *Env) error {
	d, err := openDriver(e)
	if err != nil {
		return err
	}
	defer d.Close()
	token, err := argU64(e, "token", 0)
	if err != nil || token == 0 {
		return fmt.Errorf("ism.token (the receiver's DMB token) is required: %v", err)
	}
	peer, err := argU64(e, "peer", 0) // optional: the receiver's GID, to check acks
	if err != nil {
		return err
	}
	x, err := xferArgs(e, d)
	if err != nil {
		return err
	}
	reportConfig(e, d)
	buf, err := d.AllocBuffer(x.chunk)
	if err != nil {
		return err
	}
	defer buf.Free()
	h := sha256.New()
	acked, n := 0, x.chunks()
	waitAck := func(until int) error {
		for acked < until {
			select {
			case ev, ok := <-d.Events():
				if !ok {
					return errors.New("event channel closed")
				}
				switch {
				case ev.Type == abi.EventSWR && ev.Code == ackCode && (peer == 0 || ev.GID == peer):
					if a := int(ev.Info); a > acked && a <= n {
						acked = a
					}
				case ev.Type == abi.EventDMB && ev.Token == token, ev.Type == abi.EventGID && (peer == 0 || ev.GID == peer):
					return fmt.Errorf("receiver went away: event %+v", ev)
				default:
					e.Logf("event %+v", ev)
				}
			case <-e.Ctx.Done():
				return fmt.Errorf("sender: %d of %d chunks acknowledged after the time limit", acked, n)
			}
		}
		return nil
	}
	start := time.Now()
	progress := false
	for s := 0; s < n; s++ {
		if err := waitAck(s - x.slots + 1); err != nil {
			if e.Arg("expect_gone", "0") == "1" {
				return survivePeerGone(e, d, err)
			}
			return err
		}
		if !progress && acked*x.chunk >= 1<<20 {
			progress = true
			e.Result("acked_1mib", 1) // the harness may now kill the receiver
		}
		l := x.chunkLen(s)
		x.fill(buf.Bytes()[:l], s*x.chunk)
		h.Write(buf.Bytes()[:l])
		if err := d.Move(token, uint32(s%x.slots), true, uint32((s%x.slots)*x.chunk), buf, 0, l); err != nil {
			err = fmt.Errorf("MOVE chunk %d: %s (%w)", s, statusName(err), err)
			if e.Arg("expect_gone", "0") == "1" {
				return survivePeerGone(e, d, err)
			}
			return err
		}
	}
	if err := waitAck(n); err != nil {
		return err
	}
	el := time.Since(start)
	e.Result("bytes", x.bytes)
	e.Result("sha256", hex.EncodeToString(h.Sum(nil)))
	e.Result("elapsed", el)
	if el > 0 {
		e.Result("mbit_per_s", fmt.Sprintf("%.1f", float64(x.bytes)*8/el.Seconds()/1e6))
	}
	return nil
}

// survivePeerGone is the end of a transfer whose receiver was killed
// (ism.expect_gone=1): the sender reports how it learnt, then shows that
// its own device is still served.
func survivePeerGone(e *Env, d *guestdriver.Driver, cause error) error {
	e.Result("peer_gone", cause.Error())
	if err := d.QueryRGID(d.GID()); err != nil {
		return fmt.Errorf("after the peer went away, QUERY_RGID self: %w", err)
	}
	m, err := d.RegisterDMB(4096, d.GID())
	if err != nil {
		return fmt.Errorf("after the peer went away, REGISTER_DMB: %w", err)
	}
	buf, err := d.AllocBuffer(64)
	if err != nil {
		return err
	}
	defer buf.Free()
	copy(buf.Bytes(), "still served")
	if err := d.Move(m.Token(), 0, true, 0, buf, 0, 12); err != nil {
		return fmt.Errorf("after the peer went away, MOVE to self: %w", err)
	}
	if string(m.Bytes()[:12]) != "still served" {
		return errors.New("after the peer went away, a MOVE to self did not land")
	}
	e.Result("still_served", 1)
	return d.UnregisterDMB(m)
}

func ismForge(e *Env) error {
	d, err := openDriver(e)
	if err != nil {
		return err
	}
	defer d.Close()
	reportConfig(e, d)
	buf, err := d.AllocBuffer(64)
	if err != nil {
		return err
	}
	defer buf.Free()
	copy(buf.Bytes(), "forged")

	// A token nobody registered (or ism.token, someone's, altered).
	forged, err := argU64(e, "token", 0)
	if err != nil {
		return err
	}
	forged ^= 0x5a5a_a5a5_0f0f_f0f0
	forgedSt := statusName(d.Move(forged, 0, true, 0, buf, 0, 16))
	e.Result("forged_token_status", forgedSt)
	if real := forged ^ 0x5a5a_a5a5_0f0f_f0f0; real != 0 {
		// The real token of another VM's DMB whose rgid is not ours.
		e.Result("third_gid_status", statusName(d.Move(real, 0, true, 0, buf, 0, 16)))
	}

	// Our own DMB, writable only by another GID: our MOVE must be refused.
	other, err := argU64(e, "other", d.GID()^0x1)
	if err != nil {
		return err
	}
	m, err := d.RegisterDMB(4096, other)
	if err != nil {
		return fmt.Errorf("REGISTER_DMB rgid %#x: %w", other, err)
	}
	permSt := statusName(d.Move(m.Token(), 0, true, 0, buf, 0, 16))
	e.Result("wrong_rgid_status", permSt)
	for i, b := range m.Bytes()[:16] {
		if b != 0 {
			return fmt.Errorf("refused MOVE still wrote byte %d of the DMB", i)
		}
	}
	if err := d.UnregisterDMB(m); err != nil {
		return err
	}
	if forgedSt != "NOENTRY" || permSt != "PERMISSION" {
		return fmt.Errorf("forged token gave %s (want NOENTRY), wrong rgid gave %s (want PERMISSION)", forgedSt, permSt)
	}
	return nil
}

// virtioRNG reads entropy from QEMU's virtio-rng-pci with the transport
// alone: one queue, one device-writable buffer per request.
func virtioRNG(e *Env) error {
	devs, err := pci.Find("", pci.VirtioVendor, pci.VirtioDeviceBase+4)
	if err != nil {
		// QEMU's default is a transitional device (1af4:1005), which has
		// the modern capabilities too.
		if devs, err = pci.Find("", pci.VirtioVendor, 0x1005); err != nil {
			return err
		}
	}
	v, err := pci.OpenVirtio(devs[0])
	if err != nil {
		return err
	}
	defer v.Close()
	defer v.Reset(time.Second)
	features, err := v.Start(1<<pci.FeatureRingEventIdx, 0)
	if err != nil {
		return err
	}
	e.Result("pci", devs[0].Addr)
	e.Result("offered_features", fmt.Sprintf("%#x", features))
	e.Result("features", fmt.Sprintf("%#x", v.Features()))
	alloc := pci.NewHugeAllocator(1)
	defer alloc.Close()
	q, err := v.SetupQueue(0, 8, alloc)
	if err != nil {
		return err
	}
	v.DriverOK()
	buf, err := alloc.Alloc(4096, 64)
	if err != nil {
		return err
	}
	e.Result("buf_gpa", fmt.Sprintf("%#x", buf.GPA()))
	total := 0
	rounds := e.ArgInt("rounds", 20)
	for r := 0; r < rounds; r++ {
		// Several chains in flight at once, into distinct 64-byte pieces.
		var heads []uint16
		for k := 0; k < 4; k++ {
			h, err := q.Add(nil, []virtq.Seg{pci.SegOf(buf, 64*(4*(r%16)+k), 64)})
			if err != nil {
				return err
			}
			heads = append(heads, h)
		}
		q.Kick()
		deadline := time.Now().Add(5 * time.Second)
		for got := 0; got < len(heads); {
			_, n, ok, err := q.Poll()
			if err != nil {
				return err
			}
			if !ok {
				if time.Now().After(deadline) {
					return fmt.Errorf("round %d: device did not answer (status %#x)", r, v.Status())
				}
				time.Sleep(100 * time.Microsecond)
				continue
			}
			got++
			total += int(n)
		}
	}
	e.Result("rng_bytes", total)
	e.Result("sample", hex.EncodeToString(buf.Bytes()[:32]))
	zero := true
	for _, b := range buf.Bytes()[:64] {
		zero = zero && b == 0
	}
	if total == 0 || zero {
		return errors.New("no entropy came back")
	}
	return nil
}

func ismStress(e *Env) error {
	d, err := openDriver(e)
	if err != nil {
		return err
	}
	defer d.Close()
	reportConfig(e, d)
	conns, moves, size := e.ArgInt("conns", 32), e.ArgInt("moves", 50), e.ArgInt("size", 4096)
	if conns <= 0 || moves <= 0 || size < 8 || size > int(d.Config().MaxMoveLen) {
		return fmt.Errorf("bad ism.conns=%d ism.moves=%d ism.size=%d", conns, moves, size)
	}
	start := time.Now()
	errs := make(chan error, conns)
	for c := 0; c < conns; c++ {
		go func() {
			errs <- func() error {
				m, err := d.RegisterDMB(2*size, d.GID())
				if err != nil {
					return fmt.Errorf("conn %d: REGISTER_DMB: %w", c, err)
				}
				buf, err := d.AllocBuffer(size)
				if err != nil {
					return err
				}
				defer buf.Free()
				for i := 0; i < moves; i++ {
					x := xfer{seed: uint64(c)<<32 | uint64(i)}
					x.fill(buf.Bytes(), 0)
					off := (i % 2) * size
					if err := d.Move(m.Token(), uint32(i%abi.MaxDMBEs), true, uint32(off), buf, 0, size); err != nil {
						return fmt.Errorf("conn %d move %d: %s (%w)", c, i, statusName(err), err)
					}
					select {
					case <-m.Signalled():
					case <-e.Ctx.Done():
						return fmt.Errorf("conn %d move %d: no signal", c, i)
					}
					if bits := m.TakeDMBEs(); bits&(1<<(i%abi.MaxDMBEs)) == 0 {
						return fmt.Errorf("conn %d move %d: DMBE bits %#x", c, i, bits)
					}
					got := m.Bytes()[off : off+size]
					for j := range got {
						if got[j] != buf.Bytes()[j] {
							return fmt.Errorf("conn %d move %d: byte %d differs", c, i, j)
						}
					}
				}
				return d.UnregisterDMB(m)
			}()
		}()
	}
	var first error
	for c := 0; c < conns; c++ {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	el := time.Since(start)
	e.Result("moves", conns*moves)
	e.Result("elapsed", el)
	e.Result("moves_per_s", fmt.Sprintf("%.0f", float64(conns*moves)/el.Seconds()))
	e.Result("waits_by", map[bool]string{true: "interrupts", false: "polling"}[d.Interrupts()])
	return first
}
