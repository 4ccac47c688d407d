package smcnl

import (
	"encoding/binary"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeKernel answers requests on the other end of a datagram socket pair,
// as the kernel answers on a netlink socket: answer returns the datagrams
// to send back for one request.
type fakeKernel struct {
	t      *testing.T
	fd     int
	answer func(req message) [][]byte
	mu     sync.Mutex
	seen   []message
	wg     sync.WaitGroup
}

func newFakeKernel(t *testing.T, answer func(req message) [][]byte) (*conn, *fakeKernel) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	k := &fakeKernel{t: t, fd: fds[1], answer: answer}
	k.wg.Add(1)
	go k.serve()
	t.Cleanup(func() {
		unix.Shutdown(k.fd, unix.SHUT_RDWR)
		k.wg.Wait()
		unix.Close(k.fd)
	})
	return newConn(fds[0]), k
}

func (k *fakeKernel) serve() {
	defer k.wg.Done()
	buf := make([]byte, 1<<16)
	for {
		n, err := unix.Read(k.fd, buf)
		if err != nil || n == 0 {
			return
		}
		msgs, err := parseMessages(buf[:n])
		if err != nil || len(msgs) != 1 {
			k.t.Errorf("fake kernel: request %x: %v", buf[:n], err)
			return
		}
		req := msgs[0]
		req.Data = append([]byte(nil), req.Data...)
		k.mu.Lock()
		k.seen = append(k.seen, req)
		k.mu.Unlock()
		for _, d := range k.answer(req) {
			if _, err := unix.Write(k.fd, d); err != nil {
				k.t.Errorf("fake kernel: write: %v", err)
				return
			}
		}
	}
}

func (k *fakeKernel) requests() []message {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]message(nil), k.seen...)
}

func ackFor(req message, code unix.Errno, extMsg string) []byte {
	hdr := appendMessage(nil, req.Type, req.Flags, req.Seq, nil)
	data := append(errno(code), hdr...)
	flags := uint16(unix.NLM_F_CAPPED)
	if extMsg != "" {
		flags |= unix.NLM_F_ACK_TLVS
		data = append(data, at(unix.NLMSGERR_ATTR_MSG, cstr(extMsg))...)
	}
	return appendMessage(nil, unix.NLMSG_ERROR, flags, req.Seq, data)
}

func doneFor(req message, code unix.Errno) []byte {
	return appendMessage(nil, unix.NLMSG_DONE, unix.NLM_F_MULTI, req.Seq, errno(code))
}

func TestExecuteDump(t *testing.T) {
	c, _ := newFakeKernel(t, func(req message) [][]byte {
		stale := genlMsg(0x1d, cmdDumpUEID, req.Seq-1, unix.NLM_F_MULTI, at(eidEntry, cstr("OLD")))
		one := genlMsg(0x1d, cmdDumpUEID, req.Seq, unix.NLM_F_MULTI, at(eidEntry, cstr("A")))
		two := genlMsg(0x1d, cmdDumpUEID, req.Seq, unix.NLM_F_MULTI, at(eidEntry, cstr("B")))
		// Two datagrams, as a dump larger than one skb comes.
		return [][]byte{append(append(stale, one...), two...), doneFor(req, 0)}
	})
	defer c.close()
	msgs, err := c.execute(0x1d, unix.NLM_F_DUMP, genlPayload(cmdDumpUEID, 1, nil))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range msgs {
		_, a, err := splitGenl(m)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, decodeUEIDs([][]attr{a})...)
	}
	if !reflect.DeepEqual(names, []string{"A", "B"}) {
		t.Fatalf("dump gave %q", names)
	}
}

func TestExecuteErrors(t *testing.T) {
	c, _ := newFakeKernel(t, func(req message) [][]byte {
		switch req.Data[0] {
		case 1:
			return [][]byte{doneFor(req, unix.ENOBUFS)}
		case 2:
			return [][]byte{append(genlMsg(0x1d, 2, req.Seq, unix.NLM_F_MULTI, nil), 0, 0, 0, 0)}
		case 3:
			return [][]byte{make([]byte, 70<<10)}
		}
		return [][]byte{ackFor(req, unix.EINVAL, "Attribute failed policy validation")}
	})
	defer c.close()
	if _, err := c.execute(0x1d, unix.NLM_F_DUMP, genlPayload(1, 1, nil)); !errors.Is(err, unix.ENOBUFS) {
		t.Errorf("failed dump: %v", err)
	}
	if _, err := c.execute(0x1d, unix.NLM_F_DUMP, genlPayload(2, 1, nil)); err == nil || !strings.Contains(err.Error(), "after the last message") {
		t.Errorf("trailing bytes: %v", err)
	}
	if _, err := c.execute(0x1d, unix.NLM_F_DUMP, genlPayload(3, 1, nil)); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("truncated reply: %v", err)
	}
	_, err := c.execute(0x1d, 0, genlPayload(10, 1, nil))
	var ke *Error
	if !errors.As(err, &ke) || ke.Errno != unix.EINVAL || !strings.Contains(err.Error(), "policy validation") {
		t.Errorf("error with extended ACK: %v", err)
	}
}

