// Package abi defines the wire format between the ISM virtio device and its
// driver: the config space, the request and response of the request queue,
// the event of the event queue, the signalling block (SBA) and the status
// codes. Host (ismvirtio) and guest (guestdriver) both use it, so the two
// sides cannot drift apart. docs/device-abi.md is the prose version.
//
// Every multi-byte field is little-endian, as in the rest of virtio.
package abi

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"strings"
	"sync/atomic"
	"unsafe"
)

// Magic opens the config space: "ISMv" read as a little-endian u32. A driver
// must see it, and a known Version, before it drives the device: the virtio-id
// is a setting and may be shared with a foreign device.
const Magic uint32 = 0x764D5349

// Version is the ABI version this package speaks. Version 2 replaced the
// signalling block of version 1, whose words both sides read-modify-wrote
// (see SBA), with one that only the device writes.
const Version uint16 = 2

// DefaultVirtioID is the virtio device id offered by default. QEMU 11.1
// accepts it for vhost-user-test-device-pci and no Linux driver claims it.
const DefaultVirtioID = 38

// DefaultCHID is the channel id of the fabric. 0xFF00..0xFFFE are reserved
// for emulated ISM devices; 0xFFFF is Linux's loopback-ism.
const DefaultCHID uint16 = 0xFF00

// Queue layout: one request queue and one event queue.
const (
	RequestQueue = 0
	EventQueue   = 1
	NumQueues    = 2
)

// Modes offered in Config.Modes.
const (
	ModeCopy   uint16 = 1 << 0 // DMB in the owner's guest RAM; MOVE copies into it
	ModeAttach uint16 = 1 << 1 // DMB in host memory mapped into the shared-memory BAR
)

// ParseModes reads modes as flags and arguments spell them: "copy",
// "attach" or both, comma-separated.
func ParseModes(s string) (uint16, error) {
	var m uint16
	for _, w := range strings.Split(s, ",") {
		switch strings.TrimSpace(w) {
		case "copy":
			m |= ModeCopy
		case "attach":
			m |= ModeAttach
		default:
			return 0, fmt.Errorf("mode %q: want copy, attach or copy,attach", w)
		}
	}
	return m, nil
}

// ModesString spells modes as ParseModes reads them.
func ModesString(m uint16) string {
	var w []string
	if m&ModeCopy != 0 {
		w = append(w, "copy")
	}
	if m&ModeAttach != 0 {
		w = append(w, "attach")
	}
	return strings.Join(w, ",")
}

// Limits of this ABI version.
const (
	MaxDMBs    = 1920    // DMB indices 0..1919 in the SBA
	MaxDMBSize = 1 << 20 // largest DMB, as on s390 ISM
	MaxDMBEs   = 32      // DMBE indices 0..31 in a DMB's mask word
)

// Config space layout (ConfigSize bytes).
const (
	ConfigSize = 64

	cfgMagic       = 0  // u32
	cfgVersion     = 4  // u16
	cfgModes       = 6  // u16
	cfgGID         = 8  // u64
	cfgCHID        = 16 // u16
	cfgReserved    = 18 // u16
	cfgMaxDMBs     = 20 // u32
	cfgMaxDMBSize  = 24 // u32
	cfgMaxMoveLen  = 28 // u32
	cfgShmSize     = 32 // u64
	cfgQueueSize   = 40 // u16: largest ring size the device accepts
	cfgHeartbeatMS = 42 // u16: the SBA heartbeat's period in ms, 0: none
	cfgConfigBytes = 48 // first reserved byte; 48..63 are zero
)

// Config is the decoded config space.
type Config struct {
	Magic      uint32
	Version    uint16
	Modes      uint16
	GID        uint64
	CHID       uint16
	MaxDMBs    uint32
	MaxDMBSize uint32
	MaxMoveLen uint32 // largest MOVE data length in one request
	ShmSize    uint64 // size of the shared-memory region (attach mode), 0 if none
	QueueSize  uint16
	// HeartbeatMS is how often (ms) the device adds one to the SBA's
	// heartbeat while it serves the driver; 0: it does not. A driver that
	// sees the count stand still for many periods while it waits knows the
	// backend is gone, without touching config space (which aborts QEMU
	// 11.1.3 once the backend is gone).
	HeartbeatMS uint16
}

