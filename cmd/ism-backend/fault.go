package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
)

// Fault injection through the control socket: {"command":"fault",
// "fault":{"verb":...}} sets, clears and lists the fabric's standing
// faults (ism/faults.go) and fires the one-shot ones. The model logs each
// change loudly, with who asked (the socket peer's pid and uid).

// faultRequest is the "fault" field of a control request. VM is a name or
// a GID (0x...); DMB a token or the leading hex digits of one (as status
// shows them), or Index picks the DMB by its index.
type faultRequest struct {
	Verb   string `json:"verb"` // a fault kind, "list" or "clear"
	VM     string `json:"vm,omitempty"`
	From   bool   `json:"from,omitempty"` // signals/MOVEs the VM sends (else: toward it)
	DMB    string `json:"dmb,omitempty"`
	Index  *int64 `json:"index,omitempty"`
	Every  uint64 `json:"every,omitempty"`
	Count  uint64 `json:"count,omitempty"`
	Status string `json:"status,omitempty"` // a status name (busy, no_entry, ...) or number
	Delay  string `json:"delay,omitempty"`  // a Go duration
	Rate   uint64 `json:"rate,omitempty"`
	ID     uint64 `json:"id,omitempty"` // clear: one fault; 0: all
}

// faultAnswer is the "faults" field of the answer.
type faultAnswer struct {
	Faults  []faultJSON `json:"faults"`            // standing faults after the request
	Set     uint64      `json:"set,omitempty"`     // the id of the fault just set
	Cleared []faultJSON `json:"cleared,omitempty"` // the faults just cleared
	Token   string      `json:"token,omitempty"`   // revoke-dmb: the DMB's token prefix
	Peers   *int        `json:"peers,omitempty"`   // gid-gone: devices told
}

// faultJSON is one standing fault, in status and in fault list.
type faultJSON struct {
	ID       uint64 `json:"id"`
	Fault    string `json:"fault"` // what, in words (ism.FaultSpec.String)
	Kind     string `json:"kind"`
	VM       string `json:"vm"`
	Since    string `json:"since"`
	By       string `json:"by"`
	Injected uint64 `json:"injected"`
}

func faultsJSON(l []ism.Fault) []faultJSON {
	out := make([]faultJSON, 0, len(l))
	for _, x := range l {
		s := x.FaultSpec
		if s.Token != 0 {
			s.Token >>= 32 // shown as a prefix, as status shows tokens
		}
		out = append(out, faultJSON{ID: x.ID, Fault: s.String(), Kind: x.Kind.String(), VM: x.VM,
			Since: x.Since.UTC().Format(time.RFC3339), By: x.By, Injected: x.Injected})
	}
	return out
}

