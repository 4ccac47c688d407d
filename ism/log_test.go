package ism

import (
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/ism-backend/ism-backend/abi"
)

// A hostile guest's flood of refusals gives a bounded number of log lines,
// each naming the VM and its GID; refusals are all counted.
func TestRefusalLogging(t *testing.T) {
	logger, hook := logtest.NewNullLogger()
	logger.SetLevel(logrus.DebugLevel)
	f := NewFabric(abi.DefaultCHID, logrus.NewEntry(logger))
	t0 := time.Unix(1000, 0)
	f.now = func() time.Time { return t0 }
	a := newGuest(t, f, "vm-a", 0xA)
	b := newGuest(t, f, "vm-b", 0xB)
	tok := register(t, a.dev, dmbGPA, 4096, 0xB, 0)
	for range 1000 {
		a.dev.Handle(move(tok, 0, 0, 1, false), [][]byte{{1}}) // A is not the rgid
	}
	b.dev.Handle(move(tok, 0, 4096, 1, false), [][]byte{{1}})
	entries := hook.AllEntries()
	var fromA, fromB int
	for _, e := range entries {
		if e.Data["op"] != "MOVE" {
			t.Errorf("line without op: %v", e.Data)
		}
		switch e.Data["vm"] {
		case "vm-a":
			fromA++
			if e.Data["gid"] != "0x000000000000000a" || e.Level != logrus.WarnLevel || e.Data["status"] != uint32(abi.StatusPermission) {
				t.Errorf("line %v %v", e.Level, e.Data)
			}
		case "vm-b":
			fromB++
		default:
			t.Errorf("line without vm: %v", e.Data)
		}
	}
	if fromA != logBurst || fromB != 1 {
		t.Fatalf("%d lines from A, %d from B; want %d and 1", fromA, fromB, logBurst)
	}
	// A period later, one more line, which tells how many were left out.
	t0 = t0.Add(logEvery)
	a.dev.Handle(move(tok, 0, 0, 1, false), [][]byte{{1}})
	last := hook.LastEntry()
	if len(hook.AllEntries()) != len(entries)+1 || last.Data["suppressed"] != uint64(1000-logBurst) {
		t.Fatalf("after a period: %d lines, last %v", len(hook.AllEntries()), last.Data)
	}
	if got := a.dev.Stats().Refused[abi.StatusPermission]; got != 1001 {
		t.Fatalf("%d refusals counted", got)
	}
}

// A guest that resets its device between refusals gets a new Device each
// time but no fresh allowance: the limiter is its name's.
func TestRefusalLoggingAcrossResets(t *testing.T) {
	logger, hook := logtest.NewNullLogger()
	logger.SetLevel(logrus.DebugLevel)
	f := NewFabric(abi.DefaultCHID, logrus.NewEntry(logger))
	t0 := time.Unix(1000, 0)
	f.now = func() time.Time { return t0 }
	const resets = 50
	for range resets {
		g := newGuest(t, f, "vm-a", 0xA)
		g.dev.Handle(move(0x1234, 0, 0, 1, false), [][]byte{{1}}) // no such token
		g.dev.Disconnect()
	}
	if n := len(hook.AllEntries()); n == 0 || n > logBurst {
		t.Fatalf("%d resets, each with a refusal, gave %d lines; want 1 to %d", resets, n, logBurst)
	}
}
