package main

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// vmSpec is one -vm flag: a VM name and the GID its device gets.
type vmSpec struct {
	Name string
	GID  uint64
}

// vmName keeps names usable as socket file names and log fields.
var vmName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// parseVM parses "NAME" or "NAME=GID" (GID in Go integer syntax, e.g. 0x1234).
func parseVM(s string) (vmSpec, error) {
	name, gidText, hasGID := strings.Cut(s, "=")
	if !vmName.MatchString(name) {
		return vmSpec{}, fmt.Errorf("name must be 1-64 of [A-Za-z0-9_.-], starting with a letter or digit")
	}
	if !hasGID {
		return vmSpec{Name: name, GID: gidForName(name)}, nil
	}
	gid, err := strconv.ParseUint(gidText, 0, 64)
	if err != nil {
		return vmSpec{}, fmt.Errorf("GID %q is not a 64-bit number", gidText)
	}
	if gid == 0 {
		return vmSpec{}, fmt.Errorf("GID 0 is reserved")
	}
	return vmSpec{Name: name, GID: gid}, nil
}

// gidForName derives a stable GID from a VM name, so a VM keeps its GID across
// backend restarts without configuration. Distinct names collide with
// probability 2^-64; checkVMs refuses a collision anyway.
func gidForName(name string) uint64 {
	sum := sha256.Sum256([]byte("ism-backend GID\x00" + name))
	if g := binary.BigEndian.Uint64(sum[:8]); g != 0 {
		return g
	}
	return 1
}

// checkVMs refuses duplicate names and duplicate GIDs.
func checkVMs(vms []vmSpec) error {
	if len(vms) == 0 {
		return errors.New("no VMs: give at least one -vm NAME[=GID]")
	}
	names := map[string]bool{}
	gids := map[uint64]string{}
	for _, v := range vms {
		if names[v.Name] {
			return fmt.Errorf("-vm %s given twice", v.Name)
		}
		names[v.Name] = true
		if other, ok := gids[v.GID]; ok {
			return fmt.Errorf("VMs %s and %s have the same GID %#x", other, v.Name, v.GID)
		}
		gids[v.GID] = v.Name
	}
	return nil
}