// smcKernel is a fake SMC module: the family, and a UEID table with the
// kernel's rules for duplicates and size.
func smcKernel(t *testing.T) *fakeKernel {
	var table [][]byte
	_, k := fakeDial(t, func(req message) [][]byte {
		if req.Type == unix.GENL_ID_CTRL {
			return [][]byte{
				appendMessage(nil, unix.GENL_ID_CTRL, 0, req.Seq, genlPayload(unix.CTRL_CMD_NEWFAMILY, 2,
					append(at(unix.CTRL_ATTR_FAMILY_NAME, cstr(familyName)), at(unix.CTRL_ATTR_FAMILY_ID, u16(0x1d))...))),
				ackFor(req, 0, ""),
			}
		}
		cmd, attrs, err := splitGenl(req)
		if err != nil || req.Type != 0x1d {
			t.Errorf("request %+v: %v", req, err)
			return [][]byte{ackFor(req, unix.EOPNOTSUPP, "")}
		}
		switch cmd {
		case cmdAddUEID:
			if len(attrs) != 1 || len(attrs[0].Data) != EIDLen+1 {
				return [][]byte{ackFor(req, unix.EINVAL, "")}
			}
			for _, e := range table {
				if string(e) == string(attrs[0].Data) {
					return [][]byte{ackFor(req, unix.EEXIST, "")}
				}
			}
			if len(table) == MaxUEIDs {
				return [][]byte{ackFor(req, unix.ERANGE, "")}
			}
			table = append(table, attrs[0].Data)
			return [][]byte{ackFor(req, 0, "")}
		case cmdFlushUEID:
			table = nil
			return [][]byte{ackFor(req, 0, "")}
		case cmdDumpUEID:
			var out [][]byte
			for _, e := range table {
				out = append(out, genlMsg(0x1d, cmdDumpUEID, req.Seq, unix.NLM_F_MULTI, at(eidEntry, e)))
			}
			return append(out, doneFor(req, 0))
		}
		return [][]byte{ackFor(req, unix.EOPNOTSUPP, "")}
	})
	return k
}

// fakeDial makes open() reach a fake kernel for the rest of the test.
func fakeDial(t *testing.T, answer func(req message) [][]byte) (*conn, *fakeKernel) {
	c, k := newFakeKernel(t, answer)
	old := dialGeneric
	dialGeneric = func() (*conn, error) {
		fd, err := unix.Dup(c.fd)
		if err != nil {
			return nil, err
		}
		return newConn(fd), nil
	}
	t.Cleanup(func() { dialGeneric = old; c.close() })
	return c, k
}

func TestUEIDTableFake(t *testing.T) {
	k := smcKernel(t)
	for _, n := range []string{"ISM-TEST", "B", "C", "D"} {
		if err := AddUEID(n); err != nil {
			t.Fatalf("AddUEID(%s): %v", n, err)
		}
	}
	if err := AddUEID("B"); !errors.Is(err, unix.EEXIST) || err.Error() != `smcnl: UEID "B" is already set: file exists` {
		t.Errorf("second AddUEID(B): %v", err)
	}
	if err := AddUEID("E"); !errors.Is(err, unix.ERANGE) || !strings.Contains(err.Error(), "full") {
		t.Errorf("fifth AddUEID: %v", err)
	}
	got, err := UEIDs()
	if err != nil || !reflect.DeepEqual(got, []string{"ISM-TEST", "B", "C", "D"}) {
		t.Fatalf("UEIDs() = %q, %v", got, err)
	}
	if err := FlushUEID(); err != nil {
		t.Fatal(err)
	}
	if got, err := UEIDs(); err != nil || len(got) != 0 {
		t.Fatalf("after flush UEIDs() = %q, %v", got, err)
	}
	// Every ADD_UEID on the wire was the padded EID and its NUL.
	for _, r := range k.requests() {
		if r.Type == 0x1d && r.Data[0] == cmdAddUEID {
			if l := binary.NativeEndian.Uint16(r.Data[genlHdrLen:]); l != attrHdrLen+EIDLen+1 {
				t.Errorf("ADD_UEID attribute length %d", l)
			}
		}
	}
}

func TestNotLoadedFake(t *testing.T) {
	fakeDial(t, func(req message) [][]byte { return [][]byte{ackFor(req, unix.ENOENT, "")} })
	if _, err := SMCDDevices(); !errors.Is(err, ErrNotLoaded) {
		t.Fatalf("SMCDDevices without the family: %v", err)
	}
}
