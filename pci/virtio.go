package pci

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Virtio-pci modern transport (virtio 1.2 §4.1).

// VirtioVendor is the PCI vendor id of virtio devices; modern device ids are
// VirtioDeviceBase + the virtio device id.
const (
	VirtioVendor     = 0x1af4
	VirtioDeviceBase = 0x1040
)

// Vendor capability cfg_type values.
const (
	CapCommonCfg = 1
	CapNotifyCfg = 2
	CapISRCfg    = 3
	CapDeviceCfg = 4
	CapPCICfg    = 5
	CapSharedMem = 8
)

// Device status bits.
const (
	StatusAcknowledge = 1
	StatusDriver      = 2
	StatusDriverOK    = 4
	StatusFeaturesOK  = 8
	StatusNeedsReset  = 64
	StatusFailed      = 128
)

// Feature bits used here.
const (
	FeatureRingIndirect   = 28
	FeatureRingEventIdx   = 29
	FeatureVersion1       = 32
	FeatureAccessPlatform = 33
)

// Common configuration register offsets.
const (
	commonDFSelect    = 0
	commonDF          = 4
	commonGFSelect    = 8
	commonGF          = 12
	commonMSIX        = 16
	commonNumQueues   = 18
	commonStatus      = 20
	commonCfgGen      = 21
	commonQSelect     = 22
	commonQSize       = 24
	commonQMSIX       = 26
	commonQEnable     = 28
	commonQNotifyOff  = 30
	commonQDesc       = 32
	commonQDriver     = 40
	commonQDevice     = 48
	commonMinLen      = 56
	noVector          = 0xffff
	virtioCapMinLen   = 16
	virtioNotifyCapLn = 20
	virtioCap64Len    = 24
)

// VirtioCap is a decoded virtio vendor capability.
type VirtioCap struct {
	Pos    int // of the capability header in config space
	Type   uint8
	BAR    uint8
	ID     uint8 // shared memory: shmid
	Offset uint64
	Length uint64
	// NotifyMultiplier is set for the notify capability.
	NotifyMultiplier uint32
}

// VirtioCaps decodes the virtio vendor capabilities in cfg. Capabilities too
// short for their type, or naming a BAR > 5, are refused.
func VirtioCaps(cfg []byte) ([]VirtioCap, error) {
	caps, err := Capabilities(cfg)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	var out []VirtioCap
	for _, c := range caps {
		if c.ID != CapIDVendor {
			continue
		}
		if len(c.Data) < virtioCapMinLen {
			return nil, fmt.Errorf("pci: virtio capability at %#x truncated", c.Offset)
		}
		clen := int(c.Data[2])
		if clen < virtioCapMinLen || clen > len(c.Data) {
			return nil, fmt.Errorf("pci: virtio capability at %#x has length %d", c.Offset, clen)
		}
		d := c.Data[:clen]
		v := VirtioCap{Pos: c.Offset, Type: d[3], BAR: d[4], ID: d[5], Offset: uint64(le.Uint32(d[8:])), Length: uint64(le.Uint32(d[12:]))}
		switch v.Type {
		case CapNotifyCfg:
			if clen < virtioNotifyCapLn {
				return nil, fmt.Errorf("pci: notify capability at %#x has length %d", c.Offset, clen)
			}
			v.NotifyMultiplier = le.Uint32(d[16:])
		case CapSharedMem:
			if clen < virtioCap64Len {
				return nil, fmt.Errorf("pci: shared-memory capability at %#x has length %d", c.Offset, clen)
			}
			v.Offset |= uint64(le.Uint32(d[16:])) << 32
			v.Length |= uint64(le.Uint32(d[20:])) << 32
		case CapPCICfg:
			// Access window through config space: not used, and its bar
			// field is not a real mapping.
			out = append(out, v)
			continue
		}
		if v.BAR > 5 {
			// Reserved BAR numbers: the spec says ignore the capability.
			continue
		}
		out = append(out, v)
	}
	return out, nil
}