// Encode writes c into b, which must be ConfigSize bytes.
func (c *Config) Encode(b []byte) {
	_ = b[ConfigSize-1]
	clear(b[:ConfigSize])
	le := binary.LittleEndian
	le.PutUint32(b[cfgMagic:], c.Magic)
	le.PutUint16(b[cfgVersion:], c.Version)
	le.PutUint16(b[cfgModes:], c.Modes)
	le.PutUint64(b[cfgGID:], c.GID)
	le.PutUint16(b[cfgCHID:], c.CHID)
	le.PutUint32(b[cfgMaxDMBs:], c.MaxDMBs)
	le.PutUint32(b[cfgMaxDMBSize:], c.MaxDMBSize)
	le.PutUint32(b[cfgMaxMoveLen:], c.MaxMoveLen)
	le.PutUint64(b[cfgShmSize:], c.ShmSize)
	le.PutUint16(b[cfgQueueSize:], c.QueueSize)
	le.PutUint16(b[cfgHeartbeatMS:], c.HeartbeatMS)
}

// DecodeConfig parses a config space and checks magic and version.
func DecodeConfig(b []byte) (Config, error) {
	if len(b) < ConfigSize {
		return Config{}, fmt.Errorf("abi: config space is %d bytes, want %d", len(b), ConfigSize)
	}
	le := binary.LittleEndian
	c := Config{
		Magic:      le.Uint32(b[cfgMagic:]),
		Version:    le.Uint16(b[cfgVersion:]),
		Modes:      le.Uint16(b[cfgModes:]),
		GID:        le.Uint64(b[cfgGID:]),
		CHID:       le.Uint16(b[cfgCHID:]),
		MaxDMBs:    le.Uint32(b[cfgMaxDMBs:]),
		MaxDMBSize: le.Uint32(b[cfgMaxDMBSize:]),
		MaxMoveLen: le.Uint32(b[cfgMaxMoveLen:]),
		ShmSize:    le.Uint64(b[cfgShmSize:]),
		QueueSize:  le.Uint16(b[cfgQueueSize:]),

		HeartbeatMS: le.Uint16(b[cfgHeartbeatMS:]),
	}
	if c.Magic != Magic {
		return c, fmt.Errorf("abi: config magic %#x, want %#x: not an ISM device", c.Magic, Magic)
	}
	if c.Version != Version {
		return c, fmt.Errorf("abi: device speaks ABI version %d, driver speaks %d", c.Version, Version)
	}
	return c, nil
}

// Op is a request-queue operation.
type Op uint16

const (
	OpRegisterDMB   Op = 1 // Addr=GPA (copy mode; 0 with FlagAttach), Len, GID=rgid, Index=DMB index -> Value=token (attach mode: Index=region offset in ShmPages)
	OpUnregisterDMB Op = 2 // Token
	OpMove          Op = 3 // Token, Index=DMBE, Offset, Len, Flags&FlagSignal; data follows the header
	OpSignal        Op = 4 // GID=rgid, Index=event code, Offset=info: a software event for rgid
	OpQueryRGID     Op = 5 // GID=rgid: OK if reachable through this device
	OpSetSBA        Op = 6 // Addr=GPA of the SBA (SBASize bytes), Flags&FlagInterrupts
	OpAttachDMB     Op = 7 // Token of an attach-mode DMB whose rgid is the caller -> Value=offset in the shared-memory region, Index=DMB length
	OpDetachDMB     Op = 8 // Token
)

func (o Op) String() string {
	switch o {
	case OpRegisterDMB:
		return "REGISTER_DMB"
	case OpUnregisterDMB:
		return "UNREGISTER_DMB"
	case OpMove:
		return "MOVE"
	case OpSignal:
		return "SIGNAL"
	case OpQueryRGID:
		return "QUERY_RGID"
	case OpSetSBA:
		return "SET_SBA"
	case OpAttachDMB:
		return "ATTACH_DMB"
	case OpDetachDMB:
		return "DETACH_DMB"
	}
	return fmt.Sprintf("OP(%d)", uint16(o))
}

// Request flags.
const (
	FlagSignal     uint16 = 1 << 0 // MOVE: set the DMBE bit and interrupt the owner
	FlagInterrupts uint16 = 1 << 0 // SET_SBA: raise the event-queue interrupt on signals
	FlagAttach     uint16 = 1 << 0 // REGISTER_DMB: attach mode (host memory in the shared-memory region; Addr 0)
)

// ShmPage is the unit of the shared-memory region: every attach-mode DMB
// is mapped at a multiple of it and occupies whole pages. An attach-mode
// REGISTER_DMB returns the owner's offset in these units in Response.Index,
// so that the response stays 16 bytes (Value is the token); 32 bits of
// pages cover regions up to 16 TiB.
const ShmPage = 4096

