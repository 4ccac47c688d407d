// Package virtqtest plays the device side of a split ring (virtio 1.2
// §2.7) for tests of drivers: virtq's own, pci's and guestdriver's. It
// reaches the ring and the buffers only by bus address, as a device does,
// and panics on what a well-behaved driver never makes.
package virtqtest

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/ism-backend/ism-backend/virtq"
)

// Device is the device side of one split ring.
type Device struct {
	At                func(addr uint64, n uint32) []byte // the memory at a bus address, nil outside it
	Desc, Avail, Used uint64                             // the areas' bus addresses
	Size              uint16
	LastAvail         uint16 // avail entries taken
	UsedIdx           uint16 // used idx published
}

// New is the device side of r, with memory at.
func New(r *virtq.Ring, at func(addr uint64, n uint32) []byte) *Device {
	return &Device{At: at, Desc: r.DescAddr(), Avail: r.DriverAddr(), Used: r.DeviceAddr(), Size: r.Size()}
}

// Chain is one available chain as the device walked it.
type Chain struct {
	Head uint16
	In   []byte   // readable bytes, concatenated
	Outs [][]byte // writable buffers
}

// Mem is the memory at [addr, addr+n); it panics outside memory.
func (d *Device) Mem(addr uint64, n uint32) []byte {
	b := d.At(addr, n)
	if b == nil {
		panic(fmt.Sprintf("virtqtest: %#x+%d outside memory", addr, n))
	}
	return b
}

func (d *Device) word(addr uint64) *uint32 { return (*uint32)(unsafe.Pointer(&d.Mem(addr, 4)[0])) }

// AvailIdx, AvailFlags and UsedEvent read what the driver published.
func (d *Device) AvailIdx() uint16   { return uint16(atomic.LoadUint32(d.word(d.Avail)) >> 16) }
func (d *Device) AvailFlags() uint16 { return uint16(atomic.LoadUint32(d.word(d.Avail))) }
func (d *Device) UsedEvent() uint16 {
	return uint16(atomic.LoadUint32(d.word(d.Avail + 4 + 2*uint64(d.Size))))
}

// SetUsedFlags writes the used ring's flags (VRING_USED_F_NO_NOTIFY).
func (d *Device) SetUsedFlags(f uint16) {
	w := d.word(d.Used)
	atomic.StoreUint32(w, atomic.LoadUint32(w)&^0xffff|uint32(f))
}

// SetAvailEvent writes avail_event (EVENT_IDX).
func (d *Device) SetAvailEvent(v uint16) {
	atomic.StoreUint32(d.word(d.Used+4+8*uint64(d.Size)), uint32(v))
}

// Next takes the next available chain, following an indirect table.
func (d *Device) Next() (*Chain, bool) {
	if d.AvailIdx() == d.LastAvail {
		return nil, false
	}
	c := &Chain{Head: binary.LittleEndian.Uint16(d.Mem(d.Avail+4+2*uint64(d.LastAvail%d.Size), 2))}
	d.LastAvail++
	d.walk(c, d.Desc, d.Size, c.Head)
	return c, true
}

// walk follows a chain from descriptor i of the table at addr (n entries).
func (d *Device) walk(c *Chain, table uint64, n, i uint16) {
	le := binary.LittleEndian
	for seen := 0; ; seen++ {
		if i >= n || seen > int(n) {
			panic(fmt.Sprintf("virtqtest: bad chain at descriptor %d", i))
		}
		e := d.Mem(table+16*uint64(i), 16)
		addr, l, fl := le.Uint64(e), le.Uint32(e[8:]), le.Uint16(e[12:])
		switch {
		case fl&virtq.DescFIndirect != 0:
			if table != d.Desc || fl&virtq.DescFNext != 0 || l%16 != 0 {
				panic("virtqtest: bad indirect descriptor")
			}
			d.walk(c, addr, uint16(l/16), 0)
			return
		case fl&virtq.DescFWrite != 0:
			c.Outs = append(c.Outs, d.Mem(addr, l))
		case len(c.Outs) > 0:
			panic("virtqtest: readable after writable")
		default:
			c.In = append(c.In, d.Mem(addr, l)...)
		}
		if fl&virtq.DescFNext == 0 {
			return
		}
		i = le.Uint16(e[14:])
	}
}

// Push writes a used element and publishes it.
func (d *Device) Push(id, n uint32) {
	u := d.Mem(d.Used+4+8*uint64(d.UsedIdx%d.Size), 8)
	binary.LittleEndian.PutUint32(u, id)
	binary.LittleEndian.PutUint32(u[4:], n)
	d.SetUsed(d.UsedIdx + 1)
}

// SetUsed publishes used idx idx (ahead of the elements, for hostile tests).
func (d *Device) SetUsed(idx uint16) {
	d.UsedIdx = idx
	w := d.word(d.Used)
	atomic.StoreUint32(w, uint32(idx)<<16|atomic.LoadUint32(w)&0xffff)
}

// Serve consumes every available chain: it fills the writable buffers with
// f(readable bytes), truncated, and pushes the chain with the bytes
// written. It returns the number of chains.
func (d *Device) Serve(f func(in []byte) []byte) int {
	n := 0
	for c, ok := d.Next(); ok; c, ok = d.Next() {
		resp, w := f(c.In), 0
		for _, o := range c.Outs {
			w += copy(o, resp[w:])
		}
		d.Push(uint32(c.Head), uint32(w))
		n++
	}
	return n
}
