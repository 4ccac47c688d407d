package smcd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/guestdriver/smcd/synopt"
)

// Conn is a net.Conn over SMC-D. Our receive buffer is a DMB only the peer
// may write: the CDC header at offset 0, then the data ring. We send by
// MOVEing data into the peer's DMB ring, then its CDC header with the signal
// flag; or, when our device could attach the peer's DMB (attach mode, Linux's
// nocopy), by writing data and then the CDC cursors straight into it and
// signalling with a zero-length MOVE. Positions are kept as absolute byte
// counts (uint64); the wire carries them as {wrap, count} cursors.
//
// The TCP connection of the handshake stays open, idle, as in Linux: its
// close tells us the peer is gone.
type Conn struct {
	dev ISM
	tcp net.Conn

	dmb   DMB
	ring  []byte // dmb.Bytes()[CDCLen:]
	rsize uint32 // our ring size

	peerGID    uint64
	peerGIDExt uint64 // the second half of a v2 peer's 128-bit GID
	clcVersion uint8  // CLC version the handshake used
	eid        EID    // negotiated EID (v2)
	peerToken  uint64
	peerDMBE   uint32
	psize      uint32 // peer ring size
	maxMove    int    // largest data MOVE the device takes; 0: any
	unwatch    func() // stops the PeerWatcher, if the device has one

	cdcBuf Buffer // the CDC header we MOVE
	stage  Buffer // data staging for MOVE

	view     PeerDMB // the peer's DMB attached, or nil: we MOVE
	sendNote string  // why we MOVE although the device can attach

	sent, received atomic.Uint64 // bytes

	rMu  sync.Mutex // one Read at a time
	wMu  sync.Mutex // one Write at a time; a Write is not interleaved
	txMu sync.Mutex // serializes CDC MOVEs; taken before mu, never inside it

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every state change
	// receive side
	rxProd      uint64 // peer's producer position in our ring (validated)
	rxCons      uint64 // consumed by Read
	rxConfirmed uint64 // consumer position last sent to the peer
	peerFlags   uint8  // peer's producer flags from its last CDC
	peerState   uint8  // peer's connection state flags, sticky
	// transmit side
	txProd     uint64 // our producer position in the peer's ring
	txPeerCons uint64 // peer's consumer position in its ring (validated)
	txFlags    uint8
	txState    uint8
	err        error // fatal: abort, vanished peer, protocol violation, device error
	closed     bool  // local Close
	// tcpHalfClosed: the peer's TCP FIN came after its done-writing CDC,
	// as Linux's SMC sends it: smc_shutdown(SHUT_WR) shuts the CLC socket
	// down the same way. Not a vanished peer; the connection goes on.
	tcpHalfClosed bool

	readDL, writeDL deadline
	waiters         int           // Reads and Writes waiting for a state change (under mu)
	waitStart       chan struct{} // nudges rxLoop when the first one starts waiting

	synOpt *synopt.Record // the option program's record; nil in band

	quit      chan struct{}
	rxDone    chan struct{}
	closeOnce sync.Once
}

// updateLimitMax caps the acknowledgement threshold, like Linux's
// smc_rmb_wnd_update_limit: min(ring/10, SOCK_MIN_RCVBUF/2).
const updateLimitMax = 2304

// maxStage bounds the staging buffer a Write copies through.
const maxStage = 128 << 10

var (
	errPeerAbort = fmt.Errorf("peer aborted the connection: %w", syscall.ECONNRESET)
	errVanished  = fmt.Errorf("peer vanished (TCP connection closed without CDC close): %w", syscall.ECONNRESET)
	errPeerClose = fmt.Errorf("peer closed the connection: %w", syscall.EPIPE)
	errPeerGone  = fmt.Errorf("peer's ISM device went away: %w", syscall.ECONNRESET)
	errShutdown  = fmt.Errorf("write after CloseWrite: %w", syscall.EPIPE)
	errDMBGone   = fmt.Errorf("our DMB was revoked by the ISM device: %w (%w)", ErrDMBGone, syscall.ECONNRESET)
	errPeerDMB   = fmt.Errorf("the peer's DMB was revoked by the ISM device: %w (%w)", ErrDMBGone, syscall.ECONNRESET)
	errTCPData   = errors.New("smcd: unexpected data on the TCP connection after the CLC handshake")
)

