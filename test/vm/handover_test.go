package vm

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ism-backend/ism-backend/test/vm/vmharness"
)

// TestHandoverDuringSMCD: the backend is upgraded in place (a new process
// takes every VM over, docs/handover.md) while 64 MiB flow over SMC-D
// between two guests, in copy mode and in attach mode. The transfer
// completes with matching SHA-256, the old process exits 0, and the new one
// serves a second transfer between two new guests on the same sockets.
func TestHandoverDuringSMCD(t *testing.T) {
	for _, mode := range []string{"copy", "attach"} {
		t.Run(mode, func(t *testing.T) {
			r := vmharness.New(t)
			r.RequireBackend()
			args := func() map[string]string {
				m := map[string]string{}
				if mode == "copy" {
					m["modes"] = "copy"
				}
				return m
			}
			client := args()
			client["bytes"] = strconv.Itoa(smcBytes)
			be, a, b := smcPairOn(r, 1, statsArgs(r), args(), client, 5*time.Minute)

			// Hand over while data flows: the client has MOVEs counted
			// (data in copy mode, signals in attach mode) and has not
			// finished.
			waitMoving(t, r, be, b)
			before, _ := backendStats(t, be, "b")
			nb := r.Handover(be)
			t.Logf("the old process held the VMs for %s", pausedFor(t, be))

			ob := b.RequireOK(0)
			oa := a.RequireOK(0)
			checkDigests(t, oa, ob, 1, true)
			checkModes(t, a, 1, 1, mode, mode)
			checkModes(t, b, 1, 1, mode, mode)

			// The new process's counters go on from the old one's.
			after, sb := backendStats(t, nb, "b")
			if after.Total.Moves <= before.Total.Moves || sb.Stats.Moves == 0 {
				t.Errorf("moves %d before the handover, %d after", before.Total.Moves, after.Total.Moves)
			}
			t.Logf("handed over at %d MOVEs; %d after the transfer (client %ss)",
				before.Total.Moves, after.Total.Moves, ob.Results["client_seconds"])

			// A second transfer, served by the new process alone.
			srv, cli := r.NetPair()
			sargs, cargs := args(), args()
			sargs["ip"], cargs["ip"] = "169.254.7.1/24", "169.254.7.2/24"
			cargs["connect"], cargs["bytes"] = "169.254.7.1:7000", strconv.Itoa(8<<20)
			a2 := r.StartVM(vmharness.VMConfig{Name: "a2", Scenario: "smcd-server", Net: &srv, Timeout: 5 * time.Minute,
				HugePages: 32, Args: sargs, ISM: []vmharness.ISMDevice{{Socket: r.Path("a.sock")}}})
			b2 := r.StartVM(vmharness.VMConfig{Name: "b2", Scenario: "smcd-client", Net: &cli, Timeout: 5 * time.Minute,
				HugePages: 32, Args: cargs, ISM: []vmharness.ISMDevice{{Socket: r.Path("b.sock")}}})
			ob2 := b2.RequireOK(0)
			oa2 := a2.RequireOK(0)
			checkDigests(t, oa2, ob2, 1, true)
		})
	}
}

// pausedFor is how long the old backend held its VMs in its last handover,
// as its log says (paused=...).
func pausedFor(t *testing.T, be *vmharness.Backend) string {
	t.Helper()
	m := regexp.MustCompile(`paused=(\S+)`).FindAllStringSubmatch(be.Log(), -1)
	if len(m) == 0 {
		t.Errorf("no paused= in the backend's handover log line")
		return "?"
	}
	return m[len(m)-1][1]
}

// waitMoving waits until the client VM b has MOVEs counted and has not
// finished: data is flowing.
func waitMoving(t *testing.T, r *vmharness.Run, be *vmharness.Backend, b *vmharness.VM) {
	t.Helper()
	deadline := time.Now().Add(r.Scaled(3 * time.Minute))
	for {
		_, sb := backendStats(t, be, "b")
		if sb.Stats.Moves > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no MOVE from the client within %v: %+v", r.Scaled(3*time.Minute), sb)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, ok := b.Outcome().Results["client_seconds"]; ok {
		t.Fatal("the transfer ended before the handover: nothing was tested")
	}
}

// TestHandoverRollback: a new process that fails to take over after the
// VMs were frozen (here: it may not hold as many fds as the running
// backend passes it) exits non-zero with a clear error, and the running
// backend thaws its VMs and serves on: a 64 MiB SMC-D transfer under way
// completes with matching SHA-256, and a proper handover works after.
func TestHandoverRollback(t *testing.T) {
	r := vmharness.New(t)
	r.RequireBackend()
	client := map[string]string{"modes": "copy", "bytes": strconv.Itoa(smcBytes)}
	be, a, b := smcPairOn(r, 1, statsArgs(r), map[string]string{"modes": "copy"}, client, 5*time.Minute)
	waitMoving(t, r, be, b)

	newLog := r.FailedHandover(be, "prlimit", "--nofile=16:16")
	if !strings.Contains(newLog, "RLIMIT_NOFILE") {
		t.Errorf("the new process's error does not name the fd limit:\n%s", newLog)
	}
	// The running backend froze its VMs and thawed them (it logs the
	// pause only when it froze them).
	if !regexp.MustCompile(`handover failed; serving on as before.*paused=`).MatchString(be.Log()) {
		t.Errorf("the running backend did not log a rollback after a freeze:\n%s", be.Log())
	}
	t.Logf("rolled back after holding the VMs for %s", pausedFor(t, be))

	ob := b.RequireOK(0)
	oa := a.RequireOK(0)
	checkDigests(t, oa, ob, 1, true)
	checkModes(t, b, 1, 1, "copy", "copy")

	// Still upgradable (the guests have powered off by now), and the
	// new process goes on from the counters of the transfer.
	nb := r.Handover(be)
	t.Logf("then handed over after holding the VMs for %s", pausedFor(t, be))
	if st, err := nb.Stats(); err != nil || st.Total.MoveBytes < smcBytes {
		t.Errorf("after the handover: %d bytes moved (%v), want at least the transfer's %d", st.Total.MoveBytes, err, smcBytes)
	}
}
