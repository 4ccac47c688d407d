package smcd

// ISM is an ISM device as the SMC-D stack uses it. The guest's virtio ISM
// driver implements it; so does the in-process Loopback. Errors are
// abi.Status values.
type ISM interface {
	GID() uint64
	CHID() uint16
	// RegisterDMB registers a DMB of size bytes that only rgid may write;
	// rgid may be the device's own GID (both ends in one guest).
	RegisterDMB(size int, rgid uint64) (DMB, error)
	UnregisterDMB(m DMB) error
	// AllocBuffer returns memory the device can MOVE from.
	AllocBuffer(size int) (Buffer, error)
	// Move copies src[srcOff:srcOff+n] into the peer DMB token at offset;
	// signal sets DMBE bit dmbe in it and wakes its owner.
	Move(token uint64, dmbe uint32, signal bool, offset uint32, src Buffer, srcOff, n int) error
	// QueryRGID reports whether rgid is reachable through this device.
	QueryRGID(rgid uint64) error
}

// DMB is a registered Direct Memory Buffer.
type DMB interface {
	Token() uint64
	// Bytes is the local view of the memory peers write.
	Bytes() []byte
	// Signalled receives (capacity 1, coalescing) after the DMB was
	// signalled.
	Signalled() <-chan struct{}
}

// Buffer is device-accessible memory to MOVE from.
type Buffer interface {
	Bytes() []byte
	Free()
}

// MoveLimiter is implemented by an ISM whose MOVE data length is bounded
// (the config space's max_move_len); the stack then splits data MOVEs to
// fit. A limit <= 0 means none.
type MoveLimiter interface {
	MaxMoveLen() int
}

// PeerWatcher is implemented by an ISM that learns when a peer's device
// goes away (the ISM event queue's GID event). The stack then fails that
// peer's connections at once: when a peer's whole VM dies, its TCP
// connection says nothing until keepalive gives up, minutes later.
type PeerWatcher interface {
	// WatchPeer arranges for gone to be called once, from any goroutine,
	// if the device with GID gid goes away before cancel is called.
	WatchPeer(gid uint64, gone func()) (cancel func())
}

// DMBWatcher is implemented by an ISM that learns when the device revokes
// a DMB (the event queue's DMB-gone event with code "revoked", which an
// operator's fault injection causes), ours or the peer's. The stack then
// fails the connections using it with an error wrapping ErrDMBGone,
// instead of waiting on a ring nobody writes any more.
type DMBWatcher interface {
	// WatchDMB arranges for gone to be called once, from any goroutine,
	// if the DMB with that token goes away before cancel is called.
	WatchDMB(token uint64, gone func()) (cancel func())
}

// RevokeChecker is implemented by an ISM that can say whether the device
// has revoked a DMB, ours or a peer's, counting events it has received but
// not delivered yet. The stack asks when the peer's TCP connection ends
// without a CDC close: a peer whose connection failed on the revoke closes
// at once, and its TCP close can overtake the device's event.
type RevokeChecker interface {
	Revoked(token uint64) bool
}

// Attacher is implemented by an ISM that can map a peer's attach-mode DMB
// into this guest (Linux's "nocopy" SMC-D, attach_dmb). A sender whose
// device can attach the peer's DMB writes its data and CDC straight into
// it and only signals through the device; otherwise it MOVEs.
type Attacher interface {
	// AttachDMB maps the peer DMB token, whose rgid is this device. Any
	// error (abi.StatusUnsupported for a DMB in the peer's own memory)
	// means: MOVE instead.
	AttachDMB(token uint64) (PeerDMB, error)
}

// PeerDMB is a peer's DMB mapped into this guest. Only the sender writes
// it, the owner only reads: one writer per word.
type PeerDMB interface {
	// Len is the mapped DMB's length.
	Len() int
	// WriteAt copies p to offset off; it fails once the mapping is gone.
	WriteAt(p []byte, off int64) (int, error)
	// StoreUint64 stores v at off (a multiple of 8) as one atomic write,
	// after every write before it.
	StoreUint64(off int64, v uint64) error
	// Detach removes the mapping.
	Detach() error
}

// SharedDMB is implemented by a DMB that says whether it is in attach mode
// (Shared): in memory that its rgid may attach and write directly.
type SharedDMB interface {
	Shared() bool
}
