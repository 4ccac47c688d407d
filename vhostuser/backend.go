package vhostuser

// Backend is the device half of a vhost-user back-end: what a device such as
// ISM implements. The library speaks the protocol; a Backend supplies the
// device's features, config space and queue handling. One Backend value
// serves one connection (one VM); a Server makes a new one per connection.
type Backend interface {
	// Features returns the virtio device feature bits offered to the driver.
	// The library adds VIRTIO_F_VERSION_1 and the transport bits it
	// implements (EVENT_IDX, INDIRECT_DESC, VHOST_USER_F_PROTOCOL_FEATURES).
	Features() uint64
	// NumQueues is the number of virtqueues the device has.
	NumQueues() int
	// ReadConfig fills buf with config space from offset (GET_CONFIG).
	ReadConfig(offset uint32, buf []byte) error
	// WriteConfig handles SET_CONFIG.
	WriteConfig(offset uint32, data []byte) error
	// ShmemSizes returns the sizes of the VIRTIO shared-memory regions, or
	// nil for none (then SHMEM is not offered).
	ShmemSizes() []uint64
	// Start is called when the device starts: the guest driver set
	// DRIVER_OK, so QEMU set the memory table and enabled the rings (QEMU
	// 11.1.3 enables rings only then; it does not forward DRIVER_OK as a
	// status). The Guest gives access to memory, queues and the back-end
	// request channel until Stop. Queues the driver did not set up are not
	// Ready. Start runs under the device's lock (exclusive) on the
	// connection's goroutine: it must not call ShmemMap/ShmemUnmap itself
	// (start a goroutine for that; Guest.Started is already true). An
	// error leaves the device stopped.
	Start(dev *Guest) error
	// HandleQueue is called when queue q was kicked (or needs a look after
	// start, or Queue.Wake was called). It is called with the device's
	// lock held shared, from the queue's own goroutine: it must not call
	// Guest.ShmemMap/ShmemUnmap or this device's WithMemoryLock, and must
	// not keep slices of guest memory, or a Chain's Reader and Writer,
	// after it returns (unless it holds a reference to their Memory). Every control
	// message of this VM waits for it, so it should do a bounded amount of
	// work per call: take chains with Queue.Next until that returns false
	// (with EVENT_IDX the driver kicks again only after the device saw the
	// ring empty) or a work budget is spent, and in that case call
	// Queue.Yield to be called again. End a batch with Queue.Notify.
	// Another VM's memory is used through its Guest.AcquireMemory, for
	// one access at a time; its queues only through TryWithMemoryLock.
	HandleQueue(dev *Guest, q *Queue)
	// Stop is called on reset, stop or disconnect: every mapping and every
	// buffer of the previous start is gone. It runs under the device's
	// lock, exclusively (no HandleQueue of this device runs; other devices
	// may be copying into its memory through their AcquireMemory), and
	// must not wait for a ShmemMap/ShmemUnmap in flight.
	Stop(dev *Guest)
	// Close is called once, when the connection is over (after Stop if
	// started), under the device's lock, exclusively.
	Close()
}