// RequestSize is the size of the request header at the start of every chain.
const RequestSize = 48

// Request is the header of a request chain: the first RequestSize
// device-readable bytes. MOVE data follows it in the readable bytes; the
// chain ends in at least ResponseSize device-writable bytes.
type Request struct {
	Op     Op
	Flags  uint16
	Index  uint32 // REGISTER: DMB index; MOVE: DMBE index; SIGNAL: event code
	Token  uint64
	Offset uint64 // MOVE: byte offset in the DMB; SIGNAL: info
	Len    uint64 // REGISTER: DMB length; MOVE: data length
	GID    uint64 // REGISTER, QUERY_RGID, SIGNAL: the remote GID
	Addr   uint64 // REGISTER: GPA of the DMB; SET_SBA: GPA of the SBA
}

// Encode writes r into b[:RequestSize].
func (r *Request) Encode(b []byte) {
	_ = b[RequestSize-1]
	le := binary.LittleEndian
	le.PutUint16(b[0:], uint16(r.Op))
	le.PutUint16(b[2:], r.Flags)
	le.PutUint32(b[4:], r.Index)
	le.PutUint64(b[8:], r.Token)
	le.PutUint64(b[16:], r.Offset)
	le.PutUint64(b[24:], r.Len)
	le.PutUint64(b[32:], r.GID)
	le.PutUint64(b[40:], r.Addr)
}

// DecodeRequest parses a request header. It checks only the size: what the
// fields mean, and whether they are in range, is the device's to check.
func DecodeRequest(b []byte) (Request, error) {
	if len(b) < RequestSize {
		return Request{}, StatusInvalid
	}
	le := binary.LittleEndian
	return Request{
		Op:     Op(le.Uint16(b[0:])),
		Flags:  le.Uint16(b[2:]),
		Index:  le.Uint32(b[4:]),
		Token:  le.Uint64(b[8:]),
		Offset: le.Uint64(b[16:]),
		Len:    le.Uint64(b[24:]),
		GID:    le.Uint64(b[32:]),
		Addr:   le.Uint64(b[40:]),
	}, nil
}

// ResponseSize is the size of the response the device writes.
const ResponseSize = 16

// Response is written into the device-writable part of a request chain.
type Response struct {
	Status Status
	Index  uint32 // REGISTER: the DMB index, echoed (attach mode, on success: the region offset in ShmPages); ATTACH: the DMB length
	Value  uint64 // REGISTER: token; ATTACH: shared-memory offset
}

// Encode writes r into b[:ResponseSize].
func (r *Response) Encode(b []byte) {
	_ = b[ResponseSize-1]
	le := binary.LittleEndian
	le.PutUint32(b[0:], uint32(r.Status))
	le.PutUint32(b[4:], r.Index)
	le.PutUint64(b[8:], r.Value)
}

// DecodeResponse parses a response.
func DecodeResponse(b []byte) (Response, error) {
	if len(b) < ResponseSize {
		return Response{}, fmt.Errorf("abi: response is %d bytes, want %d", len(b), ResponseSize)
	}
	le := binary.LittleEndian
	return Response{
		Status: Status(le.Uint32(b[0:])),
		Index:  le.Uint32(b[4:]),
		Value:  le.Uint64(b[8:]),
	}, nil
}

// Status is a request's outcome. It is an error so that the device model can
// return it directly; StatusOK is never returned as an error.
type Status uint32

const (
	StatusOK          Status = 0
	StatusInvalid     Status = 1  // malformed request: sizes, flags, alignment
	StatusUnsupported Status = 2  // unknown op, or a mode the device does not offer
	StatusNoEntry     Status = 3  // unknown token, rgid not reachable, or DETACH of a DMB not attached
	StatusPermission  Status = 4  // not the DMB's rgid, or not its owner
	StatusRange       Status = 5  // offset/length outside the DMB, or over a limit
	StatusFault       Status = 6  // a guest-physical address outside guest RAM
	StatusNoSpace     Status = 7  // DMB limit reached
	StatusBusy        Status = 8  // DMB index already in use, or DMB already attached
	StatusNotReady    Status = 9  // SBA not set, or device not started
	StatusInternal    Status = 10 // the backend failed; logged on the host
)

