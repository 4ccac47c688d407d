package vhostuser

import (
	"encoding/binary"
	"errors"
	"testing"
	"unsafe"
)

// FuzzDecodeFrontend feeds arbitrary bytes and fd counts to the front-end
// message decoder: it must never panic, and whatever it accepts must have
// exactly the layout its request requires.
func FuzzDecodeFrontend(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}, uint8(0))
	f.Add(append([]byte{5, 0, 0, 0, 9, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}, make([]byte, 32)...), uint8(1))
	f.Add([]byte{12, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}, uint8(1))
	f.Add([]byte{24, 0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, uint8(0))
	f.Fuzz(func(t *testing.T, raw []byte, nfds uint8) {
		fds := make([]int, nfds%12)
		for i := range fds {
			fds[i] = -1 // never a real fd: nothing here may be closed
		}
		m, known, err := DecodeFrontend(raw, fds)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error not marked malformed: %v", err)
			}
			return
		}
		if len(raw) != headerSize+len(m.Payload) {
			t.Fatalf("accepted %d bytes with payload %d", len(raw), len(m.Payload))
		}
		if !known {
			return
		}
		s := frontendShapes[m.Request]
		if s.size >= 0 && len(m.Payload) != s.size {
			t.Fatalf("%s accepted with %d bytes", s.name, len(m.Payload))
		}
		switch m.Request {
		case ReqSetMemTable:
			n := int(binary.LittleEndian.Uint32(m.Payload))
			if len(m.FDs) != n || len(m.Payload) != 8+32*n || n > memTableMaxRegions {
				t.Fatalf("SET_MEM_TABLE %d regions, %d fds, %d bytes", n, len(m.FDs), len(m.Payload))
			}
		case ReqGetConfig, ReqSetConfig:
			if int(binary.LittleEndian.Uint32(m.Payload[4:]))+configHdrSize != len(m.Payload) {
				t.Fatal("config size mismatch accepted")
			}
		}
	})
}

// FuzzChainWalk runs the descriptor-chain walker over an arbitrary
// descriptor table, avail ring and guest memory contents (which may hold
// indirect tables). It must never panic, never return a chain longer than
// the bound, and every segment must lie inside guest RAM.
func FuzzChainWalk(f *testing.F) {
	le := binary.LittleEndian
	desc := func(addr uint64, length uint32, flags, next uint16) []byte {
		b := make([]byte, 16)
		le.PutUint64(b, addr)
		le.PutUint32(b[8:], length)
		le.PutUint16(b[12:], flags)
		le.PutUint16(b[14:], next)
		return b
	}
	cat := func(bs ...[]byte) []byte {
		var out []byte
		for _, b := range bs {
			out = append(out, b...)
		}
		return out
	}
	// direct: readable 64 then writable 16
	f.Add(cat(desc(0x1000, 64, descFNext, 1), desc(0x2000, 16, descFWrite, 0)), []byte{0, 0}, []byte{}, true)
	// crossing into region 1
	f.Add(cat(desc(fuzzRegion-8, 64, 0, 0)), []byte{0, 0}, []byte{}, false)
	// indirect table at 0x4000 (the memory blob lands at fuzzBlobGPA)
	f.Add(cat(desc(fuzzBlobGPA, 32, descFIndirect, 0)),
		[]byte{0, 0}, cat(desc(0x1000, 8, descFNext, 1), desc(0x2000, 8, descFWrite, 0)), true)
	// loop
	f.Add(cat(desc(0x1000, 8, descFNext, 1), desc(0x1000, 8, descFNext, 0)), []byte{0, 0, 1, 0}, []byte{}, false)
	// nested indirect
	f.Add(cat(desc(fuzzBlobGPA, 16, descFIndirect, 0)), []byte{0, 0}, desc(fuzzBlobGPA, 16, descFIndirect, 0), true)
	f.Fuzz(func(t *testing.T, table, heads, blob []byte, eventIdx bool) {
		mem := fuzzMemory(t)
		r := newTestRing(t, mem, fuzzQueueSize)
		r.q.eventIdx = eventIdx
		r.q.SetMaxChainLen(1 << 20)
		if len(table) > 16*fuzzQueueSize {
			table = table[:16*fuzzQueueSize]
		}
		if len(blob) > 0x4000 {
			blob = blob[:0x4000]
		}
		mem.testWrite(t, ringDescGPA, table)
		mem.testWrite(t, fuzzBlobGPA, blob)
		for i := 0; i+1 < len(heads) && i < 2*fuzzQueueSize; i += 2 {
			r.Publish(le.Uint16(heads[i:]))
		}
		var c Chain
		for i := 0; i < 2*fuzzQueueSize; i++ {
			ok, err := r.q.Next(&c)
			if err != nil {
				if errors.Is(err, ErrQueueBroken) {
					t.Fatal("queue broken by a valid avail idx")
				}
				if len(c.readable)+len(c.writable) != 0 {
					t.Fatal("refused chain not emptied")
				}
				continue
			}
			if !ok {
				break
			}
			var total uint64
			for _, segs := range [][][]byte{c.readable, c.writable} {
				for _, s := range segs {
					total += uint64(len(s))
					if !inside(mem, s) {
						t.Fatal("segment outside guest RAM")
					}
				}
			}
			if total != uint64(c.ReadableLen()+c.WritableLen()) || total > 1<<20 {
				t.Fatalf("chain length %d (readable %d writable %d)", total, c.ReadableLen(), c.WritableLen())
			}
			r.q.Push(&c, uint32(c.WritableLen()))
		}
		r.q.Notify()
	})
}

const (
	fuzzRegion    = 0x20000
	fuzzBlobGPA   = 0x4000
	fuzzQueueSize = 16
)

