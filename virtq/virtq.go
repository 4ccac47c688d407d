// Package virtq is the driver side of a virtio split virtqueue (virtio 1.2
// §2.7): the descriptor table and the avail ring it writes, the used ring
// it reads. It works on plain byte slices and their bus addresses, so the
// guest driver (pci, over DMA memory) and the test front-end that plays the
// guest (vhostuser/vhostusertest, over memfd guest RAM) share it. It has no
// notion of how the device is notified or how the memory was obtained.
//
// The three areas, as the device sees them:
//
//	desc:  16 bytes per descriptor (addr u64, len u32, flags u16, next u16)
//	avail: flags u16, idx u16, ring[N] u16, used_event u16, 2 bytes pad
//	used:  flags u16, idx u16, ring[N] {id u32, len u32}, avail_event u16, 2 bytes pad
//
// The pads let the u16 words that share a 4-byte word with another field be
// read and written with 32-bit atomics (Go has no 16-bit ones): avail
// flags+idx is one word the driver owns; used flags+idx is one word the
// device owns; used_event and avail_event each sit in a word whose other
// half is padding. Every word has one writer (docs/device-abi.md): the
// driver never read-modify-writes the device's.
package virtq

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// Descriptor and avail ring flags.
const (
	DescFNext     = 1
	DescFWrite    = 2
	DescFIndirect = 4

	AvailFNoInterrupt = 1
)

// DescSize, AvailSize and UsedSize are the bytes the three areas of a ring
// of n entries take (avail and used with their pads).
func DescSize(n int) int  { return 16 * n }
func AvailSize(n int) int { return 4 + 2*n + 4 }
func UsedSize(n int) int  { return 4 + 8*n + 4 }

// Areas is where a ring lives: each area's bytes in this process and its
// bus address (what the device is told: a guest-physical address).
type Areas struct {
	Desc, Avail, Used             []byte
	DescAddr, AvailAddr, UsedAddr uint64
}

// Seg is one buffer of a chain: a bus address and a length.
type Seg struct {
	Addr uint64
	Len  uint32
}

// Used is one used-ring element: the chain's head and the bytes the device
// says it wrote.
type Used struct {
	ID  uint16
	Len uint32
}

// Ring is the driver side of one split virtqueue. It is not safe for
// concurrent use, except that Publish may run beside Take (they share no
// state): the caller serialises the rest.
type Ring struct {
	size uint16
	a    Areas

	availWord      *uint32 // avail flags | idx<<16
	usedEventWord  *uint32
	usedWord       *uint32 // used flags | idx<<16
	availEventWord *uint32

	freeHead    uint16
	numFree     uint16
	availIdx    uint16 // avail idx published last (the driver's copy)
	notifiedIdx uint16 // avail idx at the last notification decision
	lastUsed    uint16
	next        []uint16 // shadow of the descriptors' next links: the device never gets to redirect the free list
	chainLen    []uint16 // per head: descriptors in the chain, 0 if not in flight
	inLen       []uint32 // per head: device-writable bytes in the chain
	pos         []uint16 // AddDescs' scratch: ring index of each given descriptor
	descs       []Desc   // Add's scratch

	fence uint32 // target of the atomic add that orders a store before a load
}

// ErrFull means no descriptors are free for the chain.
var ErrFull = errors.New("virtq: ring full")

// ErrDevice means the device broke the ring protocol; the ring must not be
// used again until the device is reset.
var ErrDevice = errors.New("virtq: device broke the ring protocol")

