package vhostusertest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/ism-backend/ism-backend/vhostuser"
	"golang.org/x/sys/unix"
)

// Flag bits of the vhost-user header.
const (
	FlagVersion   = 0x1
	FlagReply     = 0x4
	FlagNeedReply = 0x8
)

// Timeout bounds every wait of the Frontend so a broken back-end fails a
// test instead of hanging it. It is a safety net, not a measurement.
var Timeout = 20 * time.Second

// ShmemRequest is a SHMEM_MAP or SHMEM_UNMAP the back-end sent.
type ShmemRequest struct {
	Request   uint32 // vhostuser.BackendReqShmemMap or ...Unmap
	NeedReply bool
	ShmID     uint8
	FDOffset  uint64
	ShmOffset uint64
	Len       uint64
	Flags     uint64
	HadFD     bool
	// Seals of the fd that came with a MAP (F_GET_SEALS), -1 if none.
	Seals int
}

// Frontend plays QEMU on one connection.
type Frontend struct {
	Mem  *GuestMemory
	conn *net.UnixConn
	mu   sync.Mutex // one front-end request/reply at a time

	// What the back-end offered and what this front-end acked.
	OfferedFeatures, OfferedProtocol uint64
	Features, Protocol               uint64
	QueueNum                         uint64
	MaxMemSlots                      uint64
	ShmemSizes                       []uint64

	Queues []*VQ
	added  map[*Region]bool // regions the back-end has from ADD_MEM_REG

	// Back-end request channel (our end).
	bc      *net.UnixConn
	bcDone  chan struct{}
	shmemMu sync.Mutex
	shmem   []ShmemRequest
	shmemCh chan ShmemRequest
	// The front-end's mappings of SHMEM_MAP fds by shared-memory offset
	// (region 0), as QEMU maps them into the BAR; UNMAP removes them.
	shmMaps map[uint64][]byte
	shmRegs map[uint64]*Region // the mappings as memory-table regions (ADD_MEM_REG), by offset

	// HideShmemMaps makes the front-end answer SHMEM_MAP without adding
	// the mapping to the back-end's memory table after its reply, which
	// QEMU 11.1.3 does (ADD_MEM_REG when it commits the mapping into the
	// guest's address space, after it has answered).
	HideShmemMaps bool
	// BeforeShmemReply, if set, runs before a SHMEM_MAP/UNMAP is answered
	// (QEMU sends a SET_MEM_TABLE at that point). Set it before Handshake.
	BeforeShmemReply func(f *Frontend, r ShmemRequest) error
	// ShmemStatus is the u64 the front-end answers (0: success).
	ShmemStatus uint64
}

// Dial connects to a back-end socket. mem is the guest RAM to announce.
func Dial(path string, mem *GuestMemory) (*Frontend, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	return &Frontend{Mem: mem, conn: c, shmemCh: make(chan ShmemRequest, 64)}, nil
}

// Conn is the front-end socket, for raw malformed traffic.
func (f *Frontend) Conn() *net.UnixConn { return f.conn }

// Close closes the connection, the back-end channel and the queues' fds
// (not the guest memory).
func (f *Frontend) Close() {
	f.conn.Close()
	if f.bc != nil {
		f.bc.Close()
		<-f.bcDone
	}
	f.DropShmem()
	for _, q := range f.Queues {
		q.closeFDs()
	}
}

func (f *Frontend) acked(bit uint) bool { return f.Protocol&(1<<bit) != 0 }

// Request sends one message and, if the request has a reply (GET_*) or
// needReply is set with REPLY_ACK acked, reads it. It returns the reply
// payload (for an ack: the u64 status as an error if non-zero).
func (f *Frontend) Request(req uint32, payload []byte, fds []int, needReply bool) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.request(req, payload, fds, needReply)
}

func hasReply(req uint32) bool {
	switch req {
	case vhostuser.ReqGetFeatures, vhostuser.ReqGetProtocolFeatures, vhostuser.ReqGetQueueNum,
		vhostuser.ReqGetVringBase, vhostuser.ReqGetConfig, vhostuser.ReqGetMaxMemSlots,
		vhostuser.ReqGetStatus, vhostuser.ReqGetShmemConfig:
		return true
	}
	return false
}

