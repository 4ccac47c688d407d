package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"time"
)

// net-ping proves the two-VM guest network: it pings ism.peer (ICMP echo,
// reports the round trip) and then does a TCP rendezvous on ism.port, so both
// guests know the other is done before either powers off (otherwise the first
// to finish could vanish before the other's ping got an answer).
func init() {
	register("net-ping", func(e *Env) error {
		peer := net.ParseIP(e.Arg("peer", ""))
		if peer == nil || peer.To4() == nil {
			return fmt.Errorf("ism.peer=%q: need an IPv4 address", e.Arg("peer", ""))
		}
		rtt, tries, err := icmpPing(e.Ctx, peer)
		if err != nil {
			return err
		}
		e.Result("ping_rtt_us", rtt.Microseconds())
		e.Result("ping_tries", tries)
		return tcpRendezvous(e.Ctx, peer, e.ArgInt("port", 7070))
	})
}

// icmpPing sends echo requests every 200ms until one is answered (the peer
// may still be booting), then a few more, and returns the fastest round
// trip: the first reply also pays for ARP and the peer's boot.
func icmpPing(ctx context.Context, peer net.IP) (time.Duration, int, error) {
	c, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	id := uint16(os.Getpid())
	buf := make([]byte, 1500)
	sent := map[uint16]time.Time{}
	var best time.Duration
	replies := 0
	for seq := uint16(1); ; seq++ {
		if ctx.Err() != nil {
			return 0, int(seq - 1), fmt.Errorf("no ICMP echo reply from %v: %w", peer, ctx.Err())
		}
		sent[seq] = time.Now()
		if _, err := c.WriteTo(echoRequest(id, seq), &net.IPAddr{IP: peer}); err != nil {
			// ENETUNREACH and friends while the link comes up: retry.
			time.Sleep(200 * time.Millisecond)
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				break // deadline: send the next one
			}
			// Go strips the IPv4 header on ip4:icmp sockets. A late
			// reply to an earlier request counts too.
			if n < 8 || buf[0] != 0 || binary.BigEndian.Uint16(buf[4:]) != id || !from.(*net.IPAddr).IP.Equal(peer) {
				continue
			}
			t0, ok := sent[binary.BigEndian.Uint16(buf[6:])]
			if !ok {
				continue
			}
			rtt := time.Since(t0)
			if replies == 0 || rtt < best {
				best = rtt
			}
			replies++
			if binary.BigEndian.Uint16(buf[6:]) == seq {
				break
			}
		}
		if replies >= 4 {
			return best, int(seq), nil
		}
	}
}

func echoRequest(id, seq uint16) []byte {
	b := make([]byte, 16)
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], "ism-ping")
	binary.BigEndian.PutUint16(b[2:], inetChecksum(b))
	return b
}

func inetChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

// tcpRendezvous returns once we have both connected to the peer and accepted
// the peer's connection: then both sides have finished their pings.
func tcpRendezvous(ctx context.Context, peer net.IP, port int) error {
	ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", port))
	if err != nil {
		return err
	}
	defer ln.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	addr := net.JoinHostPort(peer.String(), fmt.Sprint(port))
	var d net.Dialer
	for {
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := d.DialContext(dctx, "tcp4", addr)
		cancel()
		if err == nil {
			c.Close()
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("connect %s: %w", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case err := <-accepted:
		return err
	case <-ctx.Done():
		return errors.New("peer never connected back: " + ctx.Err().Error())
	}
}