var statusText = [...]string{
	StatusOK:          "ok",
	StatusInvalid:     "invalid request",
	StatusUnsupported: "unsupported",
	StatusNoEntry:     "no such token or GID",
	StatusPermission:  "permission denied",
	StatusRange:       "out of range",
	StatusFault:       "bad guest address",
	StatusNoSpace:     "no space",
	StatusBusy:        "busy",
	StatusNotReady:    "not ready",
	StatusInternal:    "internal error",
}

// statusNames are the statuses' names for machines: the stats file's and
// the metrics' labels.
var statusNames = [...]string{
	StatusOK:          "ok",
	StatusInvalid:     "invalid",
	StatusUnsupported: "unsupported",
	StatusNoEntry:     "no_entry",
	StatusPermission:  "permission",
	StatusRange:       "range",
	StatusFault:       "fault",
	StatusNoSpace:     "no_space",
	StatusBusy:        "busy",
	StatusNotReady:    "not_ready",
	StatusInternal:    "internal",
}

// Name is the status's snake_case name ("no_entry"), or "status_N" for a
// status this package does not know.
func (s Status) Name() string {
	if int(s) < len(statusNames) {
		return statusNames[s]
	}
	return fmt.Sprintf("status_%d", uint32(s))
}

func (s Status) Error() string {
	if int(s) < len(statusText) {
		return "ism: " + statusText[s]
	}
	return fmt.Sprintf("ism: status %d", uint32(s))
}

// EventType says what an event reports.
type EventType uint16

const (
	EventDMB EventType = 0 // a DMB the driver attached or wrote to is gone (and unmapped from its region): Token, GID = owner; Code DMBRevoked: also to the owner
	EventGID EventType = 1 // a peer device is gone: GID
	EventSWR EventType = 2 // a software event from SIGNAL: GID (sender), Code, Info
)

// Codes of an EventDMB.
const (
	// DMBGone: its owner unregistered it, reset or went away (attachers
	// only).
	DMBGone uint16 = 0
	// DMBRevoked: the device itself unregistered it (an operator's fault
	// injection). Sent to the owner (GID = its own GID) and to the rgid,
	// in either mode.
	DMBRevoked uint16 = 1
)

// EventSize is the size of an event the device writes into an event buffer.
const EventSize = 32

// Event is written by the device into a driver-posted buffer of the event queue.
type Event struct {
	Type  EventType
	Code  uint16
	Token uint64
	GID   uint64
	Info  uint64
}

// Encode writes e into b[:EventSize].
func (e *Event) Encode(b []byte) {
	_ = b[EventSize-1]
	le := binary.LittleEndian
	le.PutUint16(b[0:], uint16(e.Type))
	le.PutUint16(b[2:], e.Code)
	le.PutUint32(b[4:], 0)
	le.PutUint64(b[8:], e.Token)
	le.PutUint64(b[16:], e.GID)
	le.PutUint64(b[24:], e.Info)
}

// DecodeEvent parses an event.
func DecodeEvent(b []byte) (Event, error) {
	if len(b) < EventSize {
		return Event{}, fmt.Errorf("abi: event is %d bytes, want %d", len(b), EventSize)
	}
	le := binary.LittleEndian
	return Event{
		Type:  EventType(le.Uint16(b[0:])),
		Code:  le.Uint16(b[2:]),
		Token: le.Uint64(b[8:]),
		GID:   le.Uint64(b[16:]),
		Info:  le.Uint64(b[24:]),
	}, nil
}

// The signalling block (SBA) lives in guest RAM at the GPA given by SET_SBA,
// SBASize bytes, 4096-byte aligned, contiguous. From SET_SBA until the device
// is reset only the device writes it; the driver reads it and compares what it
// reads with its own copies (as a driver compares the used ring's idx with its
// last-seen one). The driver hands the block over zeroed. Every field is a
// little-endian u32 counter that wraps; a signalled MOVE into DMB index i with
// DMBE index e adds one to, in this order:
//
//	dmbe[i][e]   u16 at SBADMBEOffset + 64*i + 2*e   (in its aligned u32)
//	seq[i]       u32 at SBASeqOffset + 4*i
//	group[i/64]  u32 at SBAGroupOffset + 4*(i/64)
//	sum          u32 at SBASumOffset
//
// One more counter stands apart: heartbeat, u32 at SBAHeartbeatOffset, which
// the device sets to one more than it last set it every Config.HeartbeatMS
// while the device is started and the SBA set.
//
// A driver reads in the reverse order (sum, then the groups that changed,
// then the seqs of their DMBs, then the DMBE counts of the DMBs whose seq
// changed) and so never misses a signal: whatever it sees of a later field
// was preceded by the earlier ones. Version 1 had the device OR bits into
// words the driver claimed by swapping them with zero; QEMU's single-threaded
// TCG makes that swap a plain load and store, which loses the device's bits
// (../shared/notes/tcg-shared-memory.md).
const (
	SBASumOffset       = 0
	SBAHeartbeatOffset = 4
	SBAGroupOffset     = 64
	SBAGroups          = (MaxDMBs + 63) / 64 // 30
	SBASeqOffset       = SBAGroupOffset + 4*32
	SBADMBEOffset      = 8192
	SBASize            = SBADMBEOffset + 2*MaxDMBEs*MaxDMBs // 131072
	SBAAlign           = 4096                               // SET_SBA's GPA is a multiple of it
)