func (f *Frontend) request(req uint32, payload []byte, fds []int, needReply bool) ([]byte, error) {
	flags := uint32(FlagVersion)
	ack := needReply && f.acked(vhostuser.ProtocolReplyAck) && !hasReply(req)
	if needReply && f.acked(vhostuser.ProtocolReplyAck) {
		flags |= FlagNeedReply
	}
	if err := vhostuser.WriteMessage(f.conn, req, flags, payload, fds); err != nil {
		return nil, err
	}
	if !hasReply(req) && !ack {
		return nil, nil
	}
	f.conn.SetReadDeadline(time.Now().Add(Timeout))
	defer f.conn.SetReadDeadline(time.Time{})
	m, err := vhostuser.ReadMessage(f.conn)
	if err != nil {
		return nil, fmt.Errorf("%s reply: %w", vhostuser.RequestName(req), err)
	}
	m.CloseFDs()
	if m.Request != req || m.Flags&FlagReply == 0 {
		return nil, fmt.Errorf("%s: reply for request %d flags %#x", vhostuser.RequestName(req), m.Request, m.Flags)
	}
	if ack {
		if len(m.Payload) != 8 {
			return nil, fmt.Errorf("%s: ack of %d bytes", vhostuser.RequestName(req), len(m.Payload))
		}
		if st := binary.LittleEndian.Uint64(m.Payload); st != 0 {
			return m.Payload, fmt.Errorf("%s: back-end answered status %d", vhostuser.RequestName(req), st)
		}
	}
	return m.Payload, nil
}

// SendRaw writes raw bytes (a whole or broken message) with fds.
func (f *Frontend) SendRaw(b []byte, fds []int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := f.conn.WriteMsgUnix(b, oob, nil)
	return err
}

// RawMessage encodes a header and payload without any checks.
func RawMessage(req, flags, size uint32, payload []byte) []byte {
	b := make([]byte, 12+len(payload))
	binary.LittleEndian.PutUint32(b[0:], req)
	binary.LittleEndian.PutUint32(b[4:], flags)
	binary.LittleEndian.PutUint32(b[8:], size)
	copy(b[12:], payload)
	return b
}

// WaitClosed waits until the back-end closes the connection (reads until
// EOF or error) and reports whether it did before Timeout.
func (f *Frontend) WaitClosed() bool {
	f.conn.SetReadDeadline(time.Now().Add(Timeout))
	defer f.conn.SetReadDeadline(time.Time{})
	buf := make([]byte, 4096)
	for {
		_, err := f.conn.Read(buf)
		if err != nil {
			var ne net.Error
			return !(errors.As(err, &ne) && ne.Timeout())
		}
	}
}

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}

func (f *Frontend) getU64(req uint32) (uint64, error) {
	r, err := f.request(req, nil, nil, false)
	if err != nil {
		return 0, err
	}
	if len(r) != 8 {
		return 0, fmt.Errorf("%s: reply of %d bytes", vhostuser.RequestName(req), len(r))
	}
	return binary.LittleEndian.Uint64(r), nil
}

// HandshakeOptions select what the front-end acks.
type HandshakeOptions struct {
	// ProtocolMask limits the acked protocol features (0: everything the
	// back-end offers that QEMU 11.1.3 knows, which is everything here).
	ProtocolMask uint64
	// NumQueues is how many queues to prepare (0: GET_QUEUE_NUM's answer).
	NumQueues int
}