var fuzzMem *Memory

// fuzzMemory is two GPA-contiguous regions, shared by all fuzz iterations
// (mapping per iteration would dominate); the rings are cleared each time.
func fuzzMemory(t *testing.T) *Memory {
	if fuzzMem == nil {
		fuzzMem = testMemory(&testing.T{}, 0, fuzzRegion, fuzzRegion)
	}
	for _, r := range fuzzMem.regions {
		clear(r.host)
	}
	return fuzzMem
}

func inside(m *Memory, s []byte) bool {
	if len(s) == 0 {
		return true
	}
	p := uintptr(unsafe.Pointer(&s[0]))
	for _, r := range m.regions {
		b := uintptr(unsafe.Pointer(&r.host[0]))
		if p >= b && p+uintptr(len(s)) <= b+uintptr(len(r.host)) {
			return true
		}
	}
	return false
}

var fuzzSparse *Memory

// fuzzSparseMemory is three regions: two GPA-contiguous at 0, and one near
// the top of the address space, so that ranges cross region ends, fall in
// holes and wrap around 2^64.
func fuzzSparseMemory() *Memory {
	if fuzzSparse == nil {
		lo := testMemory(&testing.T{}, 0, 0x1000, 0x2000)
		hi := testMemory(&testing.T{}, 1<<64-0x3000, 0x1000)
		fuzzSparse = &Memory{regions: append(append([]*MemoryRegion(nil), lo.regions...), hi.regions...)}
	}
	return fuzzSparse
}

// FuzzMemoryTranslate checks the GPA and user-address translations against
// a direct walk of the regions: every slice returned is exactly the range
// asked for, inside one region, at the right place, and a range that is not
// entirely inside guest RAM (or wraps) is refused.
func FuzzMemoryTranslate(f *testing.F) {
	f.Add(uint64(0), uint64(0x3000))
	f.Add(uint64(0xfff), uint64(2))
	f.Add(uint64(0x2fff), uint64(2))
	f.Add(uint64(1<<64-0x2001), uint64(2))
	f.Add(uint64(1<<64-0x3000), uint64(0x1000))
	f.Add(uint64(1<<64-1), uint64(1))
	f.Add(uint64(0x10), uint64(1<<64-1))
	f.Fuzz(func(t *testing.T, gpa, n uint64) {
		m := fuzzSparseMemory()
		// where returns the host address of gpa, or false.
		where := func(a uint64) (uintptr, bool) {
			for _, r := range m.regions {
				if a >= r.GuestPhysAddr && a-r.GuestPhysAddr < r.Size {
					return uintptr(unsafe.Pointer(&r.host[0])) + uintptr(a-r.GuestPhysAddr), true
				}
			}
			return 0, false
		}
		// inRAM: every byte of [gpa, gpa+n) is guest RAM (n small enough
		// to walk only when it fits the RAM there is).
		inRAM := gpa+n >= gpa
		if inRAM && n > 0 {
			if n > 0x4000 {
				inRAM = false
			} else {
				for a := gpa; a < gpa+n; a++ {
					if _, ok := where(a); !ok {
						inRAM = false
						break
					}
				}
			}
		}
		if n == 0 {
			_, inRAM = where(gpa)
		}

		segs, err := m.AppendSegments(nil, gpa, n)
		if (err == nil) != (inRAM || n == 0) {
			t.Fatalf("AppendSegments(%#x, %#x): err %v, in RAM %v", gpa, n, err, inRAM)
		}
		if err == nil {
			a := gpa
			for _, s := range segs {
				if len(s) == 0 {
					t.Fatal("empty segment")
				}
				p, ok := where(a)
				if !ok || uintptr(unsafe.Pointer(&s[0])) != p || !inside(m, s) {
					t.Fatalf("segment for %#x at the wrong place", a)
				}
				a += uint64(len(s))
			}
			if a-gpa != n {
				t.Fatalf("segments cover %#x bytes, want %#x", a-gpa, n)
			}
		}
		var seen uint64
		serr := m.Segments(gpa, n, func(s []byte) error { seen += uint64(len(s)); return nil })
		if (serr == nil) != (err == nil) || (serr == nil && seen != n) {
			t.Fatalf("Segments(%#x, %#x): err %v (AppendSegments %v), %#x bytes", gpa, n, serr, err, seen)
		}

		b, berr := m.Bytes(gpa, n)
		if berr == nil {
			if uint64(len(b)) != n || uint64(cap(b)) != n || !inside(m, b) {
				t.Fatalf("Bytes(%#x, %#x): %d bytes (cap %d)", gpa, n, len(b), cap(b))
			}
			if n > 0 {
				if p, _ := where(gpa); uintptr(unsafe.Pointer(&b[0])) != p {
					t.Fatalf("Bytes(%#x, %#x) at the wrong place", gpa, n)
				}
			}
			if err != nil || len(segs) > 1 {
				t.Fatalf("Bytes(%#x, %#x) gave one slice where the range is not in one region", gpa, n)
			}
		} else if err == nil && len(segs) == 1 && n > 0 {
			t.Fatalf("Bytes(%#x, %#x) refused a range inside one region: %v", gpa, n, berr)
		}

		// User addresses: the regions' user address is their host address.
		if p, ok := where(gpa); ok {
			u, uerr := m.UserBytes(uint64(p), n)
			if (uerr == nil) != (berr == nil) {
				t.Fatalf("UserBytes and Bytes disagree on %#x+%#x: %v / %v", gpa, n, uerr, berr)
			}
			if uerr == nil && (uint64(len(u)) != n || !inside(m, u)) {
				t.Fatalf("UserBytes(%#x, %#x): %d bytes", p, n, len(u))
			}
		}
	})
}
