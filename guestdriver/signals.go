package guestdriver

import "github.com/ism-backend/ism-backend/abi"

// signalReader finds the DMBs the device signalled by comparing the SBA's
// counters (ABI v2: only the device writes them) with its own copies. It
// never writes the SBA, so no claim of the driver's can race with the
// device's writes, whatever the accelerator makes of atomic instructions.
// One goroutine (the poller) uses it.
type signalReader struct {
	sba   abi.SBA
	n     uint32 // DMB indices in use (<= abi.MaxDMBs)
	sum   uint32
	group [abi.SBAGroups]uint32
}

// dmbSignals is the per-DMB part of a signalReader's copies; it lives in the
// DMB so that a new DMB at a reused index starts from the counters as they
// are when it is registered.
type dmbSignals struct {
	seq  uint32
	dmbe [abi.MaxDMBEs]uint16
}

// baseline reads DMB index i's counters as they are now.
func (r *signalReader) baseline(i uint32) (s dmbSignals) {
	s.seq = r.sba.Seq(i)
	for e := range s.dmbe {
		s.dmbe[e] = r.sba.DMBECount(i, uint32(e))
	}
	return s
}

// signalTarget is what a scan wakes: a DMB, in the driver.
type signalTarget interface {
	copies() *dmbSignals    // the counters as last seen
	signalled(dmbes uint32) // the DMB was signalled, with these DMBEs
}

// scan wakes each target whose counters moved since the last scan, with the
// DMBEs whose counts moved; target returns the one at DMB index i (nil: no
// DMB there, skip it). It reads in the order the ABI gives (sum,
// groups, seqs, DMBE counts), the reverse of the device's writes, so a
// signal it does not see now moves the sum again for the next scan. It
// reports whether the sum had moved.
func (r *signalReader) scan(target func(i uint32) signalTarget) bool {
	sum := r.sba.Sum()
	if sum == r.sum {
		return false
	}
	r.sum = sum
	for g := 0; g < abi.SBAGroups && uint32(64*g) < r.n; g++ {
		v := r.sba.Group(g)
		if v == r.group[g] {
			continue
		}
		r.group[g] = v
		for i := uint32(64 * g); i < min(uint32(64*g+64), r.n); i++ {
			t := target(i)
			if t == nil {
				continue
			}
			s := t.copies()
			seq := r.sba.Seq(i)
			if seq == s.seq {
				continue
			}
			s.seq = seq
			var dmbes uint32
			for e := range s.dmbe {
				if c := r.sba.DMBECount(i, uint32(e)); c != s.dmbe[e] {
					s.dmbe[e] = c
					dmbes |= 1 << e
				}
			}
			t.signalled(dmbes)
		}
	}
	return true
}