// SBA is a view of a signalling block. The device side calls Signal; the
// driver side only loads. All accesses are atomic on aligned words, so the
// view needs a 4-byte aligned start (NewSBA checks).
type SBA struct{ b []byte }

// NewSBA returns a view of b, which must be at least SBASize bytes and
// 4-byte aligned in host memory.
func NewSBA(b []byte) (SBA, error) {
	if len(b) < SBASize {
		return SBA{}, fmt.Errorf("abi: SBA of %d bytes, want %d", len(b), SBASize)
	}
	if uintptr(unsafe.Pointer(&b[0]))%4 != 0 {
		return SBA{}, fmt.Errorf("abi: SBA view is not 4-byte aligned")
	}
	return SBA{b[:SBASize]}, nil
}

func (s SBA) word(off int) *uint32 { return (*uint32)(unsafe.Pointer(&s.b[off])) }

// load reads a little-endian counter atomically.
func (s SBA) load(off int) uint32 { return fromLE32(atomic.LoadUint32(s.word(off))) }

// add adds one to the little-endian counter at off (a multiple of 4).
func (s SBA) add(off int) {
	if !bigEndianHost {
		atomic.AddUint32(s.word(off), 1)
		return
	}
	w := s.word(off)
	for {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, toLE32(fromLE32(old)+1)) {
			return
		}
	}
}

// Signal records a signal of DMBE e (< MaxDMBEs) of DMB index i (< MaxDMBs),
// in the order the ABI gives. Only the device calls it; the device may call it
// from many goroutines at once (its writes are atomic), the driver never.
func (s SBA) Signal(i, e uint32) {
	off := SBADMBEOffset + 2*(MaxDMBEs*int(i)+int(e))
	w := s.word(off &^ 3)
	shift := 16 * uint(off&2/2) // the u16's place in its little-endian u32
	for {
		old := atomic.LoadUint32(w)
		v := fromLE32(old)
		v = v&^(0xffff<<shift) | (v>>shift+1)&0xffff<<shift
		if atomic.CompareAndSwapUint32(w, old, toLE32(v)) {
			break
		}
	}
	s.add(SBASeqOffset + 4*int(i))
	s.add(SBAGroupOffset + 4*int(i/64))
	s.add(SBASumOffset)
}

// Beat stores n as the heartbeat. Only the device calls it, from one
// goroutine per device, with one more than it stored last: it keeps the
// count itself and never reads the driver's memory back.
func (s SBA) Beat(n uint32) { atomic.StoreUint32(s.word(SBAHeartbeatOffset), toLE32(n)) }

// Heartbeat is the heartbeat count (the driver's side of Beat).
func (s SBA) Heartbeat() uint32 { return s.load(SBAHeartbeatOffset) }

// Sum is the count of all signals.
func (s SBA) Sum() uint32 { return s.load(SBASumOffset) }

// Group is the count of signals into DMB indices 64*g .. 64*g+63.
func (s SBA) Group(g int) uint32 { return s.load(SBAGroupOffset + 4*g) }

// Seq is the count of signals into DMB index i.
func (s SBA) Seq(i uint32) uint32 { return s.load(SBASeqOffset + 4*int(i)) }

// DMBECount is the count (mod 65536) of signals of DMBE e of DMB index i.
func (s SBA) DMBECount(i, e uint32) uint16 {
	off := SBADMBEOffset + 2*(MaxDMBEs*int(i)+int(e))
	return uint16(s.load(off&^3) >> (16 * uint(off&2/2)))
}

var bigEndianHost = binary.NativeEndian.Uint16([]byte{0, 1}) == 1

func toLE32(v uint32) uint32 {
	if bigEndianHost {
		return bits.ReverseBytes32(v)
	}
	return v
}

func fromLE32(v uint32) uint32 { return toLE32(v) }
