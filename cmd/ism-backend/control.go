package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/handover"
	"github.com/ism-backend/ism-backend/ism"
)

// The control socket, DIR/ism-backend.ctl: an operator's way in, as
// smc-tools' smcd command is on an s390. One JSON request per connection,
// one line ({"command": "status"}), one JSON answer, then the backend
// closes. The file is 0600 whatever -socket-mode says (it is not a VM's
// device), and only the backend's own uid or root may talk on it.

const controlName = "ism-backend.ctl"

// controlRequest is what a client sends.
type controlRequest struct {
	Command string        `json:"command"`
	Fault   *faultRequest `json:"fault,omitempty"` // fault.go
	VM      string        `json:"vm,omitempty"`    // add-vm: NAME[=GID]; remove-vm: NAME (vmctl.go)
}

// controlAnswer is what the backend sends back: Error, or the command's
// result.
type controlAnswer struct {
	Error  string       `json:"error,omitempty"`
	Status *statusJSON  `json:"status,omitempty"`
	Faults *faultAnswer `json:"faults,omitempty"` // fault.go
	VM     *vmAnswer    `json:"vm,omitempty"`     // add-vm, remove-vm
}

// statusJSON is `ism-backend status -json`: the fabric's devices, DMBs and
// counters now.
type statusJSON struct {
	Time    string        `json:"time"`
	CHID    string        `json:"chid"`
	Devices []deviceJSON  `json:"devices"`
	DMBs    []dmbJSON     `json:"dmbs"`
	VMs     []vmStatsJSON `json:"vms"` // counters, as in the stats file
	Total   statsJSON     `json:"total"`
	Faults  []faultJSON   `json:"faults"` // standing faults (fault.go)
}

type deviceJSON struct {
	VM        string `json:"vm"`
	GID       string `json:"gid"`
	Connected bool   `json:"connected"`
	Since     string `json:"since,omitempty"` // RFC 3339, while connected
	Modes     string `json:"modes"`
}

// dmbJSON shows a token's first 4 bytes only: a token is what lets a peer
// write into the DMB, and an operator needs it only to tell DMBs apart.
type dmbJSON struct {
	Owner       string   `json:"owner"`
	OwnerGID    string   `json:"owner_gid"`
	Index       uint32   `json:"index"`
	TokenPrefix string   `json:"token_prefix"`
	RGID        string   `json:"rgid"`
	Size        uint64   `json:"size"`
	Mode        string   `json:"mode"`
	AttachedBy  []string `json:"attached_by"`
}

func gidString(g uint64) string { return fmt.Sprintf("%#016x", g) }

// tokenPrefix is the first 4 of a token's 8 bytes, as hex.
func tokenPrefix(tok uint64) string { return fmt.Sprintf("%08x…", tok>>32) }

// status builds the status answer: every configured VM (connected or not)
// and any other name that connected, every live DMB, the counters.
func status(f *ism.Fabric, opts *options, now time.Time) *statusJSON {
	w := statsWriter{opts: opts}
	counters := w.snapshot(f, now)
	out := &statusJSON{Time: counters.Time, CHID: counters.CHID, VMs: counters.VMs, Total: counters.Total,
		Devices: []deviceJSON{}, DMBs: []dmbJSON{}, Faults: faultsJSON(f.Faults())}
	byName := map[string]ism.DeviceStats{}
	for _, d := range f.DeviceStats() {
		byName[d.Name] = d
	}
	for _, v := range counters.VMs {
		dev := deviceJSON{VM: v.Name, GID: v.GID, Connected: v.Connected, Modes: v.Modes}
		if d, ok := byName[v.Name]; ok && d.Connected {
			dev.Since = d.Since.UTC().Format(time.RFC3339)
		}
		out.Devices = append(out.Devices, dev)
	}
	for _, d := range f.DMBs() {
		j := dmbJSON{Owner: d.Owner, OwnerGID: gidString(d.OwnerGID), Index: d.Index, TokenPrefix: tokenPrefix(d.Token),
			RGID: gidString(d.RGID), Size: d.Size, Mode: "copy", AttachedBy: []string{}}
		if d.Attach {
			j.Mode = "attach"
		}
		for _, g := range d.AttachedBy {
			j.AttachedBy = append(j.AttachedBy, gidString(g))
		}
		out.DMBs = append(out.DMBs, j)
	}
	return out
}

// serveControl answers control requests on ln until ctx is done.
func serveControl(ctx context.Context, ln *net.UnixListener, f *ism.Fabric, opts *options, log *logrus.Logger) {
	context.AfterFunc(ctx, func() { ln.Close() })
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			// Closed: the run ends, or a handover gave the socket away.
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				log.WithError(err).Error("control socket: accept")
			}
			return
		}
		go func() {
			defer c.Close()
			if err := handover.CheckPeer(c); err != nil {
				log.WithError(err).Warn("control socket: connection refused")
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			json.NewEncoder(c).Encode(handleControl(c, f, opts))
		}()
	}
}

// handleControl reads one request from r and returns the answer.
func handleControl(r io.Reader, f *ism.Fabric, opts *options) controlAnswer {
	line, err := bufio.NewReader(io.LimitReader(r, 4096)).ReadBytes('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return controlAnswer{Error: "reading the request: " + err.Error()}
	}
	var req controlRequest
	if err := json.Unmarshal(line, &req); err != nil {
		return controlAnswer{Error: "a request is one JSON line, e.g. {\"command\":\"status\"}"}
	}
	switch req.Command {
	case "status":
		return controlAnswer{Status: status(f, opts, time.Now())}
	case "fault":
		return handleFault(r, req.Fault, f, opts)
	case "add-vm", "remove-vm":
		return handleVMControl(opts.served, req)
	default:
		return controlAnswer{Error: fmt.Sprintf("unknown command %q (known: status, fault, add-vm, remove-vm)", req.Command)}
	}
}

// listenControl creates DIR/ism-backend.ctl, 0600.
func listenControl(dir string) (*net.UnixListener, error) {
	return listenUnix(filepath.Join(dir, controlName), socketAccess{mode: 0o600, gid: -1})
}

// askControl sends command to the backend serving dir and returns its
// answer.
func askControl(dir, command string, timeout time.Duration) (controlAnswer, error) {
	return askControlRequest(dir, controlRequest{Command: command}, timeout)
}

// askControlRequest sends req to the backend serving dir and returns its
// answer.
func askControlRequest(dir string, req controlRequest, timeout time.Duration) (controlAnswer, error) {
	var a controlAnswer
	path := filepath.Join(dir, controlName)
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return a, fmt.Errorf("no backend answers on %s: %w", path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return a, err
	}
	if err := json.NewDecoder(c).Decode(&a); err != nil {
		return a, fmt.Errorf("reading the answer from %s: %w", path, err)
	}
	if a.Error != "" {
		return a, errors.New(a.Error)
	}
	return a, nil
}