// Handshake does what QEMU 11.1.3 does at device realize (observed): GET_FEATURES,
// GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
// GET_MAX_MEM_SLOTS (if CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD,
// SET_OWNER, GET_FEATURES, SET_VRING_CALL and SET_VRING_ERR per queue,
// GET_SHMEM_CONFIG (if SHMEM).
func (f *Frontend) Handshake(opt HandshakeOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var err error
	if f.OfferedFeatures, err = f.getU64(vhostuser.ReqGetFeatures); err != nil {
		return err
	}
	if f.OfferedFeatures&(1<<vhostuser.FeatureProtocolFeatures) == 0 {
		return errors.New("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES")
	}
	if f.OfferedProtocol, err = f.getU64(vhostuser.ReqGetProtocolFeatures); err != nil {
		return err
	}
	mask := opt.ProtocolMask
	if mask == 0 {
		mask = ^uint64(0)
	}
	f.Protocol = f.OfferedProtocol & mask
	if _, err := f.request(vhostuser.ReqSetProtocolFeatures, u64(f.Protocol), nil, false); err != nil {
		return err
	}
	if f.QueueNum, err = f.getU64(vhostuser.ReqGetQueueNum); err != nil {
		return err
	}
	if f.acked(vhostuser.ProtocolConfigureMemSlots) {
		if f.MaxMemSlots, err = f.getU64(vhostuser.ReqGetMaxMemSlots); err != nil {
			return err
		}
	}
	if f.acked(vhostuser.ProtocolBackendReq) {
		if err := f.setupBackendChannel(); err != nil {
			return err
		}
	}
	if _, err := f.request(vhostuser.ReqSetOwner, nil, nil, false); err != nil {
		return err
	}
	if _, err = f.getU64(vhostuser.ReqGetFeatures); err != nil {
		return err
	}
	n := opt.NumQueues
	if n == 0 {
		n = int(f.QueueNum)
	}
	for i := 0; i < n; i++ {
		q, err := newVQ(f, i)
		if err != nil {
			return err
		}
		f.Queues = append(f.Queues, q)
		if _, err := f.request(vhostuser.ReqSetVringCall, u64(uint64(i)), []int{q.CallFD}, true); err != nil {
			return err
		}
		if _, err := f.request(vhostuser.ReqSetVringErr, u64(uint64(i)), []int{q.ErrFD}, true); err != nil {
			return err
		}
	}
	if f.acked(vhostuser.ProtocolShmem) {
		r, err := f.request(vhostuser.ReqGetShmemConfig, nil, nil, false)
		if err != nil {
			return err
		}
		if len(r) < 8 {
			return fmt.Errorf("GET_SHMEM_CONFIG reply of %d bytes", len(r))
		}
		nr := binary.LittleEndian.Uint32(r)
		if len(r) < 8+8*int(nr) {
			return fmt.Errorf("GET_SHMEM_CONFIG: %d regions in %d bytes", nr, len(r))
		}
		f.ShmemSizes = nil
		for i := 0; i < int(nr); i++ {
			f.ShmemSizes = append(f.ShmemSizes, binary.LittleEndian.Uint64(r[8+8*i:]))
		}
	}
	return nil
}

// StartOptions shape the start sequence.
type StartOptions struct {
	// Features to ack (0: all offered).
	Features uint64
	// DriverOKStatus also sends SET_STATUS with DRIVER_OK after the rings.
	// QEMU 11.1.3 does not (it sends FEATURES_OK only); the back-end must
	// start on the enabled rings either way.
	DriverOKStatus bool
	// Queues the guest driver configured (nil: all), each with QueueSize
	// (0: 256). Every queue gets SET_VRING_ENABLE, as QEMU does.
	Queues    []int
	QueueSize uint16
}

