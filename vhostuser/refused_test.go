package vhostuser

import (
	"encoding/binary"
	"net"
	"testing"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

type nopBackend struct{}

func (nopBackend) Features() uint64                 { return 0 }
func (nopBackend) NumQueues() int                   { return 2 }
func (nopBackend) ReadConfig(uint32, []byte) error  { return nil }
func (nopBackend) WriteConfig(uint32, []byte) error { return nil }
func (nopBackend) ShmemSizes() []uint64             { return nil }
func (nopBackend) Start(*Guest) error               { return nil }
func (nopBackend) Stop(*Guest)                      {}
func (nopBackend) Close()                           {}
func (nopBackend) HandleQueue(*Guest, *Queue)       {}

// TestRefusedMessagesLogRateLimited: a guest can make QEMU send a message
// the back-end refuses (a ring size that is not a power of two, which QEMU
// passes on as the guest wrote it) once per device start, in a loop. The
// warnings are rate-limited per connection: one line per message before.
func TestRefusedMessagesLogRateLimited(t *testing.T) {
	logger, hook := logtest.NewNullLogger()
	s := NewServer(logrus.NewEntry(logger))
	path := serveNop(t, s) // a fixed clock: no token comes back

	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const msgs = 100
	p := make([]byte, 8)
	binary.LittleEndian.PutUint32(p[4:], 100) // not a power of two
	for range msgs {
		if err := WriteMessage(c, ReqSetVringNum, flagVersion, p, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := getFeatures(c); err != nil {
		t.Fatal(err)
	}
	refused := countLines(hook, "refused")
	if refused == 0 || refused > logBurst {
		t.Fatalf("%d refused messages gave %d warnings, want 1 to %d", msgs, refused, logBurst)
	}
}