// New lays a ring of size entries (a power of two, at most 32768) out in a
// and clears it. Avail and Used must be 4-byte aligned in this process (the
// atomics need it) and the bus addresses aligned as the spec asks.
func New(size uint16, a Areas) (*Ring, error) {
	if size == 0 || size&(size-1) != 0 || size > 32768 {
		return nil, fmt.Errorf("virtq: ring size %d is not a power of two <= 32768", size)
	}
	n := int(size)
	if len(a.Desc) < DescSize(n) || len(a.Avail) < AvailSize(n) || len(a.Used) < UsedSize(n) {
		return nil, fmt.Errorf("virtq: areas of %d, %d and %d bytes too small for %d entries", len(a.Desc), len(a.Avail), len(a.Used), n)
	}
	if uintptr(unsafe.Pointer(&a.Avail[0]))%4 != 0 || uintptr(unsafe.Pointer(&a.Used[0]))%4 != 0 ||
		a.DescAddr%16 != 0 || a.AvailAddr%2 != 0 || a.UsedAddr%4 != 0 {
		return nil, fmt.Errorf("virtq: misaligned ring (desc %#x, avail %#x, used %#x)", a.DescAddr, a.AvailAddr, a.UsedAddr)
	}
	a.Desc, a.Avail, a.Used = a.Desc[:DescSize(n)], a.Avail[:AvailSize(n)], a.Used[:UsedSize(n)]
	word := func(b []byte, off int) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
	r := &Ring{
		size: size, a: a,
		availWord: word(a.Avail, 0), usedEventWord: word(a.Avail, 4+2*n),
		usedWord: word(a.Used, 0), availEventWord: word(a.Used, 4+8*n),
		next: make([]uint16, n), chainLen: make([]uint16, n), inLen: make([]uint32, n), pos: make([]uint16, n), descs: make([]Desc, n),
	}
	r.Reset()
	return r, nil
}

// Reset clears the areas and forgets every chain, as a driver does when it
// sets the queue up again after a device reset.
func (r *Ring) Reset() {
	clear(r.a.Desc)
	clear(r.a.Avail)
	clear(r.a.Used)
	r.freeHead, r.numFree, r.availIdx, r.notifiedIdx, r.lastUsed = 0, r.size, 0, 0, 0
	for i := range r.next {
		r.next[i] = uint16((i + 1) % int(r.size))
	}
	clear(r.chainLen)
	clear(r.inLen)
}

// Size is the number of entries.
func (r *Ring) Size() uint16 { return r.size }

// DescAddr, DriverAddr and DeviceAddr are the bus addresses of the
// descriptor table, the avail ring and the used ring.
func (r *Ring) DescAddr() uint64   { return r.a.DescAddr }
func (r *Ring) DriverAddr() uint64 { return r.a.AvailAddr }
func (r *Ring) DeviceAddr() uint64 { return r.a.UsedAddr }

// NumFree is the number of free descriptors.
func (r *Ring) NumFree() int { return int(r.numFree) }

// AvailIdx is the avail idx published last.
func (r *Ring) AvailIdx() uint16 { return r.availIdx }

// LastUsed is the number of used elements taken (it wraps).
func (r *Ring) LastUsed() uint16 { return r.lastUsed }

// Add writes a chain of device-readable out segments followed by
// device-writable in segments into free descriptors and returns its head.
// The chain is not yet available to the device: see Publish.
func (r *Ring) Add(out, in []Seg) (uint16, error) {
	n := len(out) + len(in)
	if n == 0 || n > int(r.size) {
		return 0, fmt.Errorf("virtq: chain of %d descriptors for a ring of %d", n, r.size)
	}
	if n > int(r.numFree) {
		return 0, ErrFull
	}
	// One pass down the free list, whose links double as the chain's
	// (AddDescs does the same in two: this is every request's path).
	head, d := r.freeHead, r.freeHead
	var inBytes uint64
	for i := 0; i < n; i++ {
		s, flags := Seg{}, uint16(0)
		if i < len(out) {
			s = out[i]
		} else {
			s, flags = in[i-len(out)], DescFWrite
			inBytes += uint64(s.Len)
		}
		if i < n-1 {
			flags |= DescFNext
		}
		PutDesc(r.a.Desc, d, s.Addr, s.Len, flags, r.next[d])
		if i < n-1 {
			d = r.next[d]
		}
	}
	r.freeHead = r.next[d]
	r.numFree -= uint16(n)
	r.chainLen[head] = uint16(n)
	r.inLen[head] = uint32(min(inBytes, 1<<32-1))
	return head, nil
}