// Start does what QEMU 11.1.3 does when the guest driver sets DRIVER_OK
// (observed through qtest, see TestRealQEMU): SET_FEATURES, GET_STATUS,
// SET_STATUS(+FEATURES_OK), the memory table (ADD_MEM_REG per region when
// CONFIGURE_MEM_SLOTS was acked, else SET_MEM_TABLE), per configured queue
// SET_VRING_NUM/BASE/ADDR/KICK/CALL, then SET_VRING_ENABLE 1 and
// SET_VRING_CALL for every queue.
func (f *Frontend) Start(opt StartOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	feat := opt.Features
	if feat == 0 {
		feat = f.OfferedFeatures
	}
	f.Features = feat
	if _, err := f.request(vhostuser.ReqSetFeatures, u64(feat), nil, false); err != nil {
		return err
	}
	if f.acked(vhostuser.ProtocolStatus) {
		if err := f.setStatus(vhostuser.StatusFeaturesOK); err != nil {
			return err
		}
	}
	if f.acked(vhostuser.ProtocolConfigureMemSlots) {
		// Like QEMU, send only what the back-end does not have yet.
		for _, r := range f.Mem.Regions {
			if f.added[r] {
				continue
			}
			if err := f.memReg(vhostuser.ReqAddMemReg, r); err != nil {
				return err
			}
		}
	} else if err := f.setMemTable(); err != nil {
		return err
	}
	qs := opt.Queues
	if qs == nil {
		for i := range f.Queues {
			qs = append(qs, i)
		}
	}
	size := opt.QueueSize
	if size == 0 {
		size = 256
	}
	for _, i := range qs {
		if i >= len(f.Queues) {
			return fmt.Errorf("no queue %d", i)
		}
		q := f.Queues[i]
		if err := q.setup(size); err != nil {
			return err
		}
		if err := f.startQueue(q); err != nil {
			return err
		}
	}
	for _, q := range f.Queues {
		if _, err := f.request(vhostuser.ReqSetVringEnable, vringState(q.Index, 1), nil, true); err != nil {
			return err
		}
	}
	for _, q := range f.Queues {
		if _, err := f.request(vhostuser.ReqSetVringCall, u64(uint64(q.Index)), []int{q.CallFD}, true); err != nil {
			return err
		}
	}
	if f.acked(vhostuser.ProtocolStatus) && opt.DriverOKStatus {
		if err := f.setStatus(vhostuser.StatusAcknowledge | vhostuser.StatusDriver | vhostuser.StatusDriverOK); err != nil {
			return err
		}
	}
	return nil
}

// Stop does what QEMU 11.1.3 does on a guest reset: SET_VRING_ENABLE 0 for
// every queue, then GET_VRING_BASE for the configured ones.
func (f *Frontend) Stop() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, q := range f.Queues {
		if _, err := f.request(vhostuser.ReqSetVringEnable, vringState(q.Index, 0), nil, true); err != nil {
			return err
		}
	}
	for _, q := range f.Queues {
		if q.Ring != nil {
			if _, err := f.request(vhostuser.ReqGetVringBase, vringState(q.Index, 0), nil, false); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *Frontend) setStatus(add uint64) error {
	cur, err := f.getU64(vhostuser.ReqGetStatus)
	if err != nil {
		return err
	}
	_, err = f.request(vhostuser.ReqSetStatus, u64(cur|add), nil, false) // QEMU: no NEED_REPLY here
	return err
}

// SetStatus sends SET_STATUS with exactly st (0 resets the device).
func (f *Frontend) SetStatus(st uint64) error {
	_, err := f.Request(vhostuser.ReqSetStatus, u64(st), nil, true)
	return err
}

func vringState(i int, num uint32) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint32(b, uint32(i))
	binary.LittleEndian.PutUint32(b[4:], num)
	return b
}

func (f *Frontend) startQueue(q *VQ) error {
	i := q.Index
	if _, err := f.request(vhostuser.ReqSetVringNum, vringState(i, uint32(q.Size())), nil, false); err != nil {
		return err
	}
	if _, err := f.request(vhostuser.ReqSetVringBase, vringState(i, 0), nil, false); err != nil {
		return err
	}
	addr := make([]byte, 40)
	binary.LittleEndian.PutUint32(addr, uint32(i))
	binary.LittleEndian.PutUint64(addr[8:], q.UserAddr(q.DescAddr()))
	binary.LittleEndian.PutUint64(addr[16:], q.UserAddr(q.DeviceAddr()))
	binary.LittleEndian.PutUint64(addr[24:], q.UserAddr(q.DriverAddr()))
	if _, err := f.request(vhostuser.ReqSetVringAddr, addr, nil, false); err != nil {
		return err
	}
	if _, err := f.request(vhostuser.ReqSetVringKick, u64(uint64(i)), []int{q.KickFD}, true); err != nil {
		return err
	}
	_, err := f.request(vhostuser.ReqSetVringCall, u64(uint64(i)), []int{q.CallFD}, true)
	return err
}

