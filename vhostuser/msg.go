package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// Front-end requests (QEMU -> back-end), numbered as in QEMU's
// docs/interop/vhost-user.rst.
const (
	ReqGetFeatures         = 1
	ReqSetFeatures         = 2
	ReqSetOwner            = 3
	ReqResetOwner          = 4
	ReqSetMemTable         = 5
	ReqSetLogBase          = 6
	ReqSetLogFD            = 7
	ReqSetVringNum         = 8
	ReqSetVringAddr        = 9
	ReqSetVringBase        = 10
	ReqGetVringBase        = 11
	ReqSetVringKick        = 12
	ReqSetVringCall        = 13
	ReqSetVringErr         = 14
	ReqGetProtocolFeatures = 15
	ReqSetProtocolFeatures = 16
	ReqGetQueueNum         = 17
	ReqSetVringEnable      = 18
	ReqSetBackendReqFD     = 21
	ReqGetConfig           = 24
	ReqSetConfig           = 25
	ReqResetDevice         = 34
	ReqGetMaxMemSlots      = 36
	ReqAddMemReg           = 37
	ReqRemMemReg           = 38
	ReqSetStatus           = 39
	ReqGetStatus           = 40
	ReqGetShmemConfig      = 44
)

// Back-end requests (back-end -> QEMU) on the channel from SET_BACKEND_REQ_FD.
const (
	BackendReqShmemMap   = 9
	BackendReqShmemUnmap = 10
)

// Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
const (
	ProtocolMQ                = 0
	ProtocolReplyAck          = 3
	ProtocolBackendReq        = 5
	ProtocolConfig            = 9
	ProtocolBackendSendFD     = 10
	ProtocolResetDevice       = 13
	ProtocolConfigureMemSlots = 15
	ProtocolStatus            = 16
	// ProtocolShmem is VHOST_USER_PROTOCOL_F_SHMEM as QEMU 11.1.3 numbers it
	// (observed; the bit was 20 in earlier drafts and is silently dropped).
	ProtocolShmem = 22
)

// Virtio feature bits the library itself implements or carries.
const (
	FeatureRingIndirectDesc = 28
	FeatureRingEventIdx     = 29
	FeatureProtocolFeatures = 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FeatureVersion1         = 32
)

// Header flags.
const (
	flagVersionMask = 0x3
	flagVersion     = 0x1
	flagReply       = 0x4
	flagNeedReply   = 0x8
)

const (
	headerSize = 12
	// maxPayload bounds any message this library accepts; the largest
	// legitimate one is GET/SET_CONFIG with 256 bytes of config.
	maxPayload = 4096
	// maxFDs is the most fds one message may carry (SET_MEM_TABLE's 8).
	maxFDs = 8
	// memTableMaxRegions is VHOST_MEMORY_BASELINE_NREGIONS.
	memTableMaxRegions = 8
	// maxConfigSize is VHOST_USER_MAX_CONFIG_SIZE.
	maxConfigSize = 256
	configHdrSize = 12
	memRegionSize = 32
	vringAddrSize = 40
	vringStateSz  = 8
	shmemMsgSize  = 40
	// vringFDNoFD is bit 8 of the u64 in SET_VRING_KICK/CALL/ERR: no fd.
	vringFDNoFD = 1 << 8
)

// Message is one decoded vhost-user message. FDs are owned by the receiver
// of the Message: whoever decodes it must close what it does not keep.
type Message struct {
	Request uint32
	Flags   uint32
	Payload []byte
	FDs     []int
}

// NeedReply reports whether the sender asked for a REPLY_ACK.
func (m *Message) NeedReply() bool { return m.Flags&flagNeedReply != 0 }

// CloseFDs closes every fd still held by the message.
func (m *Message) CloseFDs() {
	for _, fd := range m.FDs {
		unix.Close(fd)
	}
	m.FDs = nil
}

// ErrMalformed wraps every framing or layout error: the connection that sent
// it cannot be trusted to stay in sync and is closed.
var ErrMalformed = errors.New("vhost-user: malformed message")

func malformed(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, a...))
}

// shape says what a request must look like: exact payload size (or a rule)
// and exact fd count.
type shape struct {
	name string
	// size is the exact payload size, or -1 when check decides.
	size  int
	fds   int
	check func(p []byte, nfds int) error
}

func exact(name string, size, fds int) shape { return shape{name: name, size: size, fds: fds} }