// ErrDMBGone is wrapped by the error of a connection whose DMB, or whose
// peer's DMB, the device revoked (DMBWatcher).
var ErrDMBGone = errors.New("smcd: DMB gone")

// Rescanning: a connection with a Read or Write waiting looks at the CDC
// header in its DMB on a timer too, not only when signalled, so that a
// signal the device loses (or a peer never sends) delays it and never
// stalls it: the cursors are absolute, so one look finds everything a lost
// signal announced. The period starts at rescanMin when a wait begins or
// a signal arrives and doubles up to rescanMax while nothing comes, so an
// idle connection with a blocked Read costs about one look a second.
const (
	rescanMin = 20 * time.Millisecond
	rescanMax = time.Second
)

// newConn starts a connection whose DMB dmb is registered for the peer and
// whose header is zero; peer* describe the peer's DMB from CLC.
func newConn(dev ISM, tcp net.Conn, dmb DMB, peerGID, peerToken uint64, peerDMBE uint32, peerSize int, cdcBuf, stage Buffer) *Conn {
	c := &Conn{
		dev: dev, tcp: tcp, dmb: dmb,
		ring:    dmb.Bytes()[CDCLen:],
		rsize:   uint32(len(dmb.Bytes()) - CDCLen),
		peerGID: peerGID, peerToken: peerToken, peerDMBE: peerDMBE,
		psize:  uint32(peerSize - CDCLen),
		cdcBuf: cdcBuf, stage: stage,
		changed:   make(chan struct{}),
		waitStart: make(chan struct{}, 1),
		quit:      make(chan struct{}),
		rxDone:    make(chan struct{}),
	}
	if ml, ok := dev.(MoveLimiter); ok {
		c.maxMove = max(ml.MaxMoveLen(), 0)
	}
	if pw, ok := dev.(PeerWatcher); ok {
		c.unwatch = pw.WatchPeer(peerGID, func() { c.fail(errPeerGone) })
	}
	if dw, ok := dev.(DMBWatcher); ok {
		own := dw.WatchDMB(dmb.Token(), func() { c.fail(errDMBGone) })
		peer := dw.WatchDMB(peerToken, c.peerDMBGone)
		unwatchPeer := c.unwatch
		c.unwatch = func() {
			own()
			peer()
			if unwatchPeer != nil {
				unwatchPeer()
			}
		}
	}
	c.attachPeer()
	c.readDL.init()
	c.writeDL.init()
	go c.rxLoop()
	track(c)
	return c
}

// attachPeer maps the peer's DMB if our device can attach it: as Linux's
// smcd_buf_attach, the sender attaches when its device supports it and the
// peer's DMB is attachable; any refusal leaves the connection MOVEing.
func (c *Conn) attachPeer() {
	at, ok := c.dev.(Attacher)
	if !ok {
		return
	}
	v, err := at.AttachDMB(c.peerToken)
	switch {
	case err != nil:
		c.sendNote = err.Error()
	case v.Len() < int(c.psize)+CDCLen:
		c.sendNote = fmt.Sprintf("attached DMB of %d bytes, CLC said %d", v.Len(), int(c.psize)+CDCLen)
		v.Detach()
	default:
		c.view = v
	}
}

// stageSize is the staging buffer for a connection: the client knows the
// server's ring when it allocates, the server only its own.
func stageSize(ring int) int { return min(ring, maxStage) }

