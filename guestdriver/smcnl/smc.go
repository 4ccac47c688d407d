// Package smcnl is the kernel SMC module's netlink interface: the generic
// netlink family SMC_GEN_NETLINK (what smc-tools' smcd and smcr commands use:
// system info, SMC-D devices and link groups, the user EID table) and
// smc_diag (what smcss uses: the AF_SMC sockets). It needs only
// golang.org/x/sys/unix.
//
// SMC-Dv2 outside s390 needs a user EID: the system EID is all zeros there,
// and two ends negotiate v2 only over an EID both have (AddUEID). Changing
// the UEID table needs CAP_NET_ADMIN; reading needs nothing.
//
// Errors the kernel returned wrap its errno (errors.Is(err, unix.EEXIST)).
package smcnl

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// From include/uapi/linux/smc.h.
const (
	familyName = "SMC_GEN_NETLINK" // SMC_GENL_FAMILY_NAME
	familyVer  = 1                 // SMC_GENL_FAMILY_VERSION

	// SMC_NETLINK_* commands
	cmdGetSysInfo = 1
	cmdGetLGRSMCD = 4
	cmdGetDevSMCD = 5
	cmdDumpUEID   = 9
	cmdAddUEID    = 10
	cmdRemoveUEID = 11
	cmdFlushUEID  = 12
	cmdDumpSEID   = 13

	// SMC_GEN_* top-level attributes (all nests)
	genSysInfo = 1
	genLGRSMCD = 4
	genDevSMCD = 5

	// SMC_NLA_SYS_*
	sysVer      = 1
	sysRel      = 2
	sysIsISMv2  = 3
	sysHost     = 4
	sysSEID     = 5
	sysIsSMCRv2 = 6

	// SMC_NLA_DEV_* (SMC_GEN_DEV_SMCD)
	devUseCnt    = 1
	devIsCrit    = 2
	devPCIFID    = 3
	devPCIChid   = 4
	devPCIVendor = 5
	devPCIDevice = 6
	devPCIID     = 7
	devPort      = 8
	// SMC_NLA_DEV_PORT_* (in devPort)
	portPNETUsr = 1
	portPNETID  = 2

	// SMC_NLA_LGR_D_* (SMC_GEN_LGR_SMCD)
	lgrID         = 1
	lgrGID        = 2
	lgrPeerGID    = 3
	lgrVLAN       = 4
	lgrConns      = 5
	lgrPNETID     = 6
	lgrCHID       = 7
	lgrV2Common   = 9
	lgrExtGID     = 10
	lgrPeerExtGID = 11
	lgrSndbufAll  = 12
	lgrDMBAlloc   = 13
	// SMC_NLA_LGR_V2_* (in lgrV2Common; these start at 0)
	v2Ver      = 0
	v2Rel      = 1
	v2OS       = 2
	v2NegEID   = 3
	v2PeerHost = 4

	eidEntry    = 1 // SMC_NLA_EID_TABLE_ENTRY
	seidEntry   = 1 // SMC_NLA_SEID_ENTRY
	seidEnabled = 2 // SMC_NLA_SEID_ENABLED

	// EIDLen is SMC_MAX_EID_LEN: an EID is 32 bytes, padded with blanks.
	EIDLen = 32
	// MaxUEIDs is SMC_MAX_UEID, the size of the kernel's UEID table.
	MaxUEIDs = 4
)

// ErrNotLoaded says the kernel has no SMC generic netlink family: the smc
// module is not loaded (or the kernel has no SMC at all).
var ErrNotLoaded = errors.New("smcnl: the kernel has no " + familyName + " family (is the smc module loaded?)")

// session is a generic netlink socket and SMC's family id.
type session struct {
	c      *conn
	family uint16
}

// dialGeneric opens a generic netlink socket; tests put a fake kernel here.
var dialGeneric = func() (*conn, error) { return dial(unix.NETLINK_GENERIC) }

func open() (*session, error) {
	c, err := dialGeneric()
	if err != nil {
		return nil, fmt.Errorf("smcnl: %w", err)
	}
	id, err := resolveFamily(c, familyName)
	if err != nil {
		c.close()
		if errors.Is(err, unix.ENOENT) {
			return nil, ErrNotLoaded
		}
		return nil, fmt.Errorf("smcnl: resolving %s: %w", familyName, err)
	}
	return &session{c: c, family: id}, nil
}