func regionPayload(r *Region) []byte {
	p := make([]byte, 40)
	binary.LittleEndian.PutUint64(p[8:], r.GPA)
	binary.LittleEndian.PutUint64(p[16:], r.Size)
	binary.LittleEndian.PutUint64(p[24:], r.UserAddr())
	return p
}

// memReg sends ADD_MEM_REG (with the region's fd) or REM_MEM_REG (without,
// as QEMU 11.1.3 does), with NEED_REPLY.
func (f *Frontend) memReg(req uint32, r *Region) error {
	var fds []int
	if req == vhostuser.ReqAddMemReg {
		fds = []int{r.FD}
	}
	_, err := f.request(req, regionPayload(r), fds, true)
	if err == nil {
		if f.added == nil {
			f.added = map[*Region]bool{}
		}
		f.added[r] = req == vhostuser.ReqAddMemReg
	}
	return err
}

// AddMemReg sends ADD_MEM_REG for r (QEMU adds the shared-memory BAR
// mapping this way before it answers SHMEM_MAP).
func (f *Frontend) AddMemReg(r *Region) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.memReg(vhostuser.ReqAddMemReg, r)
}

// RemMemReg sends REM_MEM_REG for r.
func (f *Frontend) RemMemReg(r *Region) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.memReg(vhostuser.ReqRemMemReg, r)
}

// MemTablePayload encodes the guest memory as a SET_MEM_TABLE payload and
// returns the fds that go with it.
func (f *Frontend) MemTablePayload(extra ...*Region) ([]byte, []int) {
	regions := append(append([]*Region(nil), f.Mem.Regions...), extra...)
	p := make([]byte, 8+32*len(regions))
	binary.LittleEndian.PutUint32(p, uint32(len(regions)))
	fds := make([]int, len(regions))
	for i, r := range regions {
		o := 8 + 32*i
		binary.LittleEndian.PutUint64(p[o:], r.GPA)
		binary.LittleEndian.PutUint64(p[o+8:], r.Size)
		binary.LittleEndian.PutUint64(p[o+16:], r.UserAddr())
		binary.LittleEndian.PutUint64(p[o+24:], 0)
		fds[i] = r.FD
	}
	return p, fds
}

func (f *Frontend) setMemTable(extra ...*Region) error {
	p, fds := f.MemTablePayload(extra...)
	_, err := f.request(vhostuser.ReqSetMemTable, p, fds, true)
	return err
}

// SetMemTable sends SET_MEM_TABLE (NEED_REPLY) with the guest memory plus
// extra regions (QEMU adds the shared-memory BAR this way).
func (f *Frontend) SetMemTable(extra ...*Region) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.setMemTable(extra...)
}

// GetConfig reads size bytes of config space from offset.
func (f *Frontend) GetConfig(offset, size uint32) ([]byte, error) {
	p := make([]byte, 12+size)
	binary.LittleEndian.PutUint32(p, offset)
	binary.LittleEndian.PutUint32(p[4:], size)
	r, err := f.Request(vhostuser.ReqGetConfig, p, nil, false)
	if err != nil {
		return nil, err
	}
	if len(r) != 12+int(size) {
		return nil, fmt.Errorf("GET_CONFIG reply of %d bytes", len(r))
	}
	return r[12:], nil
}

// GetVringBase stops queue i and returns the back-end's last avail index.
func (f *Frontend) GetVringBase(i int) (uint32, error) {
	r, err := f.Request(vhostuser.ReqGetVringBase, vringState(i, 0), nil, false)
	if err != nil {
		return 0, err
	}
	if len(r) != 8 {
		return 0, fmt.Errorf("GET_VRING_BASE reply of %d bytes", len(r))
	}
	return binary.LittleEndian.Uint32(r[4:]), nil
}