// rxLoop handles the peer's CDCs as Linux's CDC tasklet does, independent of
// whether the application is reading: it wakes readers and writers and
// acknowledges consumption to a blocked sender. It also watches the TCP
// connection: if that closes before the peer sent "closed", the peer is gone
// (unless it is the FIN that follows a Linux peer's done-writing: rx).
func (c *Conn) rxLoop() {
	defer close(c.rxDone)
	tcpDead := make(chan error, 1)
	go func() {
		var b [1]byte
		n, err := c.tcp.Read(b[:])
		if n > 0 {
			err = errTCPData
		}
		tcpDead <- err
	}()
	rescanT := time.NewTimer(time.Hour)
	rescanT.Stop()
	defer rescanT.Stop()
	var rescan <-chan time.Time // nil while nobody waits
	period := rescanMin
	for {
		select {
		case <-c.dmb.Signalled():
			c.rx(nil)
			period = rescanMin
		case <-c.waitStart:
			if rescan == nil {
				period = rescanMin
				rescanT.Reset(period)
				rescan = rescanT.C
			}
		case <-rescan:
			rescan = nil
			c.mu.Lock()
			waiting := c.waiters > 0
			c.mu.Unlock()
			if waiting {
				c.rx(nil)
				period = min(2*period, rescanMax)
				rescanT.Reset(period)
				rescan = rescanT.C
			}
		case err := <-tcpDead:
			if err == nil {
				err = io.EOF
			}
			c.rx(err)
			c.mu.Lock()
			goOn := c.tcpHalfClosed && c.err == nil
			c.mu.Unlock()
			if !goOn {
				return
			}
			tcpDead = nil // nothing more to learn from the TCP connection
		case <-c.quit:
			return
		}
	}
}

// rx processes the CDC header in our DMB. tcpErr is non-nil when the TCP
// connection has ended: then the peer must already have said closed.
func (c *Conn) rx(tcpErr error) {
	var revoked error // why the peer may have closed without a CDC close
	if rc, ok := c.dev.(RevokeChecker); ok && tcpErr != nil {
		switch {
		case rc.Revoked(c.dmb.Token()):
			revoked = errDMBGone
		case rc.Revoked(c.peerToken):
			revoked = errPeerDMB
		}
	}
	m, err := LoadCDC(c.dmb.Bytes())
	c.mu.Lock()
	if c.err != nil || c.closed {
		c.mu.Unlock()
		return
	}
	var prod, cons uint64
	if err == nil {
		// The peer may fill only what we have told it we consumed.
		prod, err = AdvanceCursor(c.rsize, c.rxProd, m.Prod, c.rxConfirmed+uint64(c.rsize))
	}
	if err == nil {
		// The peer cannot consume what we have not produced.
		cons, err = AdvanceCursor(c.psize, c.txPeerCons, m.Cons, c.txProd)
	}
	abortPeer := false
	changed := true
	if err != nil {
		c.err = err
		abortPeer = true
	} else {
		// A rescan (rxLoop) usually finds nothing new: then nobody
		// needs waking.
		changed = prod != c.rxProd || cons != c.txPeerCons || m.ProdFlags != c.peerFlags ||
			c.peerState|m.ConnState != c.peerState || tcpErr != nil
		c.rxProd, c.txPeerCons = prod, cons
		c.peerFlags = m.ProdFlags
		c.peerState |= m.ConnState
		switch {
		case c.peerState&FlagAbort != 0:
			c.err = errPeerAbort
		case errors.Is(tcpErr, errTCPData):
			c.err = tcpErr
			abortPeer = true
		case tcpErr != nil && c.peerState&FlagClosed == 0 && revoked != nil:
			c.err = revoked
		case errors.Is(tcpErr, io.EOF) && c.peerState&FlagDoneWriting != 0:
			c.tcpHalfClosed = true
		case tcpErr != nil && c.peerState&FlagClosed == 0:
			c.err = errVanished
		}
	}
	ack := c.err == nil && c.ackNeededLocked()
	if changed {
		c.broadcastLocked()
	}
	c.mu.Unlock()
	switch {
	case abortPeer:
		c.sendAbort()
	case ack:
		c.sendCDC()
	}
}

