package ism

import (
	"slices"
	"sort"
)

// DMBInfo describes one live DMB, for an operator's listing.
type DMBInfo struct {
	Token    uint64
	Owner    string // the owner's guest name
	OwnerGID uint64
	RGID     uint64
	Size     uint64
	Index    uint32
	Attach   bool // attach mode (host memory), else copy mode (the owner's RAM)
	// AttachedBy are the GIDs of the devices that have it attached (the
	// owner's own, too, when it attached it), sorted.
	AttachedBy []uint64
}

// DMBs lists the fabric's live DMBs, by owner name and DMB index. Like
// Stats it is not one atomic snapshot: a DMB may die while it runs.
func (f *Fabric) DMBs() []DMBInfo {
	var out []DMBInfo
	f.amu.Lock() // the attachers; amu comes before the table's lock
	f.dmbs.Range(func(tok uint64, e *dmbEntry) bool {
		in := DMBInfo{Token: tok, Owner: e.owner.name, OwnerGID: e.owner.gid, RGID: e.rgid,
			Size: e.size, Index: e.index, Attach: e.buf != nil}
		for d := range e.attachers {
			in.AttachedBy = append(in.AttachedBy, d.gid)
		}
		slices.Sort(in.AttachedBy)
		out = append(out, in)
		return true
	})
	f.amu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Owner != out[j].Owner {
			return out[i].Owner < out[j].Owner
		}
		return out[i].Index < out[j].Index
	})
	return out
}