// SetVringEnable sends SET_VRING_ENABLE.
func (f *Frontend) SetVringEnable(i int, on bool) error {
	v := uint32(0)
	if on {
		v = 1
	}
	_, err := f.Request(vhostuser.ReqSetVringEnable, vringState(i, v), nil, true)
	return err
}

// --- back-end request channel -----------------------------------------------

func (f *Frontend) setupBackendChannel() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	file := os.NewFile(uintptr(fds[0]), "backend-req")
	c, err := net.FileConn(file)
	file.Close()
	if err != nil {
		unix.Close(fds[1])
		return err
	}
	_, err = f.request(vhostuser.ReqSetBackendReqFD, nil, []int{fds[1]}, true)
	unix.Close(fds[1])
	if err != nil {
		c.Close()
		return err
	}
	f.bc = c.(*net.UnixConn)
	f.bcDone = make(chan struct{})
	go f.serveBackend()
	return nil
}

func (f *Frontend) serveBackend() {
	defer close(f.bcDone)
	for {
		m, err := vhostuser.ReadMessage(f.bc)
		if err != nil {
			return
		}
		r := ShmemRequest{Request: m.Request, NeedReply: m.Flags&FlagNeedReply != 0, HadFD: len(m.FDs) > 0, Seals: -1}
		show := -1 // a dup of the MAP's fd, for the memory-table region
		if (m.Request == vhostuser.BackendReqShmemMap || m.Request == vhostuser.BackendReqShmemUnmap) && len(m.Payload) == 40 {
			r.ShmID = m.Payload[0]
			r.FDOffset = binary.LittleEndian.Uint64(m.Payload[8:])
			r.ShmOffset = binary.LittleEndian.Uint64(m.Payload[16:])
			r.Len = binary.LittleEndian.Uint64(m.Payload[24:])
			r.Flags = binary.LittleEndian.Uint64(m.Payload[32:])
			f.shmemMap(&r, m.FDs)
			f.shmemMu.Lock()
			hide := f.HideShmemMaps
			f.shmemMu.Unlock()
			if m.Request == vhostuser.BackendReqShmemMap && len(m.FDs) == 1 && !hide {
				show, _ = unix.FcntlInt(uintptr(m.FDs[0]), unix.F_DUPFD_CLOEXEC, 0)
			}
		}
		m.CloseFDs()
		status := f.ShmemStatus
		f.shmemMu.Lock()
		hook := f.BeforeShmemReply
		f.shmemMu.Unlock()
		if hook != nil {
			if err := hook(f, r); err != nil {
				status = 1
			}
		}
		f.shmemMu.Lock()
		f.shmem = append(f.shmem, r)
		f.shmemMu.Unlock()
		select {
		case f.shmemCh <- r:
		default:
		}
		if r.NeedReply {
			if err := vhostuser.WriteMessage(f.bc, m.Request, FlagVersion|FlagReply, u64(status), nil); err != nil {
				if show >= 0 {
					unix.Close(show)
				}
				return
			}
		}
		// Then, as QEMU commits the memory transaction: the table change.
		switch {
		case show >= 0 && status == 0:
			f.showShmem(r, show)
		case show >= 0:
			unix.Close(show)
		case r.Request == vhostuser.BackendReqShmemUnmap && status == 0:
			f.hideShmem(r.ShmOffset)
		}
	}
}

// shmemGPA is where the test front-end puts the shared-memory BAR.
const shmemGPA = 0x80_0000_0000

// showShmem sends the MAP's range as a memory region (ADD_MEM_REG with fd);
// it takes fd.
func (f *Frontend) showShmem(r ShmemRequest, fd int) {
	host := f.Shmem(r.ShmOffset)
	if host == nil {
		unix.Close(fd)
		return
	}
	reg := &Region{GPA: shmemGPA + r.ShmOffset, Size: r.Len, FD: fd, Host: host}
	if err := f.AddMemReg(reg); err != nil {
		unix.Close(fd)
		return
	}
	f.shmemMu.Lock()
	if f.shmRegs == nil {
		f.shmRegs = map[uint64]*Region{}
	}
	f.shmRegs[r.ShmOffset] = reg
	f.shmemMu.Unlock()
}