// resolveFamily asks the generic netlink controller for a family's id.
func resolveFamily(c *conn, name string) (uint16, error) {
	msgs, err := c.execute(unix.GENL_ID_CTRL, 0, encodeGetFamily(name))
	if err != nil {
		return 0, err
	}
	return decodeFamilyID(msgs)
}

func (s *session) close() { s.c.close() }

// encodeGetFamily is CTRL_CMD_GETFAMILY by name.
func encodeGetFamily(name string) []byte {
	return genlPayload(unix.CTRL_CMD_GETFAMILY, 1,
		appendAttr(nil, unix.CTRL_ATTR_FAMILY_NAME, append([]byte(name), 0)))
}

// decodeFamilyID reads CTRL_ATTR_FAMILY_ID from the controller's answer.
func decodeFamilyID(msgs []message) (uint16, error) {
	for _, m := range msgs {
		_, attrs, err := splitGenl(m)
		if err != nil {
			return 0, err
		}
		for _, a := range attrs {
			if a.Type == unix.CTRL_ATTR_FAMILY_ID {
				v, err := a.uint(16)
				if err != nil {
					return 0, err
				}
				if v < unix.GENL_MIN_ID {
					return 0, fmt.Errorf("family id %d", v)
				}
				return uint16(v), nil
			}
		}
	}
	return 0, errors.New("no family id in the answer")
}

// do runs a command that changes state (the kernel ACKs it).
func do(name string, cmd uint8, attrs []byte) error {
	s, err := open()
	if err != nil {
		return err
	}
	defer s.close()
	if _, err := s.c.execute(s.family, 0, genlPayload(cmd, familyVer, attrs)); err != nil {
		return fmt.Errorf("smcnl: %s: %w", name, err)
	}
	return nil
}

// dump runs a dump command and returns each reply's attributes.
func (s *session) dump(name string, cmd uint8) ([][]attr, error) {
	msgs, err := s.c.execute(s.family, unix.NLM_F_DUMP, genlPayload(cmd, familyVer, nil))
	if err != nil {
		return nil, fmt.Errorf("smcnl: %s: %w", name, err)
	}
	out := make([][]attr, 0, len(msgs))
	for _, m := range msgs {
		if m.Type != s.family {
			return nil, fmt.Errorf("smcnl: %s: reply of type %d, not family %d", name, m.Type, s.family)
		}
		got, attrs, err := splitGenl(m)
		if err != nil {
			return nil, fmt.Errorf("smcnl: %s: %w", name, err)
		}
		if got != cmd {
			return nil, fmt.Errorf("smcnl: %s: reply to command %d", name, got)
		}
		out = append(out, attrs)
	}
	return out, nil
}

func dumpOnce(name string, cmd uint8) ([][]attr, error) {
	s, err := open()
	if err != nil {
		return nil, err
	}
	defer s.close()
	return s.dump(name, cmd)
}

// nested returns the attributes inside the first attribute of type typ,
// or nil if there is none.
func nested(attrs []attr, typ uint16) ([]attr, bool, error) {
	for _, a := range attrs {
		if a.Type == typ {
			in, err := parseAttrs(a.Data)
			return in, true, err
		}
	}
	return nil, false, nil
}

// decoder collects the first error of a run of attribute reads.
type decoder struct{ err error }

func (d *decoder) uint(a attr, bits int) uint64 {
	v, err := a.uint(bits)
	if err != nil && d.err == nil {
		d.err = err
	}
	return v
}

func (d *decoder) bool(a attr) bool { return d.uint(a, 8) != 0 }

// --- user EIDs ---------------------------------------------------------------

