package smcd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/ism-backend/ism-backend/guestdriver/smcd/synopt"
)

// The SMC TCP option decides, from the TCP handshake, whether CLC runs at
// all: a Dial whose SYN-ACK lacks it, and an accepted connection whose SYN
// lacked it, are plain TCP at once and send no CLC byte. Without the option
// program (EnableSYNOption not called, or it could not load) negotiation is
// in band, with its limits:
//   - a Dial to a plain TCP server puts a 92-byte Proposal into the
//     server's stream and, when the server speaks first, reads the server's
//     first 8 bytes as a CLC header (they are lost to the application);
//   - a plain client that sends fewer than 8 bytes and then waits, or one
//     that waits for the server to speak first, waits the handshake timeout
//     and then gets a 28-byte Decline before the application's data;
//   - a plain client that speaks first with 8 or more bytes works (its bytes
//     are replayed).
// Both ends must also agree on the mode: an option-mode Listener takes an
// in-band client's Proposal for application data, and an option-mode Dial to
// an in-band server falls back at once while that server waits for a
// Proposal.

var defaultOption atomic.Pointer[synopt.Program]

// EnableSYNOption loads the option program into this process's own cgroup
// v2 and makes it the default for every Dialer and Server that sets no
// SYNOption. Where it cannot be loaded (no CAP_BPF, no cgroup2, a kernel
// older than 5.10) it says so in one line to logf and negotiation stays in
// band. It returns the program, or nil. A second call returns the first
// call's program.
func EnableSYNOption(logf func(format string, args ...any)) *synopt.Program {
	enableOnce.Do(func() {
		dir, err := synopt.OwnCgroup()
		var p *synopt.Program
		if err == nil {
			p, err = synopt.Load(dir)
		}
		if err != nil {
			if logf != nil {
				logf("smcd: SMC TCP option unavailable, negotiating in band (a plain TCP peer sees CLC bytes): %v", err)
			}
			return
		}
		if logf != nil {
			logf("smcd: SMC TCP option program attached to cgroup %s", dir)
		}
		defaultOption.Store(p)
	})
	return defaultOption.Load()
}

var enableOnce sync.Once

// SYNOption returns the default option program, or nil (in band).
func SYNOption() *synopt.Program { return defaultOption.Load() }

func optionOr(p *synopt.Program) *synopt.Program {
	if p != nil {
		return p
	}
	return defaultOption.Load()
}

// marker marks the sockets a dial or listen creates (a dial may try several
// addresses) and unmarks them once connect or listen is done.
type marker struct {
	p        *synopt.Program
	listener bool
	mu       sync.Mutex
	cookies  []uint64
}

func (m *marker) control(rc syscall.RawConn) error {
	var err error
	if cerr := rc.Control(func(fd uintptr) {
		var c uint64
		if c, err = m.p.Mark(fd, m.listener); err == nil {
			m.mu.Lock()
			m.cookies = append(m.cookies, c)
			m.mu.Unlock()
		}
	}); cerr != nil {
		return cerr
	}
	return err
}

func (m *marker) done() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range m.cookies {
		m.p.Unmark(c)
	}
	m.cookies = nil
}

// markDialer returns a copy of nd whose sockets get marked, after any
// control function of the caller's.
func (m *marker) markDialer(nd net.Dialer) net.Dialer {
	prevCtx, prev := nd.ControlContext, nd.Control
	nd.Control = nil
	nd.ControlContext = func(ctx context.Context, network, address string, rc syscall.RawConn) error {
		var err error
		switch {
		case prevCtx != nil:
			err = prevCtx(ctx, network, address, rc)
		case prev != nil:
			err = prev(network, address, rc)
		}
		if err != nil {
			return err
		}
		return m.control(rc)
	}
	return nd
}

// optionRecord reads the option program's record of a connected socket.
func optionRecord(p *synopt.Program, c net.Conn) (synopt.Record, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return synopt.Record{}, fmt.Errorf("smcd: %T has no socket for the SMC option record", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return synopt.Record{}, err
	}
	var r synopt.Record
	if cerr := rc.Control(func(fd uintptr) { r, err = p.Result(fd) }); cerr != nil {
		return r, cerr
	}
	return r, err
}

// optionDecision reads the record and decides: nil to run CLC, or the
// reason for plain TCP (code DeclinePeerNoSMC, as Linux's
// SMC_CLC_DECL_PEERNOSMC for a peer whose handshake lacked the option).
func optionDecision(p *synopt.Program, c net.Conn, active bool) (*synopt.Record, *DeclineError, error) {
	r, err := optionRecord(p, c)
	if err != nil {
		return nil, nil, err
	}
	if why := synopt.Decide(active, r); why != nil {
		return &r, &DeclineError{Code: DeclinePeerNoSMC, Remote: errors.Is(why, synopt.ErrPeerNoSMC), Err: why}, nil
	}
	return &r, nil, nil
}
