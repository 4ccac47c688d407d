// Package vhostuser is a device-agnostic vhost-user back-end: the protocol
// QEMU speaks to an external device process over a unix socket.
//
// The package is split the way rust-vmm splits its vhost crates:
//
//   - msg.go: message framing with fds (SCM_RIGHTS) and a strict decoder
//     (exact payload size and fd count per request; anything else closes
//     the connection).
//   - memory.go: the guest memory table (GPA -> host mapping), bounds-checked
//     without integer overflow, with contiguous (Bytes) and segmented
//     (AppendSegments, Segments) lookups and vring (user address) translation;
//     tables are reference-counted snapshots, swapped without waiting for
//     their users (as rust-vmm's GuestMemoryAtomic).
//   - queue.go: device-side split virtqueues: descriptor chains (direct and
//     indirect, with loop, bound and order checks), used-ring publication and
//     EVENT_IDX / NO_INTERRUPT notification suppression.
//   - chainview.go: a chain's buffers as a Reader (device-readable part)
//     and a Writer (device-writable part), bound to the memory table the
//     chain was walked with (as rust-vmm's virtio-queue Reader and Writer).
//   - handler.go, guest.go: one connection's protocol state machine, the
//     Guest a Backend sees, and the back-end request channel (SHMEM_MAP,
//     SHMEM_UNMAP).
//   - server.go: one listening socket per VM, one connection at a time, the
//     per-queue goroutines, and each connection's lock (see Server for the
//     locking rules: nothing is shared between VMs).
//   - handover.go: a Server frozen at a safe point and its connections
//     exported with their fds, and rebuilt in another process
//     (ServeImported), for an upgrade without a reconnect.
//
// A device implements Backend. vhostusertest is a front-end that plays QEMU
// for tests. What QEMU 11.1.3 actually sends is written down in
// notes/vhost-user-qemu11.md in the shared project notes.
//
// The rings are read and written in place in guest memory with the host's
// byte order taken as little-endian (amd64, arm64), as virtio 1.x requires.
package vhostuser
