package vmharness

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
)

// The backend's control socket through its own CLI (ism-backend status,
// ism-backend fault), as an operator uses it.

// StatusDMB is one DMB of `ism-backend status -json`.
type StatusDMB struct {
	Owner       string `json:"owner"`
	OwnerGID    string `json:"owner_gid"`
	Index       uint32 `json:"index"`
	TokenPrefix string `json:"token_prefix"`
	RGID        string `json:"rgid"`
	Size        uint64 `json:"size"`
	Mode        string `json:"mode"`
}

// StatusFault is one standing fault of `ism-backend status -json`.
type StatusFault struct {
	ID       uint64 `json:"id"`
	Fault    string `json:"fault"`
	Kind     string `json:"kind"`
	VM       string `json:"vm"`
	Injected uint64 `json:"injected"`
}

// Status is what `ism-backend status -json` prints (cmd/ism-backend's
// statusJSON), as far as the tests read it.
type Status struct {
	DMBs   []StatusDMB   `json:"dmbs"`
	VMs    []VMStats     `json:"vms"`
	Total  Counters      `json:"total"`
	Faults []StatusFault `json:"faults"`
}

// control runs `ism-backend SUB -socket-dir DIR args...` for this backend's
// -socket-dir and returns its standard output.
func (b *Backend) control(sub string, args ...string) ([]byte, error) {
	dir := flagValue(b.args, "socket-dir")
	if dir == "" {
		return nil, fmt.Errorf("ism-backend %s: the backend was started without -socket-dir", sub)
	}
	cmd := exec.Command(b.r.Cfg.Backend, append([]string{sub, "-socket-dir", dir}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("ism-backend %s %s: %v: %s", sub, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Fault runs `ism-backend fault args...` (e.g. "drop-signals", "to=a",
// "every=3") against the backend and returns what it printed.
func (b *Backend) Fault(args ...string) (string, error) {
	out, err := b.control("fault", args...)
	return string(out), err
}

// StatusJSON runs `ism-backend status -json` against the backend.
func (b *Backend) StatusJSON() (Status, error) {
	var s Status
	out, err := b.control("status", "-json")
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(out, &s); err != nil {
		return s, fmt.Errorf("ism-backend status -json: %w", err)
	}
	return s, nil
}