// SharedMemRegion is one virtio shared-memory region (cfg_type 8).
type SharedMemRegion struct {
	ID     uint8
	BAR    uint8
	Offset uint64
	Length uint64
}

// Virtio is a started-or-startable modern virtio-pci device.
type Virtio struct {
	Dev        *Function
	Caps       []VirtioCap
	bars       [6]*MMIO
	common     *MMIO
	isr        *MMIO
	devcfg     *MMIO // nil if the device has no config
	notify     *MMIO
	notifyMult uint32
	features   uint64
}

// OpenVirtio enables d, turns on bus mastering, maps the BARs its virtio
// capabilities name and checks that each structure lies inside its BAR.
// It does not touch the device status.
func OpenVirtio(d *Function) (*Virtio, error) {
	cfg, err := d.ReadConfig()
	if err != nil {
		return nil, err
	}
	if len(cfg) < 256 {
		return nil, fmt.Errorf("pci: %s: only %d bytes of config space readable (not root?)", d.Addr, len(cfg))
	}
	caps, err := VirtioCaps(cfg)
	if err != nil {
		return nil, fmt.Errorf("pci: %s: %w", d.Addr, err)
	}
	if err := d.Enable(); err != nil {
		return nil, fmt.Errorf("pci: %s: enable: %w", d.Addr, err)
	}
	if err := d.SetBusMaster(); err != nil {
		return nil, err
	}
	v := &Virtio{Dev: d, Caps: caps}
	ok := false
	defer func() {
		if !ok {
			v.Close()
		}
	}()
	// The first capability of each type is the one to use (§4.1.4: the
	// driver should use the first it can).
	window := func(c VirtioCap) (*MMIO, error) {
		if v.bars[c.BAR] == nil {
			m, err := d.MapBAR(int(c.BAR))
			if err != nil {
				return nil, err
			}
			v.bars[c.BAR] = m
		}
		return v.bars[c.BAR].Window(c.Offset, c.Length)
	}
	for _, c := range caps {
		var dst **MMIO
		switch c.Type {
		case CapCommonCfg:
			dst = &v.common
		case CapISRCfg:
			dst = &v.isr
		case CapDeviceCfg:
			dst = &v.devcfg
		case CapNotifyCfg:
			dst = &v.notify
		default:
			continue
		}
		if *dst != nil {
			continue
		}
		w, err := window(c)
		if err != nil {
			return nil, fmt.Errorf("pci: %s: capability type %d: %w", d.Addr, c.Type, err)
		}
		*dst = w
		if c.Type == CapNotifyCfg {
			v.notifyMult = c.NotifyMultiplier
		}
	}
	if v.common == nil || v.notify == nil || v.isr == nil {
		return nil, fmt.Errorf("pci: %s: not a modern virtio device (common, notify or ISR capability missing)", d.Addr)
	}
	if v.common.Len() < commonMinLen {
		return nil, fmt.Errorf("pci: %s: common config is %d bytes", d.Addr, v.common.Len())
	}
	ok = true
	return v, nil
}

// Close unmaps the BARs. It does not reset the device.
func (v *Virtio) Close() error {
	var first error
	for i, m := range v.bars {
		if m != nil {
			if err := m.Unmap(); err != nil && first == nil {
				first = err
			}
			v.bars[i] = nil
		}
	}
	return first
}

// SharedMemRegions lists the shared-memory capabilities, in order.
func (v *Virtio) SharedMemRegions() []SharedMemRegion {
	var out []SharedMemRegion
	for _, c := range v.Caps {
		if c.Type == CapSharedMem {
			out = append(out, SharedMemRegion{ID: c.ID, BAR: c.BAR, Offset: c.Offset, Length: c.Length})
		}
	}
	return out
}

// MapSharedMem maps shared-memory region r.
func (v *Virtio) MapSharedMem(r SharedMemRegion) (*MMIO, error) {
	if r.BAR > 5 {
		return nil, fmt.Errorf("pci: shared memory in BAR %d", r.BAR)
	}
	if v.bars[r.BAR] == nil {
		m, err := v.Dev.MapBAR(int(r.BAR))
		if err != nil {
			return nil, err
		}
		v.bars[r.BAR] = m
	}
	return v.bars[r.BAR].Window(r.Offset, r.Length)
}

