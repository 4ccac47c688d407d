package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"
)

// WaitPeer waits until ip answers an ICMP echo: the peer guest has booted
// and configured its link. Guests boot at different speeds under TCG, so a
// first connect to the peer can fail with "no route to host" (ARP
// unanswered). ism.wait_peer=<ip> makes the agent call this before the
// scenario runs.
func (e *Env) WaitPeer(ip string) error {
	p := net.ParseIP(ip)
	if p == nil || p.To4() == nil {
		return fmt.Errorf("wait for peer %q: need an IPv4 address", ip)
	}
	start := time.Now()
	if _, _, err := icmpPing(e.Ctx, p); err != nil {
		return fmt.Errorf("wait for peer: %w", err)
	}
	e.Logf("peer %s answers after %v", ip, time.Since(start).Round(time.Millisecond))
	return nil
}

// DialTCP connects to addr ("169.254.7.1:7000"), retrying while the peer is
// still booting or not listening yet (unreachable, refused, timed out),
// until e.Ctx ends. Other errors return at once.
func (e *Env) DialTCP(addr string) (net.Conn, error) {
	var d net.Dialer
	for {
		ctx, cancel := context.WithTimeout(e.Ctx, 2*time.Second)
		c, err := d.DialContext(ctx, "tcp", addr)
		cancel()
		if err == nil {
			return c, nil
		}
		if e.Ctx.Err() != nil || !retryableDial(err) {
			return nil, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func retryableDial(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, syscall.ETIMEDOUT)
}
