package dmb

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Buffer is the host memory of an attach-mode DMB: a memfd, which the
// transport hands to QEMU (VHOST_USER_BACKEND_SHMEM_MAP) for the owner's and
// attached peers' shared-memory BARs, and the backend's own mapping of it.
type Buffer struct {
	mu   sync.Mutex
	fd   int
	data []byte
}

// NewBuffer creates a zeroed memfd of size bytes (rounded up to the page
// size) and maps it. The size is sealed: a memfd that shrank under a mapping
// would turn accesses past its new end into SIGBUS in the backend and in
// every guest that maps it.
func NewBuffer(name string, size uint64) (*Buffer, error) {
	page := uint64(os.Getpagesize())
	if size == 0 || AddOverflows(size, page-1) || size > 1<<40 {
		return nil, fmt.Errorf("dmb: buffer size %d out of range", size)
	}
	size = (size + page - 1) &^ (page - 1)
	fd, err := unix.MemfdCreate("ism-dmb-"+name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("dmb: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("dmb: ftruncate memfd: %w", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("dmb: seal memfd: %w", err)
	}
	data, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("dmb: mmap memfd: %w", err)
	}
	return &Buffer{fd: fd, data: data}, nil
}

// FD is the memfd, for SHMEM_MAP; -1 after Close. The Buffer keeps owning it.
func (b *Buffer) FD() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.fd
}

// DupFD returns a new close-on-exec descriptor of the memfd, which the
// caller owns: a SHMEM_MAP in flight keeps its fd even when the DMB is
// unregistered (and the Buffer closed) meanwhile.
func (b *Buffer) DupFD() (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fd < 0 {
		return -1, os.ErrClosed
	}
	return unix.FcntlInt(uintptr(b.fd), unix.F_DUPFD_CLOEXEC, 0)
}

// Bytes is the backend's mapping of the buffer; invalid after Close.
func (b *Buffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.data
}

// Size is the buffer's size in bytes (a multiple of the page size).
func (b *Buffer) Size() uint64 { return uint64(len(b.Bytes())) }

// Close unmaps the buffer and closes the memfd. Guests that still map it keep
// their pages until QEMU unmaps them; the caller unmaps from the BARs first.
func (b *Buffer) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fd < 0 {
		return nil
	}
	err := unix.Munmap(b.data)
	if cerr := unix.Close(b.fd); err == nil {
		err = cerr
	}
	b.fd, b.data = -1, nil
	return err
}

// BufferFromFD makes a Buffer of an existing memfd of size bytes (a page
// multiple), as NewBuffer made it in another process: it takes a duplicate
// of fd (the caller keeps fd) and maps it. The file must be a sealed memfd
// of at least size bytes: a smaller or growable one could fault under the
// mapping.
func BufferFromFD(fd int, size uint64) (*Buffer, error) {
	page := uint64(os.Getpagesize())
	if size == 0 || size%page != 0 || size > 1<<40 {
		return nil, fmt.Errorf("dmb: buffer size %d out of range", size)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, fmt.Errorf("dmb: not a memfd: %w", err)
	}
	if seals&unix.F_SEAL_SHRINK == 0 {
		return nil, errors.New("dmb: memfd not sealed against shrinking")
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("dmb: fstat memfd: %w", err)
	}
	if st.Size < 0 || uint64(st.Size) < size {
		return nil, fmt.Errorf("dmb: memfd of %d bytes, want %d", st.Size, size)
	}
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dmb: dup memfd: %w", err)
	}
	data, err := unix.Mmap(nfd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(nfd)
		return nil, fmt.Errorf("dmb: mmap memfd: %w", err)
	}
	return &Buffer{fd: nfd, data: data}, nil
}
