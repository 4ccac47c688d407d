package smcd

import (
	"context"
	"io"
	"net"
	"testing"
)

// The SMC-D benchmarks run over the loopback device; each has a TCP
// loopback counterpart in this file, so the ratio can be read from one run:
//
//	go test -run X -bench . ./guestdriver/smcd

func tcpPair(b *testing.B) (net.Conn, net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	s := <-ch
	b.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

func smcPair(b *testing.B, dmb int) (net.Conn, net.Conn) {
	e := oneHost()
	e.srv.DMBSize, e.dial.DMBSize = dmb, dmb
	c, s := e.pair(b)
	mustSMC(b, c, s)
	return c, s
}

func throughput(b *testing.B, c, s net.Conn) {
	const chunk = 64 << 10
	buf := make([]byte, chunk)
	done := make(chan error, 1)
	go func() {
		rb := make([]byte, chunk)
		total := int64(b.N) * chunk
		var err error
		for total > 0 && err == nil {
			var n int
			n, err = s.Read(rb[:min(int64(len(rb)), total)])
			total -= int64(n)
		}
		done <- err
	}()
	b.SetBytes(chunk)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

func BenchmarkConnThroughput(b *testing.B) {
	c, s := smcPair(b, MaxDMBSize)
	throughput(b, c, s)
}

func BenchmarkConnThroughput64K(b *testing.B) {
	c, s := smcPair(b, 64<<10)
	throughput(b, c, s)
}

func BenchmarkTCPThroughput(b *testing.B) {
	c, s := tcpPair(b)
	throughput(b, c, s)
}

// pingPong: 14-byte messages back and forth, as the sockperf figures in
// the notes; ns/op is one round trip.
func pingPong(b *testing.B, c, s net.Conn) {
	go func() {
		buf := make([]byte, 14)
		for {
			if _, err := io.ReadFull(s, buf); err != nil {
				return
			}
			if _, err := s.Write(buf); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, 14)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkConnPingPong(b *testing.B) {
	c, s := smcPair(b, DefaultDMBSize)
	pingPong(b, c, s)
}

func BenchmarkTCPPingPong(b *testing.B) {
	c, s := tcpPair(b)
	pingPong(b, c, s)
}

// BenchmarkDial is the cost of a CLC handshake plus DMB setup over TCP
// loopback.
func BenchmarkDial(b *testing.B) {
	e := oneHost()
	ln, err := e.srv.Listen(e.srvDev, "tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		c, err := Dial(context.Background(), e.cliDev, "tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