// peerOf names the control socket's peer for the log: "pid N uid M".
func peerOf(r io.Reader) string {
	c, ok := r.(*net.UnixConn)
	if !ok {
		return "unknown peer"
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return "unknown peer"
	}
	var cred *unix.Ucred
	rc.Control(func(fd uintptr) { cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cred == nil {
		return "unknown peer"
	}
	return fmt.Sprintf("pid %d uid %d", cred.Pid, cred.Uid)
}

// handleFault carries out a fault request from the control socket's peer r.
func handleFault(r io.Reader, req *faultRequest, f *ism.Fabric, opts *options) controlAnswer {
	a, err := doFault(req, f, opts, peerOf(r))
	if err != nil {
		return controlAnswer{Error: "fault: " + err.Error()}
	}
	a.Faults = faultsJSON(f.Faults())
	return controlAnswer{Faults: a}
}

func doFault(req *faultRequest, f *ism.Fabric, opts *options, by string) (*faultAnswer, error) {
	if req == nil {
		return nil, errors.New(`the request has no "fault" field`)
	}
	a := &faultAnswer{}
	switch req.Verb {
	case "list":
		return a, nil
	case "clear":
		gone, err := f.ClearFault(req.ID, by)
		a.Cleared = faultsJSON(gone)
		return a, err
	}
	kind, err := ism.ParseFaultKind(req.Verb)
	if err != nil {
		return nil, fmt.Errorf("%w, list, clear", err)
	}
	if err := checkFaultFields(kind, req); err != nil {
		return nil, err
	}
	vm, err := resolveVM(req.VM, f, opts)
	if err != nil {
		return nil, err
	}
	switch kind {
	case ism.FaultRevokeDMB:
		tok, index, err := resolveDMB(req, vm, f, true)
		if err != nil {
			return nil, err
		}
		if tok, err = f.RevokeDMB(vm, tok, index, by); err != nil {
			return nil, err
		}
		a.Token = tokenPrefix(tok)
		return a, nil
	case ism.FaultGIDGone:
		n, err := f.SendGIDGone(vm, by)
		a.Peers = &n
		return a, err
	}
	s := ism.FaultSpec{Kind: kind, VM: vm, From: req.From, Every: req.Every, Count: req.Count, Rate: req.Rate}
	if req.Status != "" {
		if s.Status, err = parseStatus(req.Status); err != nil {
			return nil, err
		}
	}
	if req.Delay != "" {
		if s.Delay, err = time.ParseDuration(req.Delay); err != nil {
			return nil, fmt.Errorf("delay %q: want a duration such as 200ms", req.Delay)
		}
	}
	if req.DMB != "" || req.Index != nil {
		if kind != ism.FaultFailMoves || req.From {
			return nil, fmt.Errorf("%v: a DMB only for fail-moves toward its owner", kind)
		}
		if s.Token, _, err = resolveDMB(req, vm, f, false); err != nil {
			return nil, err
		}
	}
	if a.Set, err = f.SetFault(s, by); err != nil {
		return nil, err
	}
	return a, nil
}

// faultFields are the fields each kind takes besides vm (and, for the
// signal and MOVE faults, from).
var faultFields = [ism.NumFaultKinds][]string{
	ism.FaultDropSignals:  {"from", "every"},
	ism.FaultDelaySignals: {"from", "delay"},
	ism.FaultFailMoves:    {"from", "status", "count", "dmb", "index"},
	ism.FaultThrottle:     {"rate"},
	ism.FaultRevokeDMB:    {"dmb", "index"},
	ism.FaultGIDGone:      {},
}

// checkFaultFields refuses a field the kind does not take (a typo would
// otherwise be ignored).
func checkFaultFields(kind ism.FaultKind, req *faultRequest) error {
	set := map[string]bool{"from": req.From, "dmb": req.DMB != "", "index": req.Index != nil, "every": req.Every != 0,
		"count": req.Count != 0, "status": req.Status != "", "delay": req.Delay != "", "rate": req.Rate != 0, "id": req.ID != 0}
	for field, on := range set {
		if on && !slices.Contains(faultFields[kind], field) {
			if field == "from" {
				return fmt.Errorf("%v takes vm= (or to=), not from=", kind)
			}
			return fmt.Errorf("%v takes no %s", kind, field)
		}
	}
	return nil
}

// resolveVM turns a name or a GID into the name of a configured VM or of
// one that has connected.
func resolveVM(v string, f *ism.Fabric, opts *options) (string, error) {
	if v == "" {
		return "", errors.New("which VM? (vm=NAME or vm=GID)")
	}
	gid, gerr := strconv.ParseUint(v, 0, 64)
	isGID := gerr == nil && strings.HasPrefix(v, "0x")
	var known []string
	for _, s := range opts.vms {
		if s.Name == v || (isGID && s.GID == gid) {
			return s.Name, nil
		}
		known = append(known, s.Name)
	}
	for _, d := range f.DeviceStats() {
		if d.Name == v || (isGID && d.GID == gid) {
			return d.Name, nil
		}
		if !slices.Contains(known, d.Name) {
			known = append(known, d.Name)
		}
	}
	return "", fmt.Errorf("unknown VM %q (known: %s)", v, strings.Join(known, ", "))
}

// resolveDMB finds a live DMB of owner by req.Index or req.DMB (a whole
// token, or its leading hex digits if they name one DMB). With byIndex the
// index is returned for the model to pick (token 0).
func resolveDMB(req *faultRequest, owner string, f *ism.Fabric, byIndex bool) (uint64, uint32, error) {
	if (req.DMB == "") == (req.Index == nil) {
		return 0, 0, errors.New("which DMB? give dmb=TOKEN (or its first hex digits) or index=N")
	}
	if req.Index != nil {
		if *req.Index < 0 || *req.Index >= abi.MaxDMBs {
			return 0, 0, fmt.Errorf("index %d out of range (0..%d)", *req.Index, abi.MaxDMBs-1)
		}
		if byIndex {
			return 0, uint32(*req.Index), nil
		}
	}
	prefix := strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(req.DMB, "0x"), "…"))
	if req.DMB != "" {
		if _, err := strconv.ParseUint(prefix, 16, 64); err != nil || len(prefix) > 16 {
			return 0, 0, fmt.Errorf("dmb %q: want a token in hex", req.DMB)
		}
	}
	var found []uint64
	for _, d := range f.DMBs() {
		if d.Owner != owner {
			continue
		}
		if req.Index != nil && d.Index == uint32(*req.Index) ||
			req.DMB != "" && strings.HasPrefix(fmt.Sprintf("%016x", d.Token), prefix) {
			found = append(found, d.Token)
		}
	}
	switch {
	case len(found) == 0 && req.Index != nil:
		return 0, 0, fmt.Errorf("VM %q has no DMB at index %d", owner, *req.Index)
	case len(found) == 0:
		return 0, 0, fmt.Errorf("VM %q owns no DMB whose token starts with %s", owner, prefix)
	case len(found) > 1:
		return 0, 0, fmt.Errorf("%d DMBs of VM %q have tokens starting with %s: give more digits", len(found), owner, prefix)
	}
	return found[0], 0, nil
}

