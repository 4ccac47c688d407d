package vmharness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// The backend's control socket, driven through the real binary as an
// operator does (ism-backend status / fault / add-vm / remove-vm -socket-dir
// DIR).

// command runs ISM_BACKEND with args against b's -socket-dir and returns
// its stdout; stderr and the exit status make the error. It fails after
// 60 s, scaled.
func (b *Backend) command(args ...string) ([]byte, error) {
	dir := flagValue(b.args, "socket-dir")
	if dir == "" {
		return nil, fmt.Errorf("the backend was started without -socket-dir")
	}
	ctx, cancel := context.WithTimeout(context.Background(), b.r.Scaled(60*time.Second))
	defer cancel()
	full := append([]string{args[0], "-socket-dir", dir}, args[1:]...)
	cmd := exec.CommandContext(ctx, b.r.Cfg.Backend, full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("ism-backend %s: %v: %s", strings.Join(full, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// AddVM adds VM spec (NAME or NAME=GID) to the running backend and
// returns its socket, which exists when AddVM returns.
func (b *Backend) AddVM(spec string) (string, error) {
	if _, err := b.command("add-vm", spec); err != nil {
		return "", err
	}
	name, _, _ := strings.Cut(spec, "=")
	sock := filepath.Join(flagValue(b.args, "socket-dir"), name+".sock")
	if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		return "", fmt.Errorf("add-vm %s answered, but %s: %v", spec, sock, err)
	}
	return sock, nil
}

// RemoveVM removes VM name from the running backend (its guest's
// connection is closed).
func (b *Backend) RemoveVM(name string) error {
	_, err := b.command("remove-vm", name)
	return err
}

// Status is `ism-backend status -json` (cmd/ism-backend/control.go).
type Status struct {
	Time    string         `json:"time"`
	CHID    string         `json:"chid"`
	Devices []StatusDevice `json:"devices"`
	DMBs    []StatusDMB    `json:"dmbs"`
	VMs     []VMStats      `json:"vms"`
	Total   Counters       `json:"total"`
	Faults  []StatusFault  `json:"faults"` // standing injected faults
}

// StatusDevice is one VM's device.
type StatusDevice struct {
	VM        string `json:"vm"`
	GID       string `json:"gid"`
	Connected bool   `json:"connected"`
	Since     string `json:"since"`
	Modes     string `json:"modes"`
}

// StatusDMB is one live DMB; its token is shown by its first 4 bytes.
type StatusDMB struct {
	Owner       string   `json:"owner"`
	OwnerGID    string   `json:"owner_gid"`
	Index       uint32   `json:"index"`
	TokenPrefix string   `json:"token_prefix"`
	RGID        string   `json:"rgid"`
	Size        uint64   `json:"size"`
	Mode        string   `json:"mode"`
	AttachedBy  []string `json:"attached_by"`
}

// Device returns VM name's device.
func (s Status) Device(name string) (StatusDevice, bool) {
	for _, d := range s.Devices {
		if d.VM == name {
			return d, true
		}
	}
	return StatusDevice{}, false
}

// VM returns VM name's counters.
func (s Status) VM(name string) (VMStats, bool) {
	for _, v := range s.VMs {
		if v.Name == name {
			return v, true
		}
	}
	return VMStats{}, false
}

// Status runs `ism-backend status -json` and parses what it prints.
func (b *Backend) Status() (Status, error) {
	var s Status
	out, err := b.command("status", "-json")
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(out, &s); err != nil {
		return s, fmt.Errorf("ism-backend status -json: %w", err)
	}
	return s, nil
}