// ValidateUEID checks a user EID as the kernel does (smc_clc_ueid_valid) and
// returns it padded with blanks to 32 bytes, as the kernel stores it. Rules:
// at most 32 characters; A-Z, 0-9, '.' and '-'; the first one A-Z or 0-9;
// blanks only as trailing padding. A bad one is an error wrapping
// unix.EINVAL, the kernel's answer to it.
//
// Stricter than the kernel in one corner: it trims any trailing isspace()
// byte (and its ctype takes Latin-1 letters as upper case), so it would
// store "A\t" with the tab and compare it byte for byte with a peer's EID;
// here only ASCII letters and trailing blanks pass.
func ValidateUEID(name string) (string, error) {
	bad := func(why string) (string, error) {
		return "", fmt.Errorf("smcnl: UEID %q: %s: %w", name, why, unix.EINVAL)
	}
	if len(name) > EIDLen {
		return bad(fmt.Sprintf("longer than %d characters", EIDLen))
	}
	t := strings.TrimRight(name, " ")
	if t == "" {
		return bad("empty")
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		switch {
		case c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case (c == '.' || c == '-') && i > 0:
		case c == '.' || c == '-':
			return bad("the first character must be A-Z or 0-9")
		case c >= 'a' && c <= 'z':
			return bad("lower case (the kernel takes A-Z, 0-9, '.' and '-')")
		case c == ' ':
			return bad("blanks only as trailing padding")
		default:
			return bad(fmt.Sprintf("character %q (the kernel takes A-Z, 0-9, '.' and '-')", c))
		}
	}
	return t + strings.Repeat(" ", EIDLen-len(t)), nil
}

// encodeUEID is the attribute ADD_UEID and REMOVE_UEID take: the padded
// EID and a NUL, 33 bytes exactly (smc_nl_add_ueid checks the length).
func encodeUEID(padded string) []byte {
	return appendAttr(nil, eidEntry, append([]byte(padded), 0))
}

// AddUEID adds a user EID to the kernel's table (SMC_NETLINK_ADD_UEID).
// It fails with unix.EEXIST if it is there already, unix.ERANGE if the
// table holds MaxUEIDs, unix.EPERM without CAP_NET_ADMIN.
func AddUEID(name string) error {
	p, err := ValidateUEID(name)
	if err != nil {
		return err
	}
	err = do("add UEID", cmdAddUEID, encodeUEID(p))
	switch ke := kernelError(err); {
	case ke == nil:
	case ke.Errno == unix.EEXIST:
		return fmt.Errorf("smcnl: UEID %q is already set: %w", strings.TrimRight(p, " "), ke)
	case ke.Errno == unix.ERANGE:
		return fmt.Errorf("smcnl: UEID table is full (%d entries): %w", MaxUEIDs, ke)
	}
	return err
}

// kernelError is the kernel's own answer inside err, or nil.
func kernelError(err error) *Error {
	var ke *Error
	if errors.As(err, &ke) {
		return ke
	}
	return nil
}

// RemoveUEID removes a user EID; unix.ENOENT if it was not there.
func RemoveUEID(name string) error {
	p, err := ValidateUEID(name)
	if err != nil {
		return err
	}
	err = do("remove UEID", cmdRemoveUEID, encodeUEID(p))
	switch ke := kernelError(err); {
	case ke == nil:
	case ke.Errno == unix.EAGAIN:
		return nil // s390: removed, and the system EID enabled again
	case ke.Errno == unix.ENOENT:
		return fmt.Errorf("smcnl: UEID %q is not set: %w", strings.TrimRight(p, " "), ke)
	}
	return err
}

// FlushUEID empties the user EID table.
func FlushUEID() error { return do("flush UEIDs", cmdFlushUEID, nil) }

// UEIDs lists the user EID table, in the kernel's order, without padding.
func UEIDs() ([]string, error) {
	replies, err := dumpOnce("dump UEIDs", cmdDumpUEID)
	if err != nil {
		return nil, err
	}
	return decodeUEIDs(replies), nil
}

func decodeUEIDs(replies [][]attr) []string {
	out := []string{}
	for _, attrs := range replies {
		for _, a := range attrs {
			if a.Type == eidEntry {
				out = append(out, strings.TrimRight(a.str(), " "))
			}
		}
	}
	return out
}

// --- system -----------------------------------------------------------------

// System is the kernel's SMC system information.
type System struct {
	Version, Release uint8 // SMC version and release the kernel speaks
	// ISMv2 says SMC-Dv2 is possible: an ISM device took the reserved VLAN
	// (or loopback-ism exists). Without it there is no SEID.
	ISMv2  bool
	SMCRv2 bool
	Host   string // the host name SMCv2 sends its peers
	// SEID is the system EID: all zeros (empty) outside s390.
	SEID        string
	SEIDEnabled bool
	UEIDs       []string
}