// hideShmem removes the region of the mapping at off, if it was shown.
func (f *Frontend) hideShmem(off uint64) {
	f.shmemMu.Lock()
	reg := f.shmRegs[off]
	delete(f.shmRegs, off)
	f.shmemMu.Unlock()
	if reg != nil {
		f.RemMemReg(reg)
		unix.Close(reg.FD)
	}
}

// shmemMap keeps the front-end's view of region 0: a MAP's fd mapped, an
// UNMAP's range dropped.
func (f *Frontend) shmemMap(r *ShmemRequest, fds []int) {
	f.shmemMu.Lock()
	defer f.shmemMu.Unlock()
	if f.shmMaps == nil {
		f.shmMaps = map[uint64][]byte{}
	}
	if r.Request == vhostuser.BackendReqShmemUnmap {
		if b, ok := f.shmMaps[r.ShmOffset]; ok {
			unix.Munmap(b)
			delete(f.shmMaps, r.ShmOffset)
		}
		return
	}
	if len(fds) != 1 || r.Len == 0 || r.Len > 1<<30 {
		return
	}
	if s, err := unix.FcntlInt(uintptr(fds[0]), unix.F_GET_SEALS, 0); err == nil {
		r.Seals = s
	}
	b, err := unix.Mmap(fds[0], int64(r.FDOffset), int(r.Len), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err == nil {
		if old, ok := f.shmMaps[r.ShmOffset]; ok {
			unix.Munmap(old)
		}
		f.shmMaps[r.ShmOffset] = b
	}
}

// Shmem returns the front-end's mapping at offset off of shared-memory
// region 0 (what the guest sees in its BAR there), or nil if nothing is
// mapped at off.
func (f *Frontend) Shmem(off uint64) []byte {
	f.shmemMu.Lock()
	defer f.shmemMu.Unlock()
	return f.shmMaps[off]
}

// ShmemMapped is the number of mappings in region 0.
func (f *Frontend) ShmemMapped() int {
	f.shmemMu.Lock()
	defer f.shmemMu.Unlock()
	return len(f.shmMaps)
}

// DropShmem forgets every mapping, as QEMU does when the device stops,
// and takes their regions out of the back-end's memory table.
func (f *Frontend) DropShmem() {
	f.shmemMu.Lock()
	regs := f.shmRegs
	f.shmRegs = nil
	for off, b := range f.shmMaps {
		unix.Munmap(b)
		delete(f.shmMaps, off)
	}
	f.shmemMu.Unlock()
	for _, reg := range regs {
		f.RemMemReg(reg)
		unix.Close(reg.FD)
	}
}

// WaitShmem waits for the next back-end request and returns it.
func (f *Frontend) WaitShmem() (ShmemRequest, error) {
	select {
	case r := <-f.shmemCh:
		return r, nil
	case <-time.After(Timeout):
		return ShmemRequest{}, errors.New("no SHMEM request")
	}
}

// SetBeforeShmemReply sets BeforeShmemReply at any time (also after the
// handshake, when the back-end channel is already served).
func (f *Frontend) SetBeforeShmemReply(fn func(f *Frontend, r ShmemRequest) error) {
	f.shmemMu.Lock()
	f.BeforeShmemReply = fn
	f.shmemMu.Unlock()
}

// PollShmem returns the next back-end request if one has arrived.
func (f *Frontend) PollShmem() (ShmemRequest, bool) {
	select {
	case r := <-f.shmemCh:
		return r, true
	default:
		return ShmemRequest{}, false
	}
}

// ShmemRequests returns the back-end requests received so far.
func (f *Frontend) ShmemRequests() []ShmemRequest {
	f.shmemMu.Lock()
	defer f.shmemMu.Unlock()
	return append([]ShmemRequest(nil), f.shmem...)
}