// ReadISR reads (and so clears) the ISR status: bit 0 a queue interrupt,
// bit 1 a config change. The read also deasserts the device's INTx line.
func (v *Virtio) ReadISR() uint8 { return v.isr.Read8(0) }

// Status reads device_status.
func (v *Virtio) Status() uint8 { return v.common.Read8(commonStatus) }

// SetStatus writes device_status.
func (v *Virtio) SetStatus(s uint8) { v.common.Write8(commonStatus, s) }

// AddStatus ORs bits into device_status.
func (v *Virtio) AddStatus(s uint8) { v.SetStatus(v.Status() | s) }

// Reset writes 0 and waits until the device reads back 0 (§4.1.4.3.2),
// which also means it no longer touches the rings.
func (v *Virtio) Reset(timeout time.Duration) error {
	v.SetStatus(0)
	deadline := time.Now().Add(timeout)
	for sleep := time.Microsecond; v.Status() != 0; sleep = min(2*sleep, time.Millisecond) {
		if time.Now().After(deadline) {
			return fmt.Errorf("pci: %s: device did not complete reset in %v", v.Dev.Addr, timeout)
		}
		time.Sleep(sleep)
	}
	return nil
}

// DeviceFeatures reads the 64 offered feature bits.
func (v *Virtio) DeviceFeatures() uint64 {
	v.common.Write32(commonDFSelect, 0)
	lo := v.common.Read32(commonDF)
	v.common.Write32(commonDFSelect, 1)
	hi := v.common.Read32(commonDF)
	return uint64(hi)<<32 | uint64(lo)
}

// Features returns the negotiated feature bits.
func (v *Virtio) Features() uint64 { return v.features }

// ErrFeatures means the device did not offer, or refused, what is required.
var ErrFeatures = errors.New("pci: feature negotiation failed")

// Start resets the device and runs the init sequence up to FEATURES_OK
// (§3.1.1): ACKNOWLEDGE, DRIVER, write wanted∩offered, FEATURES_OK, check it
// stuck. required bits must be offered; VERSION_1 is always required.
// On failure the device is left FAILED.
func (v *Virtio) Start(wanted, required uint64) (uint64, error) {
	if err := v.Reset(time.Second); err != nil {
		return 0, err
	}
	v.SetStatus(StatusAcknowledge)
	v.AddStatus(StatusDriver)
	required |= 1 << FeatureVersion1
	offered := v.DeviceFeatures()
	if offered&required != required {
		v.AddStatus(StatusFailed)
		return offered, fmt.Errorf("%w: device offers %#x, lacks required %#x", ErrFeatures, offered, required&^offered)
	}
	f := offered & (wanted | required)
	v.common.Write32(commonGFSelect, 0)
	v.common.Write32(commonGF, uint32(f))
	v.common.Write32(commonGFSelect, 1)
	v.common.Write32(commonGF, uint32(f>>32))
	v.AddStatus(StatusFeaturesOK)
	if v.Status()&StatusFeaturesOK == 0 {
		v.AddStatus(StatusFailed)
		return offered, fmt.Errorf("%w: device refused features %#x", ErrFeatures, f)
	}
	v.features = f
	// This driver polls: no config-change interrupt vector.
	v.common.Write16(commonMSIX, noVector)
	return offered, nil
}

// DriverOK sets DRIVER_OK: the device is live.
func (v *Virtio) DriverOK() { v.AddStatus(StatusDriverOK) }

// NumQueues reads num_queues.
func (v *Virtio) NumQueues() uint16 { return v.common.Read16(commonNumQueues) }

// QueueMaxSize selects queue idx and reads its (maximum) size; 0 means the
// queue does not exist.
func (v *Virtio) QueueMaxSize(idx uint16) uint16 {
	v.common.Write16(commonQSelect, idx)
	return v.common.Read16(commonQSize)
}