// SystemInfo reads the system information, the SEID state and the UEIDs.
func SystemInfo() (System, error) {
	s, err := open()
	if err != nil {
		return System{}, err
	}
	defer s.close()
	replies, err := s.dump("system info", cmdGetSysInfo)
	if err != nil {
		return System{}, err
	}
	sys, err := decodeSystem(replies)
	if err != nil {
		return System{}, fmt.Errorf("smcnl: system info: %w", err)
	}
	if replies, err = s.dump("dump SEID", cmdDumpSEID); err != nil {
		return System{}, err
	}
	if sys.SEIDEnabled, err = decodeSEIDEnabled(replies); err != nil {
		return System{}, fmt.Errorf("smcnl: dump SEID: %w", err)
	}
	if replies, err = s.dump("dump UEIDs", cmdDumpUEID); err != nil {
		return System{}, err
	}
	sys.UEIDs = decodeUEIDs(replies)
	return sys, nil
}

func decodeSystem(replies [][]attr) (System, error) {
	var sys System
	for _, attrs := range replies {
		in, ok, err := nested(attrs, genSysInfo)
		if err != nil {
			return sys, err
		}
		if !ok {
			continue
		}
		var d decoder
		for _, a := range in {
			switch a.Type {
			case sysVer:
				sys.Version = uint8(d.uint(a, 8))
			case sysRel:
				sys.Release = uint8(d.uint(a, 8))
			case sysIsISMv2:
				sys.ISMv2 = d.bool(a)
			case sysIsSMCRv2:
				sys.SMCRv2 = d.bool(a)
			case sysHost:
				sys.Host = strings.TrimRight(a.str(), " ")
			case sysSEID:
				sys.SEID = strings.TrimRight(a.str(), " ")
			}
		}
		return sys, d.err
	}
	return sys, errors.New("no " + "SMC_GEN_SYS_INFO in the reply")
}

func decodeSEIDEnabled(replies [][]attr) (bool, error) {
	var d decoder
	on := false
	for _, attrs := range replies {
		for _, a := range attrs {
			if a.Type == seidEnabled {
				on = d.bool(a)
			}
		}
	}
	return on, d.err
}

// --- SMC-D devices ----------------------------------------------------------

// SMCDDevice is one SMC-D device as the kernel's SMC sees it (loopback-ism
// is left out by the kernel). The kernel reports no per-device v2 flag:
// System.ISMv2 is set once any device can do v2.
type SMCDDevice struct {
	PCIID          string // PCI name of the device's parent, "0000:00:04.0"
	Vendor, Device uint16 // PCI vendor and device id of that parent
	// FID and PCHID are s390's function id and physical channel id: 0
	// elsewhere. The CHID SMC-D negotiates with is SMCDLinkGroup.CHID.
	FID      uint32
	PCHID    uint16
	UseCount uint32 // link groups on the device
	Critical bool   // in use: removing it breaks connections
	PNETID   string
	// PNETIDByUser: the PNETID came from the user's pnet table, not the
	// platform.
	PNETIDByUser bool
}

// SMCDDevices lists the SMC-D devices (SMC_NETLINK_GET_DEV_SMCD).
func SMCDDevices() ([]SMCDDevice, error) {
	replies, err := dumpOnce("SMC-D devices", cmdGetDevSMCD)
	if err != nil {
		return nil, err
	}
	out := []SMCDDevice{}
	for _, attrs := range replies {
		dev, ok, err := decodeSMCDDevice(attrs)
		if err != nil {
			return nil, fmt.Errorf("smcnl: SMC-D devices: %w", err)
		}
		if ok {
			out = append(out, dev)
		}
	}
	return out, nil
}