// ackNeededLocked decides, as Linux's smc_tx_consumer_update, whether to
// write our consumer cursor to the peer now: it asked, or it is blocked, or
// enough is unacknowledged and the peer sees our ring at most half free.
func (c *Conn) ackNeededLocked() bool {
	toConfirm := c.rxCons - c.rxConfirmed
	if toConfirm == 0 || c.peerState&(FlagClosed|FlagAbort) != 0 {
		return false
	}
	if c.peerFlags&(FlagWriteBlocked|FlagCursorUpdateRq) != 0 {
		return true
	}
	limit := min(uint64(c.rsize)/10, updateLimitMax)
	senderFree := uint64(c.rsize) - (c.rxProd - c.rxConfirmed)
	return toConfirm > limit && senderFree <= uint64(c.rsize)/2
}

func (c *Conn) broadcastLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// sendCDC writes our current cursors and flags into the peer's DMB header
// and signals it. A failure (the peer's DMB is gone) fails the connection.
func (c *Conn) sendCDC() error {
	c.txMu.Lock()
	defer c.txMu.Unlock()
	c.mu.Lock()
	m := CDC{
		Prod:      CursorOf(c.psize, c.txProd),
		Cons:      CursorOf(c.rsize, c.rxCons),
		ProdFlags: c.txFlags,
		ConnState: c.txState,
	}
	c.rxConfirmed = c.rxCons
	c.mu.Unlock()
	var err error
	if c.view != nil {
		err = c.storeCDC(&m)
		if err == nil {
			err = c.dev.Move(c.peerToken, c.peerDMBE, true, 0, nil, 0, 0) // the signal alone
		}
	} else {
		m.Encode(c.cdcBuf.Bytes())
		err = c.dev.Move(c.peerToken, c.peerDMBE, true, 0, c.cdcBuf, 0, CDCLen)
	}
	if err != nil {
		// A peer that said closed may unregister its DMB at once, and
		// nothing we could still tell it matters. Its CDC saying so
		// may not have been processed yet (the signal is pending), so
		// look at the header itself; rx validates it in due course.
		m, lerr := LoadCDC(c.dmb.Bytes())
		c.mu.Lock()
		gone := c.peerState&FlagClosed != 0 || (lerr == nil && m.ConnState&FlagClosed != 0)
		c.mu.Unlock()
		if gone {
			return nil
		}
		err = c.peerDMBErr("CDC", err)
		c.fail(err)
	}
	return err
}

// storeCDC writes m into the attached peer DMB's header as 8-byte atomic
// stores: type, then producer, then consumer with the flags, the order
// LoadCDC relies on (it loads the consumer word first). The data they
// announce was written before them.
func (c *Conn) storeCDC(m *CDC) error {
	var b [CDCLen]byte
	m.Encode(b[:])
	for _, off := range [...]int64{0, cdcProdOff, cdcConsOff} {
		if err := c.view.StoreUint64(off, binary.NativeEndian.Uint64(b[off:])); err != nil {
			return err
		}
	}
	return nil
}

func (c *Conn) sendAbort() {
	c.mu.Lock()
	c.txState |= FlagAbort
	c.mu.Unlock()
	c.sendCDC()
}

// peerDMBGone fails the connection: the device revoked the peer's DMB,
// which we write. A peer that said closed may unregister its DMB at once
// (in attach mode we then hear of it): its CDC saying so is in our DMB's
// header before that, so look there first, as sendCDC does.
func (c *Conn) peerDMBGone() {
	m, err := LoadCDC(c.dmb.Bytes())
	c.mu.Lock()
	closed := c.peerState&FlagClosed != 0 || (err == nil && m.ConnState&FlagClosed != 0)
	c.mu.Unlock()
	if !closed {
		c.fail(errPeerDMB)
	}
}

// peerDMBErr is the error of a failed write of what into the peer's DMB.
// A MOVE's NOENTRY, or any error of an attached view, means that the DMB
// is gone (revoked, or its owner gone without a close): the error says
// so, also when it comes before the device's event does.
func (c *Conn) peerDMBErr(what string, err error) error {
	if c.view != nil || errors.Is(err, abi.StatusNoEntry) {
		return fmt.Errorf("smcd: %s to peer DMB: %w (%w: %w)", what, err, ErrDMBGone, syscall.ECONNRESET)
	}
	return fmt.Errorf("smcd: %s to peer DMB: %w (%w)", what, err, syscall.ECONNRESET)
}