// SetupQueue allocates a queue of at most size entries (clamped to the
// device's maximum, rounded down to a power of two) from alloc, programs it
// and enables it. Call between Start and DriverOK.
func (v *Virtio) SetupQueue(idx, size uint16, alloc *Allocator) (*Queue, error) {
	if idx >= v.NumQueues() {
		return nil, fmt.Errorf("pci: %s: queue %d of %d", v.Dev.Addr, idx, v.NumQueues())
	}
	max := v.QueueMaxSize(idx)
	if max == 0 {
		return nil, fmt.Errorf("pci: %s: queue %d not available", v.Dev.Addr, idx)
	}
	if v.common.Read16(commonQEnable) != 0 {
		return nil, fmt.Errorf("pci: %s: queue %d already enabled", v.Dev.Addr, idx)
	}
	if size == 0 || size > max {
		size = max
	}
	for size&(size-1) != 0 {
		size &= size - 1 // largest power of two below
	}
	if size > 32768 {
		size = 32768
	}
	noff := uint64(v.common.Read16(commonQNotifyOff)) * uint64(v.notifyMult)
	if noff > uint64(v.notify.Len()) || uint64(v.notify.Len())-noff < 2 {
		return nil, fmt.Errorf("pci: %s: queue %d notify offset %#x outside the %#x-byte notify region", v.Dev.Addr, idx, noff, v.notify.Len())
	}
	mem, err := alloc.Alloc(QueueMemSize(int(size)), 4096)
	if err != nil {
		return nil, err
	}
	notify := v.notify
	q, err := NewQueue(idx, size, mem, v.features&(1<<FeatureRingEventIdx) != 0, func() { notify.Write16(noff, idx) })
	if err != nil {
		alloc.Free(mem)
		return nil, err
	}
	c := v.common
	c.Write16(commonQSelect, idx)
	c.Write16(commonQSize, size)
	c.Write16(commonQMSIX, noVector)
	write64 := func(off uint64, val uint64) { // two halves: QEMU's common cfg takes at most 4 bytes per access
		c.Write32(off, uint32(val))
		c.Write32(off+4, uint32(val>>32))
	}
	write64(commonQDesc, q.DescAddr())
	write64(commonQDriver, q.DriverAddr())
	write64(commonQDevice, q.DeviceAddr())
	c.Write16(commonQEnable, 1)
	return q, nil
}

// ConfigGeneration reads config_generation.
func (v *Virtio) ConfigGeneration() uint8 { return v.common.Read8(commonCfgGen) }

// ReadDeviceConfig reads the first n bytes of the device config in 4-byte
// accesses (each may be a round trip to a vhost-user backend: read once and
// cache), retrying while config_generation changes under it.
func (v *Virtio) ReadDeviceConfig(n int) ([]byte, error) {
	if v.devcfg == nil {
		return nil, fmt.Errorf("pci: %s: no device config", v.Dev.Addr)
	}
	if n < 0 || n > v.devcfg.Len() {
		return nil, fmt.Errorf("pci: %s: device config is %d bytes, %d asked", v.Dev.Addr, v.devcfg.Len(), n)
	}
	b := make([]byte, (n+3)&^3)
	for try := 0; try < 10; try++ {
		gen := v.ConfigGeneration()
		for off := 0; off < len(b); off += 4 {
			if off+4 <= v.devcfg.Len() {
				binary.LittleEndian.PutUint32(b[off:], v.devcfg.Read32(uint64(off)))
			} else {
				for i := off; i < n; i++ {
					b[i] = v.devcfg.Read8(uint64(i))
				}
			}
		}
		if v.ConfigGeneration() == gen {
			return b[:n], nil
		}
	}
	return nil, fmt.Errorf("pci: %s: device config kept changing while read", v.Dev.Addr)
}

// DeviceConfigLen is the size of the device config window (0 if none).
func (v *Virtio) DeviceConfigLen() int {
	if v.devcfg == nil {
		return 0
	}
	return v.devcfg.Len()
}
