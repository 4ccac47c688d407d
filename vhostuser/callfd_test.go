package vhostuser_test

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ism-backend/ism-backend/vhostuser"
	"github.com/ism-backend/ism-backend/vhostuser/vhostusertest"
)

// TestFullCallFDDoesNotBlock: the call fd is written from queue goroutines
// (and, for cross-VM interrupts, from other VMs' goroutines). A front-end that gives a blocking pipe and never reads
// it must not stall the queue: the interrupt is dropped (one is pending
// anyway) and requests go on being served.
func TestFullCallFDDoesNotBlock(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)

	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	// Fill the pipe, then make it blocking again before handing it over.
	if err := unix.SetNonblock(p[1], true); err != nil {
		t.Fatal(err)
	}
	junk := make([]byte, 4096)
	for {
		if _, err := unix.Write(p[1], junk); err != nil {
			break
		}
	}
	if err := unix.SetNonblock(p[1], false); err != nil {
		t.Fatal(err)
	}
	var idx [8]byte
	binary.LittleEndian.PutUint64(idx[:], 0)
	if _, err := f.Request(vhostuser.ReqSetVringCall, idx[:], []int{p[1]}, true); err != nil {
		t.Fatal(err)
	}

	q := f.Queues[0]
	for i := range 3 {
		gpa, _, err := f.Mem.Alloc(64, 8)
		if err != nil {
			t.Fatal(err)
		}
		head := q.AddChain([]vhostusertest.Buf{{GPA: gpa, Len: 32}, {GPA: gpa + 32, Len: 32, Write: true}})
		q.Publish(head)
		if err := q.Kick(); err != nil {
			t.Fatal(err)
		}
		// The call fd is the pipe now: poll the used ring.
		deadline := time.Now().Add(vhostusertest.Timeout)
		for {
			if u, ok := q.PollUsed(); ok {
				if u.ID != head || u.Len != 32 {
					t.Fatalf("request %d: used %+v", i, u)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("request %d not served: the queue is stuck on the full call fd", i)
			}
			time.Sleep(time.Millisecond)
		}
	}
}

// TestWakeNeverBlocks: Queue.Wake is called from other goroutines (an event
// for this VM, a completed map) and with device locks held, and writes the
// kick fd, which the front-end chose. With a socket as kick fd
// whose peer never reads, the writes fill it: Wake must not wait for room,
// and the queue still runs on the front-end's kicks.
func TestWakeNeverBlocks(t *testing.T) {
	e := newEnv(t)
	path := e.serve(context.Background(), "vm", func() *echoBackend { return &echoBackend{} })
	f := started(t, path, vhostusertest.StartOptions{})
	echo(t, f, 0, 64, false)

	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sp[1])
	var idx [8]byte
	if _, err := f.Request(vhostuser.ReqSetVringKick, idx[:], []int{sp[0]}, true); err != nil {
		t.Fatal(err)
	}
	unix.Close(sp[0]) // the back-end has its own copy
	q0 := e.srv.Guest("vm").Queue(0)
	for range 200000 { // far more than a socket buffer holds
		q0.Wake()
	}

	// A kick through the socket still runs the queue.
	q := f.Queues[0]
	gpa, _, err := f.Mem.Alloc(64, 8)
	if err != nil {
		t.Fatal(err)
	}
	head := q.AddChain([]vhostusertest.Buf{{GPA: gpa, Len: 32}, {GPA: gpa + 32, Len: 32, Write: true}})
	q.Publish(head)
	var one [8]byte
	one[0] = 1
	if _, err := unix.Write(sp[1], one[:]); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(vhostusertest.Timeout)
	for {
		if u, ok := q.PollUsed(); ok {
			if u.ID != head || u.Len != 32 {
				t.Fatalf("used %+v", u)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("request not served after a kick through the socket")
		}
		time.Sleep(time.Millisecond)
	}
}