// parseStatus reads an abi status by name (busy, no_entry, ...) or number.
func parseStatus(s string) (abi.Status, error) {
	for st := abi.StatusOK + 1; int(st) < ism.NumStatus; st++ {
		if s == st.Name() || s == statusNames[st] || s == strconv.Itoa(int(st)) {
			return st, nil
		}
	}
	return 0, fmt.Errorf("status %q: want one of %s (or 1..%d)", s, strings.Join(statusNames[1:], ", "), ism.NumStatus-1)
}

const faultUsage = `usage: ism-backend fault [-socket-dir DIR] [-json] VERB [KEY=VALUE ...]

  drop-signals  to=VM|from=VM every=N        lose every Nth signal (1: all)
  delay-signals to=VM|from=VM delay=DURATION deliver signals late, in order
  fail-moves    to=VM|from=VM status=STATUS [count=N] [dmb=TOKEN|index=N]
                                             fail MOVEs (count: the next N; default: all, until cleared)
  throttle      vm=VM rate=N                 serve at most N request chains a second
  revoke-dmb    vm=VM dmb=TOKEN|index=N      unregister the VM's DMB; owner and peer get the DMB-gone event
  gid-gone      vm=VM                        tell the VM's peers it is gone (it stays connected)
  list                                       the standing faults
  clear [ID]                                 clear one fault, or all

VM is a name or a GID (0x...); TOKEN a token or its first hex digits, as
status shows them; STATUS an abi status (busy, no_entry, no_space, ...).
For testing SMC-D stacks only: every fault is logged by the backend.
`