func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.broadcastLocked()
	c.mu.Unlock()
}

func (c *Conn) opErr(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	return &net.OpError{Op: op, Net: "smcd", Source: c.tcp.LocalAddr(), Addr: c.tcp.RemoteAddr(), Err: err}
}

// Read reads data the peer produced into our DMB ring.
func (c *Conn) Read(p []byte) (int, error) {
	c.rMu.Lock()
	defer c.rMu.Unlock()
	c.mu.Lock()
	for {
		switch {
		case c.closed:
			c.mu.Unlock()
			return 0, c.opErr("read", net.ErrClosed)
		case c.err != nil:
			err := c.err
			c.mu.Unlock()
			return 0, c.opErr("read", err)
		}
		if c.rxProd > c.rxCons {
			break
		}
		if c.peerState&(FlagDoneWriting|FlagClosed) != 0 {
			c.mu.Unlock()
			return 0, io.EOF
		}
		if len(p) == 0 {
			c.mu.Unlock()
			return 0, nil
		}
		if err := c.waitLocked(&c.readDL); err != nil {
			c.mu.Unlock()
			return 0, c.opErr("read", err)
		}
	}
	avail := c.rxProd - c.rxCons
	pos := uint32(c.rxCons % uint64(c.rsize))
	c.mu.Unlock()

	// [rxCons, rxProd) is ours until we acknowledge it: the peer does not
	// write there, so the copy needs no lock.
	n := int(min(uint64(len(p)), avail))
	first := min(n, int(c.rsize-pos))
	copy(p, c.ring[pos:int(pos)+first])
	copy(p[first:n], c.ring[:n-first])

	c.received.Add(uint64(n))
	c.mu.Lock()
	c.rxCons += uint64(n)
	ack := c.err == nil && c.ackNeededLocked()
	c.mu.Unlock()
	if ack {
		c.sendCDC()
	}
	return n, nil
}

// waitLocked waits, with c.mu held on entry and exit, for a state change or
// the deadline.
func (c *Conn) waitLocked(dl *deadline) error {
	ch := c.changed
	expired := dl.wait()
	select {
	case <-expired:
		return os.ErrDeadlineExceeded
	default:
	}
	if c.waiters++; c.waiters == 1 {
		select {
		case c.waitStart <- struct{}{}:
		default:
		}
	}
	defer func() { c.waiters-- }() // mu is held again by then
	c.mu.Unlock()
	var err error
	select {
	case <-ch:
	case <-expired:
		err = os.ErrDeadlineExceeded
	}
	c.mu.Lock()
	return err
}

// Write MOVEs p into the peer's ring as space allows.
func (c *Conn) Write(p []byte) (int, error) {
	c.wMu.Lock()
	defer c.wMu.Unlock()
	stage := c.stage.Bytes()
	if len(p) == 0 {
		// Nothing to send: report the state, never wait for space.
		c.mu.Lock()
		err := c.err
		if c.closed {
			err = net.ErrClosed
		}
		c.mu.Unlock()
		return 0, c.opErr("write", err)
	}
	n := 0
	// Stop as soon as p is in the peer's ring: a close the peer sends after
	// reading it must not turn a delivered write into an error.
	for n < len(p) {
		space, err := c.waitSpace()
		if err != nil {
			return n, c.opErr("write", err)
		}
		c.mu.Lock()
		pos := uint32(c.txProd % uint64(c.psize))
		c.mu.Unlock()
		var chunk int
		if c.view != nil {
			// Straight into the peer's ring: [pos, pos+space) is ours
			// until our cursor says it is written.
			chunk = min(space, len(p)-n)
			first := min(chunk, int(c.psize-pos))
			_, err = c.view.WriteAt(p[n:n+first], int64(CDCLen+pos))
			if err == nil && chunk > first {
				_, err = c.view.WriteAt(p[n+first:n+chunk], CDCLen)
			}
		} else {
			chunk = min(space, len(p)-n, len(stage))
			copy(stage, p[n:n+chunk])
			first := min(chunk, int(c.psize-pos))
			err = c.moveData(CDCLen+pos, 0, first)
			if err == nil && chunk > first {
				err = c.moveData(CDCLen, first, chunk-first)
			}
		}
		if err != nil {
			err = c.peerDMBErr("data", err)
			c.fail(err)
			return n, c.opErr("write", err)
		}
		c.mu.Lock()
		c.txProd += uint64(chunk)
		c.txFlags &^= FlagWriteBlocked
		c.mu.Unlock()
		c.sent.Add(uint64(chunk))
		if err := c.sendCDC(); err != nil {
			return n, c.opErr("write", err)
		}
		n += chunk
	}
	return n, nil
}