// frontendShapes lists the requests this back-end understands. Sizes follow
// what QEMU sends: requests without a body have size 0.
var frontendShapes = map[uint32]shape{
	ReqGetFeatures:         exact("GET_FEATURES", 0, 0),
	ReqSetFeatures:         exact("SET_FEATURES", 8, 0),
	ReqSetOwner:            exact("SET_OWNER", 0, 0),
	ReqResetOwner:          exact("RESET_OWNER", 0, 0),
	ReqSetMemTable:         {name: "SET_MEM_TABLE", size: -1, check: checkMemTable},
	ReqSetVringNum:         exact("SET_VRING_NUM", vringStateSz, 0),
	ReqSetVringAddr:        exact("SET_VRING_ADDR", vringAddrSize, 0),
	ReqSetVringBase:        exact("SET_VRING_BASE", vringStateSz, 0),
	ReqGetVringBase:        exact("GET_VRING_BASE", vringStateSz, 0),
	ReqSetVringKick:        {name: "SET_VRING_KICK", size: -1, check: checkVringFD},
	ReqSetVringCall:        {name: "SET_VRING_CALL", size: -1, check: checkVringFD},
	ReqSetVringErr:         {name: "SET_VRING_ERR", size: -1, check: checkVringFD},
	ReqGetProtocolFeatures: exact("GET_PROTOCOL_FEATURES", 0, 0),
	ReqSetProtocolFeatures: exact("SET_PROTOCOL_FEATURES", 8, 0),
	ReqGetQueueNum:         exact("GET_QUEUE_NUM", 0, 0),
	ReqSetVringEnable:      exact("SET_VRING_ENABLE", vringStateSz, 0),
	ReqSetBackendReqFD:     exact("SET_BACKEND_REQ_FD", 0, 1),
	ReqGetConfig:           {name: "GET_CONFIG", size: -1, check: checkConfig},
	ReqSetConfig:           {name: "SET_CONFIG", size: -1, check: checkConfig},
	ReqResetDevice:         exact("RESET_DEVICE", 0, 0),
	ReqGetMaxMemSlots:      exact("GET_MAX_MEM_SLOTS", 0, 0),
	ReqAddMemReg:           exact("ADD_MEM_REG", 8+memRegionSize, 1),
	// REM_MEM_REG: the spec says no fd, but some QEMU versions send the
	// region's fd along; accept 0 or 1 and close it.
	ReqRemMemReg: {name: "REM_MEM_REG", size: 8 + memRegionSize, check: func(p []byte, nfds int) error {
		if nfds > 1 {
			return malformed("REM_MEM_REG with %d fds", nfds)
		}
		return nil
	}},
	ReqSetStatus:      exact("SET_STATUS", 8, 0),
	ReqGetStatus:      exact("GET_STATUS", 0, 0),
	ReqGetShmemConfig: exact("GET_SHMEM_CONFIG", 0, 0),
}

// RequestName returns the spec name of a front-end request, for logs.
func RequestName(req uint32) string {
	if s, ok := frontendShapes[req]; ok {
		return s.name
	}
	return fmt.Sprintf("request(%d)", req)
}

func checkMemTable(p []byte, nfds int) error {
	if len(p) < 8 {
		return malformed("SET_MEM_TABLE payload %d bytes", len(p))
	}
	n := binary.LittleEndian.Uint32(p[0:4])
	if n == 0 || n > memTableMaxRegions {
		return malformed("SET_MEM_TABLE with %d regions", n)
	}
	if len(p) != 8+int(n)*memRegionSize {
		return malformed("SET_MEM_TABLE: %d regions in %d bytes", n, len(p))
	}
	if nfds != int(n) {
		return malformed("SET_MEM_TABLE: %d regions, %d fds", n, nfds)
	}
	return nil
}

func checkVringFD(p []byte, nfds int) error {
	if len(p) != 8 {
		return malformed("vring fd payload %d bytes", len(p))
	}
	v := binary.LittleEndian.Uint64(p)
	if v&^uint64(0xff|vringFDNoFD) != 0 {
		return malformed("vring fd value %#x", v)
	}
	want := 1
	if v&vringFDNoFD != 0 {
		want = 0
	}
	if nfds != want {
		return malformed("vring fd message with %d fds, want %d", nfds, want)
	}
	return nil
}

func checkConfig(p []byte, nfds int) error {
	if nfds != 0 {
		return malformed("config message with %d fds", nfds)
	}
	if len(p) < configHdrSize {
		return malformed("config payload %d bytes", len(p))
	}
	size := binary.LittleEndian.Uint32(p[4:8])
	if size > maxConfigSize || len(p) != configHdrSize+int(size) {
		return malformed("config size %d in %d bytes", size, len(p))
	}
	return nil
}

// validateFrontend checks a received front-end request against its shape.
// Unknown requests pass (known=false): the caller decides what to do.
func validateFrontend(m *Message) (known bool, err error) {
	if m.Flags&flagVersionMask != flagVersion {
		return false, malformed("version %d", m.Flags&flagVersionMask)
	}
	if m.Flags&^uint32(flagVersionMask|flagNeedReply) != 0 {
		return false, malformed("flags %#x", m.Flags)
	}
	s, ok := frontendShapes[m.Request]
	if !ok {
		return false, nil
	}
	if s.size >= 0 {
		if len(m.Payload) != s.size {
			return true, malformed("%s payload %d bytes, want %d", s.name, len(m.Payload), s.size)
		}
		if s.check == nil && len(m.FDs) != s.fds {
			return true, malformed("%s with %d fds, want %d", s.name, len(m.FDs), s.fds)
		}
	}
	if s.check != nil {
		if err := s.check(m.Payload, len(m.FDs)); err != nil {
			return true, err
		}
	}
	return true, nil
}