// AddIndirect writes out and in segments as Add does, but into table (an
// indirect descriptor table of at least 16 bytes per segment, at bus address
// tableAddr), and takes one ring descriptor that points to it
// (VIRTQ_DESC_F_INDIRECT). The caller keeps the table until the chain is
// used.
func (r *Ring) AddIndirect(table []byte, tableAddr uint64, out, in []Seg) (uint16, error) {
	descs, err := r.chain(out, in)
	if err != nil {
		return 0, err
	}
	if err := EncodeDescs(table, descs); err != nil {
		return 0, err
	}
	head, err := r.AddDescs([]Desc{{Addr: tableAddr, Len: uint32(DescSize(len(descs))), Indirect: true, Next: -1}})
	if err == nil {
		var inBytes uint64
		for _, s := range in {
			inBytes += uint64(s.Len)
		}
		r.inLen[head] = uint32(min(inBytes, 1<<32-1)) // what Poll holds the device to
	}
	return head, err
}

// chain lays out and in out as descriptors linked in order, in r's
// scratch. A chain, indirect table included, is at most the ring size
// (virtio 1.2 §2.7.5.3.1).
func (r *Ring) chain(out, in []Seg) ([]Desc, error) {
	n := len(out) + len(in)
	if n == 0 || n > int(r.size) {
		return nil, fmt.Errorf("virtq: chain of %d descriptors for a ring of %d", n, r.size)
	}
	descs := r.descs[:n]
	for i := range descs {
		if i < len(out) {
			descs[i] = Desc{Addr: out[i].Addr, Len: out[i].Len, Next: i + 1}
		} else {
			descs[i] = Desc{Addr: in[i-len(out)].Addr, Len: in[i-len(out)].Len, Write: true, Next: i + 1}
		}
	}
	descs[n-1].Next = -1
	return descs, nil
}

// Desc is one descriptor as AddDescs and EncodeDescs write it. They exist
// for drivers that test how a device copes with what a well-behaved driver
// (Add) never makes: loops, indirect tables, addresses and lengths of any
// value, writable before readable. Nothing in Desc is checked.
type Desc struct {
	Addr     uint64
	Len      uint32
	Write    bool // device-writable (VIRTQ_DESC_F_WRITE)
	Indirect bool // VIRTQ_DESC_F_INDIRECT: Addr and Len are a descriptor table
	// Next is the position, in the same slice, of the descriptor this one
	// links to (VIRTQ_DESC_F_NEXT), or -1 for none. It may point backwards:
	// a loop.
	Next int
}

func (d Desc) flags() uint16 {
	var f uint16
	if d.Write {
		f |= DescFWrite
	}
	if d.Indirect {
		f |= DescFIndirect
	}
	if d.Next >= 0 {
		f |= DescFNext
	}
	return f
}

// PutDesc writes descriptor i of table as given, unchecked (raw tables and
// rings for tests of hostile drivers).
func PutDesc(table []byte, i uint16, addr uint64, length uint32, flags, next uint16) {
	d := table[16*int(i) : 16*int(i)+16]
	le := binary.LittleEndian
	le.PutUint64(d, addr)
	le.PutUint32(d[8:], length)
	le.PutUint16(d[12:], flags)
	le.PutUint16(d[14:], next)
}

// PutDesc writes descriptor i of the ring's table as given, outside the
// free list: the caller picks an index no chain in flight uses, and may
// publish it as a head (a chain the ring does not track: Take reports it,
// Poll calls it the device's error).
func (r *Ring) PutDesc(i uint16, addr uint64, length uint32, flags, next uint16) {
	PutDesc(r.a.Desc, i, addr, length, flags, next)
}

// EncodeDescs writes descs as a descriptor table into b (an indirect
// table: Next is the index in the table itself). b must hold 16 bytes per
// descriptor; a Next outside descs is an error.
func EncodeDescs(b []byte, descs []Desc) error {
	if len(b) < DescSize(len(descs)) {
		return fmt.Errorf("virtq: %d bytes for %d descriptors", len(b), len(descs))
	}
	for i, d := range descs {
		if d.Next >= len(descs) {
			return fmt.Errorf("virtq: descriptor %d links to %d of %d", i, d.Next, len(descs))
		}
		PutDesc(b, uint16(i), d.Addr, d.Len, d.flags(), uint16(max(d.Next, 0)))
	}
	return nil
}