func decodeSMCDDevice(attrs []attr) (SMCDDevice, bool, error) {
	var dev SMCDDevice
	in, ok, err := nested(attrs, genDevSMCD)
	if err != nil || !ok {
		return dev, false, err
	}
	var d decoder
	for _, a := range in {
		switch a.Type {
		case devUseCnt:
			dev.UseCount = uint32(d.uint(a, 32))
		case devIsCrit:
			dev.Critical = d.bool(a)
		case devPCIFID:
			dev.FID = uint32(d.uint(a, 32))
		case devPCIChid:
			dev.PCHID = uint16(d.uint(a, 16))
		case devPCIVendor:
			dev.Vendor = uint16(d.uint(a, 16))
		case devPCIDevice:
			dev.Device = uint16(d.uint(a, 16))
		case devPCIID:
			dev.PCIID = a.str()
		case devPort:
			port, err := parseAttrs(a.Data)
			if err != nil {
				return dev, false, fmt.Errorf("device port: %w", err)
			}
			for _, p := range port {
				switch p.Type {
				case portPNETUsr:
					dev.PNETIDByUser = d.bool(p)
				case portPNETID:
					dev.PNETID = strings.TrimRight(p.str(), " ")
				}
			}
		}
	}
	return dev, d.err == nil, d.err
}

// --- SMC-D link groups ------------------------------------------------------

// SMCDLinkGroup is one SMC-D link group: the connections between this
// device and one peer GID.
type SMCDLinkGroup struct {
	ID                  uint32
	GID, GIDExt         uint64 // our device's GID
	PeerGID, PeerGIDExt uint64
	CHID                uint16 // the device's CHID, as negotiated
	VLAN                uint8
	Conns               uint32
	PNETID              string
	SndBufAlloc         uint64 // bytes of send buffers
	DMBAlloc            uint64 // bytes of DMBs
	V2                  *LinkGroupV2
}

// LinkGroupV2 is what an SMCv2 link group adds.
type LinkGroupV2 struct {
	Version, PeerRelease, PeerOS uint8
	NegotiatedEID                string
	PeerHost                     string
}

// SMCDLinkGroups lists the SMC-D link groups (SMC_NETLINK_GET_LGR_SMCD).
func SMCDLinkGroups() ([]SMCDLinkGroup, error) {
	replies, err := dumpOnce("SMC-D link groups", cmdGetLGRSMCD)
	if err != nil {
		return nil, err
	}
	out := []SMCDLinkGroup{}
	for _, attrs := range replies {
		lg, ok, err := decodeSMCDLinkGroup(attrs)
		if err != nil {
			return nil, fmt.Errorf("smcnl: SMC-D link groups: %w", err)
		}
		if ok {
			out = append(out, lg)
		}
	}
	return out, nil
}

func decodeSMCDLinkGroup(attrs []attr) (SMCDLinkGroup, bool, error) {
	var lg SMCDLinkGroup
	in, ok, err := nested(attrs, genLGRSMCD)
	if err != nil || !ok {
		return lg, false, err
	}
	var d decoder
	for _, a := range in {
		switch a.Type {
		case lgrID:
			lg.ID = uint32(d.uint(a, 32))
		case lgrGID:
			lg.GID = d.uint(a, 64)
		case lgrExtGID:
			lg.GIDExt = d.uint(a, 64)
		case lgrPeerGID:
			lg.PeerGID = d.uint(a, 64)
		case lgrPeerExtGID:
			lg.PeerGIDExt = d.uint(a, 64)
		case lgrVLAN:
			lg.VLAN = uint8(d.uint(a, 8))
		case lgrConns:
			lg.Conns = uint32(d.uint(a, 32))
		case lgrCHID:
			lg.CHID = uint16(d.uint(a, 16))
		case lgrPNETID:
			lg.PNETID = strings.TrimRight(a.str(), " ")
		case lgrSndbufAll:
			lg.SndBufAlloc = d.uint(a, 64)
		case lgrDMBAlloc:
			lg.DMBAlloc = d.uint(a, 64)
		case lgrV2Common:
			v2attrs, err := parseAttrs(a.Data)
			if err != nil {
				return lg, false, fmt.Errorf("link group v2: %w", err)
			}
			v2 := &LinkGroupV2{}
			for _, v := range v2attrs {
				switch v.Type {
				case v2Ver:
					v2.Version = uint8(d.uint(v, 8))
				case v2Rel:
					v2.PeerRelease = uint8(d.uint(v, 8))
				case v2OS:
					v2.PeerOS = uint8(d.uint(v, 8))
				case v2NegEID:
					v2.NegotiatedEID = strings.TrimRight(v.str(), " ")
				case v2PeerHost:
					v2.PeerHost = strings.TrimRight(v.str(), " ")
				}
			}
			lg.V2 = v2
		}
	}
	return lg, d.err == nil, d.err
}
