package synopt

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// testProgram puts this test process into a new cgroup v2 child of its own
// and loads the program there, so that the host's other sockets never meet
// it. It skips, saying why, where that cannot be done: not root, or no
// cgroup2 mount.
func testProgram(t *testing.T) *Program {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skipf("the BPF program needs root (CAP_BPF, CAP_NET_ADMIN, cgroup writes); uid is %d", os.Getuid())
	}
	p, err := LoadInChildCgroup(fmt.Sprintf("ism-synopt-test-%d", os.Getpid()))
	if errors.Is(err, ErrNoCgroup2) {
		t.Skipf("no cgroup v2 to attach to: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
	})
	return p
}

type side struct {
	p      *Program
	marked bool
	cookie uint64
}

func (s *side) control(listener bool) func(string, string, syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		if !s.marked {
			return nil
		}
		var err error
		if cerr := rc.Control(func(fd uintptr) { s.cookie, err = s.p.Mark(fd, listener) }); cerr != nil {
			return cerr
		}
		return err
	}
}

func result(t *testing.T, p *Program, c net.Conn) Record {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var r Record
	if cerr := rc.Control(func(fd uintptr) { r, err = p.Result(fd) }); cerr != nil {
		t.Fatal(cerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestProgramHandshakes runs real handshakes over loopback through the
// program: marked and unmarked clients and listeners in each combination,
// and checks each side's record and decision.
func TestProgramHandshakes(t *testing.T) {
	p := testProgram(t)
	type hcase struct {
		network, addr  string
		client, server bool
		clientErr      error // Decide on the client, if marked
		serverErr      error // Decide on the server, if marked
	}
	cases := []hcase{
		{"tcp4", "127.0.0.1:0", true, true, nil, nil},
		{"tcp4", "127.0.0.1:0", true, false, ErrPeerNoSMC, nil},
		{"tcp4", "127.0.0.1:0", false, true, nil, ErrPeerNoSMC},
		{"tcp4", "127.0.0.1:0", false, false, nil, nil},
	}
	if ln, err := net.Listen("tcp6", "[::1]:0"); err == nil {
		ln.Close()
		cases = append(cases, hcase{"tcp6", "[::1]:0", true, true, nil, nil}, hcase{"tcp6", "[::1]:0", false, true, nil, ErrPeerNoSMC})
	} else {
		t.Logf("no IPv6 loopback here (%v): IPv4 only", err)
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%s,client=%v,server=%v", c.network, c.client, c.server), func(t *testing.T) {
			srv := &side{p: p, marked: c.server}
			lc := net.ListenConfig{Control: srv.control(true)}
			ln, err := lc.Listen(context.Background(), c.network, c.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			if c.server {
				p.Unmark(srv.cookie)
			}
			cli := &side{p: p, marked: c.client}
			d := net.Dialer{Control: cli.control(false)}
			accepted := make(chan net.Conn, 1)
			go func() {
				a, err := ln.Accept()
				if err != nil {
					t.Error(err)
				}
				accepted <- a
			}()
			cc, err := d.Dial(c.network, ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			if c.client {
				p.Unmark(cli.cookie)
			}
			sc := <-accepted
			if sc == nil {
				t.FailNow()
			}
			defer sc.Close()
			cr, sr := result(t, p, cc), result(t, p, sc)
			t.Logf("client record: %v; server record: %v", cr, sr)
			if c.client {
				if err := Decide(true, cr); !errors.Is(err, c.clientErr) || (c.clientErr == nil) != (err == nil) {
					t.Errorf("client decision %v, want %v", err, c.clientErr)
				}
				if !cr.Sent() {
					t.Errorf("marked client's SYN did not carry the option: %v", cr)
				}
			} else if cr.Found {
				t.Errorf("unmarked client has a record: %v", cr)
			}
			if c.server {
				if err := Decide(false, sr); !errors.Is(err, c.serverErr) || (c.serverErr == nil) != (err == nil) {
					t.Errorf("server decision %v, want %v", err, c.serverErr)
				}
				// The saved SYN, parsed in Go, agrees with the program.
				if !sr.SavedSYN || sr.SYNOption != c.client || sr.Peer() != c.client {
					t.Errorf("server record %v, client marked %v", sr, c.client)
				}
			} else if sr.Found || sr.SavedSYN {
				t.Errorf("unmarked server has a record or a saved SYN: %v", sr)
			}
			// A second Result finds nothing: records are read once.
			if again := result(t, p, cc); again.Found {
				t.Errorf("client record read twice: %v", again)
			}
		})
	}
}

func TestOwnCgroupHere(t *testing.T) {
	dir, err := OwnCgroup()
	if errors.Is(err, ErrNoCgroup2) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err != nil {
		t.Fatalf("OwnCgroup() = %s: %v", dir, err)
	}
	if !strings.HasPrefix(dir, "/") {
		t.Fatalf("OwnCgroup() = %q, not absolute", dir)
	}
}

// TestLoadErrorSaysWhy: where the program cannot be used, Load returns a
// LoadError naming the step (as root, attaching to a directory that is no
// cgroup fails; otherwise creating the maps does, for want of CAP_BPF).
func TestLoadErrorSaysWhy(t *testing.T) {
	if _, err := Load(""); err == nil || !strings.Contains(err.Error(), "synopt: cgroup: ") {
		t.Fatalf("Load(\"\") = %v", err)
	}
	p, err := Load(t.TempDir())
	if err == nil {
		p.Close()
		t.Fatal("attached to a directory that is not a cgroup")
	}
	var le *LoadError
	if !errors.As(err, &le) || (le.Step != "attach" && le.Step != "maps" && le.Step != "load") {
		t.Fatalf("Load(tmpdir) = %v", err)
	}
	t.Logf("%v", err)
}