// moveData MOVEs stage[srcOff:srcOff+n] to offset in the peer's DMB without
// a signal, in pieces the device accepts.
func (c *Conn) moveData(offset uint32, srcOff, n int) error {
	for n > 0 {
		k := n
		if c.maxMove > 0 {
			k = min(k, c.maxMove)
		}
		if err := c.dev.Move(c.peerToken, c.peerDMBE, false, offset, c.stage, srcOff, k); err != nil {
			return err
		}
		offset += uint32(k)
		srcOff += k
		n -= k
	}
	return nil
}

// waitSpace returns the free space in the peer's ring, waiting for the peer
// to consume when there is none. Before waiting it tells the peer it is
// blocked, so that the peer acknowledges even small consumption.
func (c *Conn) waitSpace() (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		switch {
		case c.closed:
			return 0, net.ErrClosed
		case c.err != nil:
			return 0, c.err
		case c.txState&(FlagDoneWriting|FlagClosed|FlagAbort) != 0:
			return 0, errShutdown
		case c.peerState&FlagClosed != 0:
			return 0, errPeerClose
		}
		space := uint64(c.psize) - (c.txProd - c.txPeerCons)
		if space > 0 {
			return int(space), nil
		}
		if c.txFlags&FlagWriteBlocked == 0 {
			c.txFlags |= FlagWriteBlocked
			c.mu.Unlock()
			c.sendCDC()
			c.mu.Lock()
			continue
		}
		if err := c.waitLocked(&c.writeDL); err != nil {
			return 0, err
		}
	}
}

// CloseWrite sends "done writing": the peer's Read returns io.EOF once it
// has read everything before it. Reading continues to work.
func (c *Conn) CloseWrite() error {
	c.wMu.Lock()
	defer c.wMu.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return c.opErr("close", net.ErrClosed)
	}
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return c.opErr("close", err)
	}
	c.txState |= FlagDoneWriting
	c.mu.Unlock()
	return c.opErr("close", c.sendCDC())
}

// Close sends "closed" (or "abort" when received data is left unread, as
// Linux does), then unregisters the DMB and closes the TCP connection.
func (c *Conn) Close() error {
	first := false
	c.closeOnce.Do(func() {
		first = true
		untrack(c)
		c.mu.Lock()
		failed := c.err != nil
		if c.rxProd > c.rxCons {
			c.txState |= FlagAbort
		} else {
			c.txState |= FlagClosed
		}
		c.closed = true
		c.broadcastLocked()
		c.mu.Unlock()
		if !failed {
			c.sendCDC()
		}
		if c.unwatch != nil {
			c.unwatch()
		}
		close(c.quit)
		<-c.rxDone
		// Wait for Read and Write, woken above, to leave the ring and
		// the staging buffer before the memory goes back to the device.
		c.wMu.Lock()
		c.rMu.Lock()
		if c.view != nil {
			c.view.Detach()
		}
		c.dev.UnregisterDMB(c.dmb)
		c.cdcBuf.Free()
		c.stage.Free()
		c.rMu.Unlock()
		c.wMu.Unlock()
		c.tcp.Close() // also ends the TCP watcher
	})
	if !first {
		return c.opErr("close", net.ErrClosed)
	}
	return nil
}