// AddDescs places descs in free descriptors, each linking where its Next
// says, and returns the head, descs[0], for Publish. Poll reports the chain
// back like one from Add: the device should write nothing into a chain it
// refuses, and Poll still holds it to no more than the writable bytes the
// chain claims.
func (r *Ring) AddDescs(descs []Desc) (uint16, error) {
	if len(descs) == 0 || len(descs) > int(r.size) {
		return 0, fmt.Errorf("virtq: chain of %d descriptors for a ring of %d", len(descs), r.size)
	}
	if len(descs) > int(r.numFree) {
		return 0, ErrFull
	}
	// The descriptors taken are the free list's first, in its order, so
	// that release gives back the same ones.
	d := r.freeHead
	var inBytes uint64
	for i, ds := range descs {
		if ds.Next >= len(descs) {
			return 0, fmt.Errorf("virtq: descriptor %d links to %d of %d", i, ds.Next, len(descs))
		}
		if ds.Write {
			inBytes += uint64(ds.Len)
		}
		r.pos[i] = d
		d = r.next[d]
	}
	for i, ds := range descs {
		next := uint16(0)
		if ds.Next >= 0 {
			next = r.pos[ds.Next]
		}
		PutDesc(r.a.Desc, r.pos[i], ds.Addr, ds.Len, ds.flags(), next)
	}
	head := r.pos[0]
	r.freeHead = d
	r.numFree -= uint16(len(descs))
	r.chainLen[head] = uint16(len(descs))
	r.inLen[head] = uint32(min(inBytes, 1<<32-1))
	return head, nil
}

// Publish puts heads in the avail ring, in order, and makes them available
// with one store of avail idx. Heads are not checked (a test may publish
// any).
func (r *Ring) Publish(heads ...uint16) {
	for _, h := range heads {
		binary.LittleEndian.PutUint16(r.a.Avail[4+2*int(r.availIdx&(r.size-1)):], h)
		r.availIdx++
	}
	r.storeAvailIdx(r.availIdx)
}

// storeAvailIdx publishes idx. The ring entries and descriptors are plain
// stores; the atomic store of the idx word orders them before it (and the
// flags half is the driver's own).
func (r *Ring) storeAvailIdx(idx uint16) {
	atomic.StoreUint32(r.availWord, uint32(idx)<<16|atomic.LoadUint32(r.availWord)&0xffff)
}

// CorruptAvailIdx publishes an avail idx delta entries past what the
// driver made available, as a broken or hostile driver might; the driver's
// own copy stays. A device that checks (virtio 1.2 §2.7.13.4.1: the driver
// must not move the idx by more than the queue size) stops using the
// queue; so must the caller, until it has reset the device.
func (r *Ring) CorruptAvailIdx(delta uint16) {
	r.storeAvailIdx(r.availIdx + delta)
	r.notifiedIdx = r.availIdx + delta
}

// NeedNotify reports whether chains were published since the last
// notification decision, and counts them as notified. It ignores the
// device's suppression hints (avail_event, NO_NOTIFY), which the spec
// allows: honouring them is a store-load handshake (see NeedNotifyEvent)
// that a guest under QEMU's TCG with one vCPU cannot fence, so a kick was
// lost now and then (docs/device-abi.md).
func (r *Ring) NeedNotify() bool {
	if r.availIdx == r.notifiedIdx {
		return false
	}
	r.notifiedIdx = r.availIdx
	return true
}

// NeedNotifyEvent reports whether the device asked to be notified of the
// chains published since the last decision (EVENT_IDX avail_event, virtio's
// vring_need_event). The driver stores avail idx and then loads
// avail_event, the device stores avail_event and then loads avail idx;
// each side needs a full fence between the two or both can miss the
// other's store. Only for drivers whose fences are real (not a TCG guest
// with one vCPU).
func (r *Ring) NeedNotifyEvent() bool {
	old := r.notifiedIdx
	r.notifiedIdx = r.availIdx
	atomic.AddUint32(&r.fence, 1) // a full barrier: store avail idx, then load avail_event
	return r.availIdx-r.AvailEvent()-1 < r.availIdx-old
}