// DecodeHeader splits a 12-byte header. It is exported for fuzzing and for
// the test frontend.
func DecodeHeader(b []byte) (request, flags, size uint32, err error) {
	if len(b) < headerSize {
		return 0, 0, 0, malformed("header %d bytes", len(b))
	}
	request = binary.LittleEndian.Uint32(b[0:4])
	flags = binary.LittleEndian.Uint32(b[4:8])
	size = binary.LittleEndian.Uint32(b[8:12])
	if size > maxPayload {
		return 0, 0, 0, malformed("payload size %d", size)
	}
	return request, flags, size, nil
}

// DecodeFrontend decodes one front-end message from raw bytes plus the number
// of fds that came with it and validates its layout. It is the pure part of
// ReadMessage + validation, used by the fuzz target.
func DecodeFrontend(raw []byte, fds []int) (*Message, bool, error) {
	req, flags, size, err := DecodeHeader(raw)
	if err != nil {
		return nil, false, err
	}
	if len(raw)-headerSize != int(size) {
		return nil, false, malformed("truncated: %d of %d payload bytes", len(raw)-headerSize, size)
	}
	m := &Message{Request: req, Flags: flags, Payload: raw[headerSize:], FDs: fds}
	known, err := validateFrontend(m)
	return m, known, err
}

// ReadMessage reads one message with its fds from c. On error any fds
// received are closed. io.EOF (possibly wrapped) means the peer hung up
// cleanly between messages.
func ReadMessage(c *net.UnixConn) (*Message, error) {
	var hdr [headerSize]byte
	oob := make([]byte, unix.CmsgSpace(4*(maxFDs+1)))
	var fds []int
	closeFDs := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	got := 0
	for got < headerSize {
		n, oobn, flags, _, err := c.ReadMsgUnix(hdr[got:], oob)
		if oobn > 0 {
			more, perr := parseRights(oob[:oobn])
			fds = append(fds, more...)
			if perr != nil {
				closeFDs()
				return nil, perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			closeFDs()
			return nil, malformed("too many fds")
		}
		if err != nil {
			closeFDs()
			if got > 0 {
				return nil, malformed("truncated header: %v", err)
			}
			return nil, err
		}
		if n == 0 {
			closeFDs()
			if got > 0 {
				return nil, malformed("truncated header")
			}
			return nil, errEOF
		}
		got += n
	}
	req, flags, size, err := DecodeHeader(hdr[:])
	if err != nil {
		closeFDs()
		return nil, err
	}
	payload := make([]byte, size)
	got = 0
	for got < int(size) {
		n, oobn, mflags, _, err := c.ReadMsgUnix(payload[got:], oob)
		if oobn > 0 || mflags&unix.MSG_CTRUNC != 0 {
			// fds attached to the payload bytes rather than the header: no
			// sender does that; take them so they can be closed.
			more, _ := parseRights(oob[:oobn])
			fds = append(fds, more...)
			closeFDs()
			return nil, malformed("fds inside the payload")
		}
		if err != nil || n == 0 {
			closeFDs()
			return nil, malformed("truncated payload: %d of %d bytes", got, size)
		}
		got += n
	}
	if len(fds) > maxFDs {
		closeFDs()
		return nil, malformed("%d fds", len(fds))
	}
	return &Message{Request: req, Flags: flags, Payload: payload, FDs: fds}, nil
}

var errEOF = errors.New("vhost-user: peer closed the connection")

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, malformed("control message: %v", err)
	}
	var fds []int
	var bad error
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			bad = malformed("unexpected control message %d/%d", msgs[i].Header.Level, msgs[i].Header.Type)
			continue
		}
		r, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			bad = malformed("SCM_RIGHTS: %v", err)
			continue
		}
		fds = append(fds, r...)
	}
	return fds, bad
}

// WriteMessage sends one message (header, payload and fds in one sendmsg).
func WriteMessage(c *net.UnixConn, request, flags uint32, payload []byte, fds []int) error {
	buf := make([]byte, headerSize+len(payload))
	binary.LittleEndian.PutUint32(buf[0:4], request)
	binary.LittleEndian.PutUint32(buf[4:8], flags)
	binary.LittleEndian.PutUint32(buf[8:12], uint32(len(payload)))
	copy(buf[headerSize:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.WriteMsgUnix(buf, oob, nil)
	if err != nil {
		return err
	}
	if n != len(buf) || oobn != len(oob) {
		return fmt.Errorf("vhost-user: short write %d/%d", n, len(buf))
	}
	return nil
}

func u64(v uint64) []byte {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return b[:]
}