func (c *Conn) LocalAddr() net.Addr  { return c.tcp.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr { return c.tcp.RemoteAddr() }

// PeerGID is the peer's ISM GID.
func (c *Conn) PeerGID() uint64 { return c.peerGID }

// Mode is how data reaches a DMB.
type Mode uint8

const (
	// ModeCopy: the sender MOVEs and the device copies into the DMB.
	ModeCopy Mode = iota
	// ModeAttach: the DMB is in memory the sender has attached and
	// writes directly (SMC-D nocopy).
	ModeAttach
)

func (m Mode) String() string {
	if m == ModeAttach {
		return "attach"
	}
	return "copy"
}

// Info describes a connection, as smcss lists one.
type Info struct {
	LocalGID, PeerGID uint64
	// PeerGIDExt is the second half of the peer's 128-bit GID (SMC-Dv2
	// with an emulated CHID; 0 for our devices).
	PeerGIDExt uint64
	// CLCVersion is the SMC-D version negotiated (1 or 2), EID the
	// UEID both ends share in v2.
	CLCVersion            uint8
	EID                   EID
	LocalToken, PeerToken uint64 // our DMB's and the peer's
	DMBSize, PeerDMBSize  int    // bytes, the CDC header included
	// SendMode is how we write the peer's DMB; SendNote says why it is
	// ModeCopy when our device can attach.
	SendMode Mode
	SendNote string
	// RecvMode is ModeAttach when our DMB is in shared memory, where a
	// peer that can attach writes it directly.
	RecvMode                 Mode
	BytesSent, BytesReceived uint64
	// SYNOption is the option program's record of the TCP handshake;
	// nil when negotiation was in band.
	SYNOption *synopt.Record
}

// Info returns the connection's description and byte counts.
func (c *Conn) Info() Info {
	in := Info{
		LocalGID: c.dev.GID(), PeerGID: c.peerGID, PeerGIDExt: c.peerGIDExt,
		CLCVersion: c.clcVersion, EID: c.eid,
		LocalToken: c.dmb.Token(), PeerToken: c.peerToken,
		DMBSize: int(c.rsize) + CDCLen, PeerDMBSize: int(c.psize) + CDCLen,
		SendNote:  c.sendNote,
		BytesSent: c.sent.Load(), BytesReceived: c.received.Load(),
		SYNOption: c.synOpt,
	}
	if c.view != nil {
		in.SendMode = ModeAttach
	}
	if sd, ok := c.dmb.(SharedDMB); ok && sd.Shared() {
		in.RecvMode = ModeAttach
	}
	return in
}

func (c *Conn) SetDeadline(t time.Time) error {
	c.readDL.set(t)
	c.writeDL.set(t)
	return nil
}
func (c *Conn) SetReadDeadline(t time.Time) error  { c.readDL.set(t); return nil }
func (c *Conn) SetWriteDeadline(t time.Time) error { c.writeDL.set(t); return nil }

// deadline is a channel closed when the deadline passes; setting a new
// deadline while someone waits takes effect at once.
type deadline struct {
	mu     sync.Mutex
	timer  *time.Timer
	expiry chan struct{}
}

func (d *deadline) init() { d.expiry = make(chan struct{}) }

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.expiry // the timer fired: wait until it has closed expiry
	}
	d.timer = nil
	expired := false
	select {
	case <-d.expiry:
		expired = true
	default:
	}
	if t.IsZero() {
		if expired {
			d.expiry = make(chan struct{})
		}
		return
	}
	if dur := time.Until(t); dur > 0 {
		if expired {
			d.expiry = make(chan struct{})
		}
		ch := d.expiry
		d.timer = time.AfterFunc(dur, func() { close(ch) })
		return
	}
	if !expired {
		close(d.expiry)
	}
}

func (d *deadline) wait() chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.expiry
}
