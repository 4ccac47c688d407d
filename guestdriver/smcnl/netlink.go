package smcnl

// A small netlink client: one request, its replies up to the ACK or the end of
// the dump. Every length in a reply is checked before it is used; the kernel
// is trusted, but this is still a parser of bytes from outside the program.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

const (
	nlHdrLen   = unix.NLMSG_HDRLEN // struct nlmsghdr
	genlHdrLen = unix.GENL_HDRLEN  // struct genlmsghdr: cmd, version, reserved u16
	attrHdrLen = 4                 // struct nlattr: len u16, type u16

	// replyTimeout bounds a wait for the kernel, which answers at once: it
	// only matters if something is badly wrong, and then a guest tool must
	// not hang.
	replyTimeout = 5 * time.Second
	// maxReplies bounds one dump, far above what SMC sends (4 UEIDs, a few
	// devices, a socket per connection).
	maxReplies = 1 << 16
)

func align4(n int) int { return (n + 3) &^ 3 }

// attr is one netlink attribute, its type without the NESTED and
// NET_BYTEORDER flags.
type attr struct {
	Type uint16
	Data []byte
}

// appendAttr appends an attribute with its padding.
func appendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(attrHdrLen+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// parseAttrs splits a run of attributes. The last one may lack its padding
// (the kernel's own parser allows that); anything else that does not add up
// is an error.
func parseAttrs(b []byte) ([]attr, error) {
	var out []attr
	for len(b) > 0 {
		if len(b) < attrHdrLen {
			return nil, fmt.Errorf("%d bytes after the last attribute", len(b))
		}
		l := int(binary.NativeEndian.Uint16(b))
		if l < attrHdrLen || l > len(b) {
			return nil, fmt.Errorf("attribute length %d with %d bytes left", l, len(b))
		}
		typ := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		out = append(out, attr{Type: typ, Data: b[attrHdrLen:l:l]})
		b = b[min(align4(l), len(b)):]
	}
	return out, nil
}

// uint reads an unsigned attribute of 1, 2, 4 or 8 bytes whose value fits
// in bits. Accepting any of the four sizes copes with the kernel's own
// inconsistencies (SMC_NLA_LGR_D_CHID is declared u16 and sent as u32) and
// with its variable-size "uint" attributes, without accepting garbage.
func (a attr) uint(bits int) (uint64, error) {
	var v uint64
	switch len(a.Data) {
	case 1:
		v = uint64(a.Data[0])
	case 2:
		v = uint64(binary.NativeEndian.Uint16(a.Data))
	case 4:
		v = uint64(binary.NativeEndian.Uint32(a.Data))
	case 8:
		v = binary.NativeEndian.Uint64(a.Data)
	default:
		return 0, fmt.Errorf("attribute %d: %d bytes for an integer", a.Type, len(a.Data))
	}
	if bits < 64 && v>>bits != 0 {
		return 0, fmt.Errorf("attribute %d: %#x does not fit in %d bits", a.Type, v, bits)
	}
	return v, nil
}

// str reads a string attribute: up to its NUL (the kernel always sends one).
func (a attr) str() string {
	for i, c := range a.Data {
		if c == 0 {
			return string(a.Data[:i])
		}
	}
	return string(a.Data)
}

// message is one netlink message.
type message struct {
	Type, Flags uint16
	Seq, PortID uint32
	Data        []byte
}

// appendMessage appends a netlink message header and payload.
func appendMessage(b []byte, typ, flags uint16, seq uint32, payload []byte) []byte {
	b = binary.NativeEndian.AppendUint32(b, uint32(nlHdrLen+len(payload)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // port id: the kernel's
	b = append(b, payload...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// parseMessages splits one datagram into messages.
func parseMessages(b []byte) ([]message, error) {
	var out []message
	for len(b) > 0 {
		if len(b) < nlHdrLen {
			return nil, fmt.Errorf("%d bytes after the last message", len(b))
		}
		l := binary.NativeEndian.Uint32(b)
		if l < nlHdrLen || uint64(l) > uint64(len(b)) {
			return nil, fmt.Errorf("message length %d with %d bytes left", l, len(b))
		}
		out = append(out, message{
			Type:   binary.NativeEndian.Uint16(b[4:]),
			Flags:  binary.NativeEndian.Uint16(b[6:]),
			Seq:    binary.NativeEndian.Uint32(b[8:]),
			PortID: binary.NativeEndian.Uint32(b[12:]),
			Data:   b[nlHdrLen:l:l],
		})
		b = b[min(align4(int(l)), len(b)):]
	}
	return out, nil
}

// genlPayload is a generic netlink payload: genlmsghdr and attributes.
func genlPayload(cmd, version uint8, attrs []byte) []byte {
	return append([]byte{cmd, version, 0, 0}, attrs...)
}

// splitGenl returns a generic netlink message's command and attributes.
func splitGenl(m message) (cmd uint8, attrs []attr, err error) {
	if len(m.Data) < genlHdrLen {
		return 0, nil, fmt.Errorf("generic netlink message of %d bytes", len(m.Data))
	}
	attrs, err = parseAttrs(m.Data[genlHdrLen:])
	return m.Data[0], attrs, err
}

// Error is an error the kernel returned for a request, with its extended
// ACK message when it gave one ("Attribute failed policy validation").
// errors.Is(err, unix.EEXIST) and the like work on it.
type Error struct {
	Errno   unix.Errno
	Message string
}

func (e *Error) Error() string {
	if e.Message != "" {
		return fmt.Sprintf("%v (%s)", e.Errno, e.Message)
	}
	return e.Errno.Error()
}

func (e *Error) Unwrap() error { return e.Errno }

// parseError reads an NLMSG_ERROR payload: nil for an ACK. With
// NETLINK_CAP_ACK the request is echoed as its header only; the TLVs
// (NETLINK_EXT_ACK) follow it.
func parseError(m message) error {
	if len(m.Data) < 4+nlHdrLen {
		return fmt.Errorf("error message of %d bytes", len(m.Data))
	}
	code := int32(binary.NativeEndian.Uint32(m.Data))
	if code == 0 {
		return nil
	}
	if code > 0 || code < -4095 {
		return fmt.Errorf("error message with code %d", code)
	}
	e := &Error{Errno: unix.Errno(-code)}
	if m.Flags&unix.NLM_F_ACK_TLVS == 0 {
		return e
	}
	off := 4 + nlHdrLen
	if m.Flags&unix.NLM_F_CAPPED == 0 {
		// The whole request was echoed: skip it by its own length.
		l := binary.NativeEndian.Uint32(m.Data[4:])
		if l < nlHdrLen || uint64(l) > uint64(len(m.Data)-4) {
			return e
		}
		off = 4 + align4(int(l))
	}
	if off > len(m.Data) {
		return e
	}
	tlvs, err := parseAttrs(m.Data[off:])
	if err != nil {
		return e
	}
	for _, a := range tlvs {
		if a.Type == unix.NLMSGERR_ATTR_MSG {
			e.Message = a.str()
		}
	}
	return e
}

// conn is a netlink socket of one protocol.
type conn struct {
	fd     int
	portID uint32
	seq    uint32
	buf    []byte
}

func dial(proto int) (*conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	c := newConn(fd)
	// Best effort: older kernels lack them, and they only improve errors.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	tv := unix.NsecToTimeval(replyTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		c.close()
		return nil, os.NewSyscallError("setsockopt", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		c.close()
		return nil, os.NewSyscallError("bind", err)
	}
	// Connected to the kernel (port 0), requests are plain writes, and the
	// tests can put a fake kernel at the other end of a socket pair.
	if err := unix.Connect(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		c.close()
		return nil, os.NewSyscallError("connect", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		c.close()
		return nil, os.NewSyscallError("getsockname", err)
	}
	if nl, ok := sa.(*unix.SockaddrNetlink); ok {
		c.portID = nl.Pid
	}
	return c, nil
}

func newConn(fd int) *conn {
	return &conn{fd: fd, seq: uint32(time.Now().UnixNano()), buf: make([]byte, 64<<10)}
}

func (c *conn) close() error { return unix.Close(c.fd) }

// execute sends one request and collects its replies: up to NLMSG_DONE for
// a dump, up to the ACK otherwise (the request asks for one).
func (c *conn) execute(typ, flags uint16, payload []byte) ([]message, error) {
	c.seq++
	dump := flags&unix.NLM_F_DUMP == unix.NLM_F_DUMP
	flags |= unix.NLM_F_REQUEST
	if !dump {
		flags |= unix.NLM_F_ACK
	}
	req := appendMessage(nil, typ, flags, c.seq, payload)
	if _, err := unix.Write(c.fd, req); err != nil {
		return nil, os.NewSyscallError("write", err)
	}
	var out []message
	for {
		n, _, rflags, _, err := unix.Recvmsg(c.fd, c.buf, nil, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) {
				return nil, fmt.Errorf("no answer from the kernel in %v", replyTimeout)
			}
			return nil, os.NewSyscallError("recvmsg", err)
		}
		if rflags&unix.MSG_TRUNC != 0 {
			return nil, fmt.Errorf("reply larger than %d bytes", len(c.buf))
		}
		msgs, err := parseMessages(c.buf[:n])
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Seq != c.seq || (m.PortID != 0 && m.PortID != c.portID) {
				continue // a late answer to an earlier request
			}
			switch m.Type {
			case unix.NLMSG_NOOP:
			case unix.NLMSG_ERROR:
				if err := parseError(m); err != nil {
					return nil, err
				}
				if !dump {
					return out, nil
				}
			case unix.NLMSG_DONE:
				// A dump that failed part-way says so here.
				if len(m.Data) >= 4 {
					if code := int32(binary.NativeEndian.Uint32(m.Data)); code < 0 && code >= -4095 {
						return nil, &Error{Errno: unix.Errno(-code)}
					}
				}
				return out, nil
			case unix.NLMSG_OVERRUN:
				return nil, errors.New("netlink overrun")
			default:
				// The reply proper: copy it out of the shared buffer.
				m.Data = append([]byte(nil), m.Data...)
				out = append(out, m)
				if len(out) > maxReplies {
					return nil, fmt.Errorf("more than %d replies", maxReplies)
				}
			}
		}
	}
}