// AvailEvent reads avail_event, written by the device (EVENT_IDX).
func (r *Ring) AvailEvent() uint16 { return uint16(atomic.LoadUint32(r.availEventWord)) }

// SetNoInterrupt sets or clears the avail ring's NO_INTERRUPT flag (the
// device's hint without EVENT_IDX).
func (r *Ring) SetNoInterrupt(on bool) {
	var flags uint32
	if on {
		flags = AvailFNoInterrupt
	}
	atomic.StoreUint32(r.availWord, atomic.LoadUint32(r.availWord)&^0xffff|flags)
}

// SetUsedEvent writes used_event (EVENT_IDX): the device notifies once its
// used idx passes v.
func (r *Ring) SetUsedEvent(v uint16) { atomic.StoreUint32(r.usedEventWord, uint32(v)) }

// ArmUsedEvent asks for a notification when the device's used idx reaches
// idx (used_event = idx-1; idx is ahead of LastUsed) and reports whether it
// has reached it already. Only when it returns false may the caller wait
// for the notification: the used_event store is ordered before the used
// idx load, so either the device sees the new used_event when it publishes
// idx or this load sees idx.
func (r *Ring) ArmUsedEvent(idx uint16) bool {
	r.SetUsedEvent(idx - 1)
	atomic.AddUint32(&r.fence, 1) // a full barrier: store used_event, then load used idx
	return r.UsedIdx()-r.lastUsed >= idx-r.lastUsed
}

// UsedIdx reads the device's used idx.
func (r *Ring) UsedIdx() uint16 { return uint16(atomic.LoadUint32(r.usedWord) >> 16) }

// Pending reports whether the device has used chains not yet taken. It
// does not validate; Poll does.
func (r *Ring) Pending() bool { return r.UsedIdx() != r.lastUsed }

// Poll takes the next used chain, ok false if there is none, and gives its
// descriptors back. An error means the device broke the protocol (used idx
// ran ahead of what is in flight, an id that is not an in-flight head, a
// length over the chain's writable bytes); nothing is taken then.
func (r *Ring) Poll() (Used, bool, error) { return r.take(true) }

// Take takes the next used element as the device wrote it, unchecked, for
// drivers that test a device: an id that is an in-flight head gives its
// descriptors back, any other is only reported (the low 16 bits of it).
func (r *Ring) Take() (Used, bool) {
	u, ok, _ := r.take(false)
	return u, ok
}

func (r *Ring) take(check bool) (Used, bool, error) {
	idx := r.UsedIdx() // the atomic load orders the device's element stores before it
	if idx == r.lastUsed {
		return Used{}, false, nil
	}
	// Take reads nothing Publish writes (availIdx): check first.
	if ahead := idx - r.lastUsed; check && (ahead > r.size-r.numFree || ahead > r.availIdx-r.lastUsed) {
		return Used{}, false, fmt.Errorf("%w: used idx %d jumps %d past %d with %d chains available", ErrDevice, idx, ahead, r.lastUsed, r.availIdx-r.lastUsed)
	}
	e := r.a.Used[4+8*int(r.lastUsed&(r.size-1)):]
	id, n := binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])
	inFlight := id < uint32(r.size) && r.chainLen[id] != 0
	if check && !inFlight {
		return Used{}, false, fmt.Errorf("%w: used id %d is not an in-flight chain", ErrDevice, id)
	}
	if check && n > r.inLen[id] {
		return Used{}, false, fmt.Errorf("%w: used length %d exceeds the %d writable bytes of chain %d", ErrDevice, n, r.inLen[id], id)
	}
	r.lastUsed++
	if inFlight {
		r.release(uint16(id))
	}
	return Used{ID: uint16(id), Len: n}, true, nil
}

// release puts a chain's descriptors back on the free list, following the
// shadow links (never the ring memory the device could have scribbled on).
func (r *Ring) release(head uint16) {
	n := r.chainLen[head]
	last := head
	for i := uint16(1); i < n; i++ {
		last = r.next[last]
	}
	r.next[last] = r.freeHead
	r.freeHead = head
	r.numFree += n
	r.chainLen[head] = 0
	r.inLen[head] = 0
}