// runFault is `ism-backend fault ...`: it sends one fault request to the
// backend serving DIR and prints the standing faults after it.
func runFault(args []string, out, errOut io.Writer) error {
	fs := flag.NewFlagSet("ism-backend fault", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dir := fs.String("socket-dir", "/run/ism", "the backend's socket directory `DIR`")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the backend")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(errOut, faultUsage)
		}
		return err
	}
	req, err := parseFaultArgs(fs.Args())
	if err != nil {
		return err
	}
	a, err := askFault(*dir, req, *timeout)
	if err != nil {
		return err
	}
	if *asJSON {
		e := json.NewEncoder(out)
		e.SetIndent("", "  ")
		return e.Encode(a)
	}
	switch {
	case a.Set != 0:
		fmt.Fprintf(out, "fault %d set\n", a.Set)
	case len(a.Cleared) > 0:
		for _, x := range a.Cleared {
			fmt.Fprintf(out, "fault %d cleared (%s; %d injected)\n", x.ID, x.Fault, x.Injected)
		}
	case a.Token != "":
		fmt.Fprintf(out, "DMB %s revoked\n", a.Token)
	case a.Peers != nil:
		fmt.Fprintf(out, "GID-gone event sent to %d peer(s)\n", *a.Peers)
	}
	return writeFaults(out, a.Faults)
}

// parseFaultArgs turns VERB KEY=VALUE ... into a request; bad input gets a
// one-line error.
func parseFaultArgs(args []string) (*faultRequest, error) {
	if len(args) == 0 {
		return nil, errors.New("which fault? (list, clear, drop-signals, ...; -h for all)")
	}
	req := &faultRequest{Verb: args[0]}
	rest := args[1:]
	if req.Verb == "clear" && len(rest) == 1 && !strings.Contains(rest[0], "=") {
		rest = []string{"id=" + rest[0]}
	}
	seen := map[string]bool{}
	for _, kv := range rest {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || v == "" {
			return nil, fmt.Errorf("argument %q: want KEY=VALUE", kv)
		}
		if seen[k] {
			return nil, fmt.Errorf("%s given twice", k)
		}
		seen[k] = true
		num := func() (uint64, error) {
			n, err := strconv.ParseUint(v, 0, 64)
			if err != nil {
				return 0, fmt.Errorf("%s=%s: want a number", k, v)
			}
			return n, nil
		}
		var err error
		switch k {
		case "to", "vm":
			req.VM = v
		case "from":
			req.VM, req.From = v, true
		case "dmb":
			req.DMB = v
		case "index":
			var n uint64
			if n, err = num(); err == nil {
				i := int64(min(n, 1<<62))
				req.Index = &i
			}
		case "every":
			req.Every, err = num()
		case "count":
			req.Count, err = num()
		case "rate":
			req.Rate, err = num()
		case "id":
			req.ID, err = num()
		case "status":
			req.Status = v
		case "delay":
			req.Delay = v
		default:
			return nil, fmt.Errorf("unknown key %q (-h lists them)", k)
		}
		if err != nil {
			return nil, err
		}
	}
	if seen["to"] && seen["from"] || (seen["vm"] && (seen["to"] || seen["from"])) {
		return nil, errors.New("give one of to=, from= and vm=")
	}
	return req, nil
}

// askFault sends a fault request and returns the answer.
func askFault(dir string, req *faultRequest, timeout time.Duration) (*faultAnswer, error) {
	var a controlAnswer
	path := filepath.Join(dir, controlName)
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, fmt.Errorf("no backend answers on %s: %w", path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if err := json.NewEncoder(c).Encode(controlRequest{Command: "fault", Fault: req}); err != nil {
		return nil, err
	}
	if err := json.NewDecoder(c).Decode(&a); err != nil {
		return nil, fmt.Errorf("reading the answer from %s: %w", path, err)
	}
	if a.Error != "" {
		return nil, errors.New(a.Error)
	}
	if a.Faults == nil {
		return nil, errors.New("the backend answered without faults")
	}
	return a.Faults, nil
}

// writeFaults prints the standing faults as a table.
func writeFaults(out io.Writer, l []faultJSON) error {
	if len(l) == 0 {
		_, err := fmt.Fprintln(out, "no fault set")
		return err
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tFault\tInjected\tSince\tBy")
	for _, x := range l {
		fmt.Fprintf(w, "%d\t%s\t%d\t%s\t%s\n", x.ID, x.Fault, x.Injected, x.Since, x.By)
	}
	return w.Flush()
}
