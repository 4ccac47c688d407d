package main

// The kernel's own view of its AF_SMC sockets, from smc_diag (sock_diag
// netlink, what smcss uses): whether a connection fell back to TCP, why,
// and the peer's decline code; for SMC-D, the GIDs and DMB tokens.

import (
	"encoding/binary"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// include/uapi/linux/smc_diag.h
const (
	smcDiagModeFallback = 1  // SMC_DIAG_MODE_FALLBACK_TCP
	smcDiagModeSMCD     = 2  // SMC_DIAG_MODE_SMCD
	smcDiagDMBInfoAttr  = 4  // SMC_DIAG_DMBINFO: struct smcd_diag_dmbinfo
	smcDiagFallbackAttr = 5  // SMC_DIAG_FALLBACK: {u32 reason, u32 peer_diagnosis}
	smcDiagDMBInfoLen   = 56 // u32 linkid (padded to 8), then peer_gid, my_gid, token, peer_token, peer_gid_ext, my_gid_ext
	smcDiagReqLen       = 4 + 48
	smcDiagMsgLen       = 4 + 48 + 4 + 8 // family..shutdown, id, uid, inode (8-aligned at 56)
)

type smcDiag struct {
	State, Mode           uint8
	SPort, DPort          uint16
	Reason, PeerDiagnosis uint32
	HasFallback           bool
	// SMC-D only (SMC_DIAG_DMBINFO): the link group's GIDs and the
	// connection's DMB tokens.
	HasDMB           bool
	MyGID, PeerGID   uint64
	Token, PeerToken uint64
}

func (d smcDiag) String() string {
	mode := map[uint8]string{0: "smcr", 1: "fallback", 2: "smcd"}[d.Mode]
	return fmt.Sprintf("mode=%s reason=%#08x peer_diagnosis=%#08x", mode, d.Reason, d.PeerDiagnosis)
}

// smcDiagDump lists the kernel's AF_SMC sockets.
func smcDiagDump() ([]smcDiag, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("smc_diag: %w", err)
	}
	defer unix.Close(fd)
	req := make([]byte, unix.NLMSG_HDRLEN+smcDiagReqLen)
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(req[8:], 1)
	r := req[unix.NLMSG_HDRLEN:]
	r[0] = unix.AF_SMC
	r[3] = 1<<(smcDiagFallbackAttr-1) | 1<<(smcDiagDMBInfoAttr-1)
	// id: all zero, cookie "none"
	binary.NativeEndian.PutUint32(r[4+40:], ^uint32(0))
	binary.NativeEndian.PutUint32(r[4+44:], ^uint32(0))
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("smc_diag: send: %w", err)
	}
	var out []smcDiag
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return nil, fmt.Errorf("smc_diag: recv: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("smc_diag: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
						return nil, fmt.Errorf("smc_diag: %w (is smc_diag loaded?)", unix.Errno(-e))
					}
				}
				return out, nil
			}
			d, err := parseSMCDiag(m.Data)
			if err != nil {
				return nil, err
			}
			out = append(out, d)
		}
	}
}

func parseSMCDiag(b []byte) (smcDiag, error) {
	if len(b) < smcDiagMsgLen {
		return smcDiag{}, fmt.Errorf("smc_diag: message of %d bytes", len(b))
	}
	d := smcDiag{State: b[1], Mode: b[2],
		SPort: binary.BigEndian.Uint16(b[4:]), DPort: binary.BigEndian.Uint16(b[6:])}
	for a := b[smcDiagMsgLen:]; len(a) >= 4; {
		l, typ := int(binary.NativeEndian.Uint16(a)), binary.NativeEndian.Uint16(a[2:])
		if l < 4 || l > len(a) {
			return d, fmt.Errorf("smc_diag: attribute length %d of %d", l, len(a))
		}
		if typ == smcDiagFallbackAttr && l >= 12 {
			d.Reason = binary.NativeEndian.Uint32(a[4:])
			d.PeerDiagnosis = binary.NativeEndian.Uint32(a[8:])
			d.HasFallback = true
		}
		if typ == smcDiagDMBInfoAttr && l >= 4+smcDiagDMBInfoLen {
			v := a[4:]
			d.PeerGID = binary.NativeEndian.Uint64(v[8:])
			d.MyGID = binary.NativeEndian.Uint64(v[16:])
			d.Token = binary.NativeEndian.Uint64(v[24:])
			d.PeerToken = binary.NativeEndian.Uint64(v[32:])
			d.HasDMB = true
		}
		a = a[min(len(a), (l+3)&^3):]
	}
	return d, nil
}

// smcDiagOf finds the kernel's AF_SMC socket with these ports.
func smcDiagOf(sport, dport int) (smcDiag, error) {
	all, err := smcDiagDump()
	if err != nil {
		return smcDiag{}, err
	}
	for _, d := range all {
		if int(d.SPort) == sport && int(d.DPort) == dport {
			return d, nil
		}
	}
	return smcDiag{}, fmt.Errorf("smc_diag: no AF_SMC socket %d->%d among %d", sport, dport, len(all))
}
