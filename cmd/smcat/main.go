// Command smcat is netcat over SMC-D: it dials or listens with the userspace
// SMC-D stack and copies stdin to the connection and the connection to
// stdout. When the peer declines SMC-D it runs over plain TCP, and says so
// on stderr.
//
//	smcat [flags] host:port        connect
//	smcat -l [flags] [host]:port   accept one connection
//	smcat -l -echo [flags] :port   echo server for any number of connections
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

var (
	listen  = flag.Bool("l", false, "listen instead of connecting")
	echo    = flag.Bool("echo", false, "with -l: echo every connection back to its sender, forever")
	dmbSize = flag.Int("dmb", smcd.DefaultDMBSize, "receive DMB size in bytes: a power of two, 16 KiB..1 MiB")
	timeout = flag.Duration("timeout", smcd.DefaultHandshakeTimeout, "CLC handshake timeout")
	network = flag.String("net", "tcp", "tcp, tcp4 or tcp6")
	quiet   = flag.Bool("q", false, "do not report the transport on stderr")
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("smcat: ")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: smcat [flags] host:port | smcat -l [-echo] [flags] [host]:port\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	dev, err := openDevice()
	if err != nil {
		log.Fatal(err)
	}
	addr := flag.Arg(0)
	if *listen {
		err = serve(dev, addr)
	} else {
		err = dial(dev, addr)
	}
	if err != nil {
		log.Fatal(err)
	}
}

func report(c net.Conn) {
	if *quiet {
		return
	}
	if smcd.IsSMC(c) {
		log.Printf("%v <-> %v: SMC-D (peer GID %#x)", c.LocalAddr(), c.RemoteAddr(), c.(*smcd.Conn).PeerGID())
		return
	}
	if f, ok := c.(*smcd.FallbackConn); ok {
		log.Printf("%v <-> %v: TCP fallback: %v", c.LocalAddr(), c.RemoteAddr(), f.Reason)
	}
}

func dial(dev smcd.ISM, addr string) error {
	d := smcd.Dialer{DMBSize: *dmbSize, HandshakeTimeout: *timeout}
	c, err := d.DialContext(context.Background(), dev, *network, addr)
	if err != nil {
		return err
	}
	report(c)
	return pipe(c)
}

func serve(dev smcd.ISM, addr string) error {
	s := smcd.Server{DMBSize: *dmbSize, HandshakeTimeout: *timeout}
	ln, err := s.Listen(dev, *network, addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	if !*quiet {
		log.Printf("listening on %v (GID %#x, CHID %#04x)", ln.Addr(), dev.GID(), dev.CHID())
	}
	if !*echo {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		report(c)
		return pipe(c)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			log.Print(err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		report(c)
		go func() {
			defer c.Close()
			io.Copy(c, c)
			closeWrite(c)
		}()
	}
}

type closeWriter interface{ CloseWrite() error }

func closeWrite(c net.Conn) {
	if cw, ok := c.(closeWriter); ok {
		cw.CloseWrite()
	}
}

// pipe copies stdin to c (then half-closes) and c to stdout; it returns
// when the peer has finished sending.
func pipe(c net.Conn) error {
	defer c.Close()
	go func() {
		if _, err := io.Copy(c, os.Stdin); err != nil {
			log.Printf("send: %v", err)
		}
		closeWrite(c)
	}()
	_, err := io.Copy(os.Stdout, c)
	return err
}
