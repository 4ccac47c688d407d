// Command smcctl is smc-tools' job for the guests, without smc-tools: the
// kernel SMC's system information, user EID table, SMC-D devices and link
// groups (smcd info/ueid/device/linkgroup), and its AF_SMC sockets (smcss).
//
//	smcctl info
//	smcctl ueid add NAME | del NAME | flush | list
//	smcctl devices
//	smcctl linkgroups
//	smcctl ss
//
// Errors are one line on stderr; exit status 1 for a failure, 2 for bad
// usage.
package main

//ism:guest-tool

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/ism-backend/ism-backend/guestdriver/smcnl"
)

const usage = "usage: smcctl info | ueid add NAME | ueid del NAME | ueid flush | ueid list | devices | linkgroups | ss"

// errUsage marks a command line smcctl does not take.
type errUsage string

func (e errUsage) Error() string { return string(e) }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	err := dispatch(args, stdout)
	if err == nil {
		return 0
	}
	// One line, whatever the error wraps.
	msg := strings.ReplaceAll(strings.TrimPrefix(err.Error(), "smcnl: "), "\n", "; ")
	fmt.Fprintf(stderr, "smcctl: %s\n", msg)
	var u errUsage
	if errors.As(err, &u) {
		fmt.Fprintln(stderr, usage)
		return 2
	}
	return 1
}

func dispatch(args []string, w io.Writer) error {
	if len(args) == 0 {
		return errUsage("no command")
	}
	cmd, rest := args[0], args[1:]
	want := func(n int) error {
		if len(rest) != n {
			return errUsage(fmt.Sprintf("%s takes %d argument(s), got %d", strings.Join(args[:min(len(args), 2)], " "), n, len(rest)))
		}
		return nil
	}
	switch cmd {
	case "info":
		if err := want(0); err != nil {
			return err
		}
		sys, err := smcnl.SystemInfo()
		if err != nil {
			return err
		}
		return printInfo(w, sys)
	case "ueid":
		return ueid(rest, w)
	case "devices", "device":
		if err := want(0); err != nil {
			return err
		}
		devs, err := smcnl.SMCDDevices()
		if err != nil {
			return err
		}
		return printDevices(w, devs)
	case "linkgroups", "linkgroup":
		if err := want(0); err != nil {
			return err
		}
		lgs, err := smcnl.SMCDLinkGroups()
		if err != nil {
			return err
		}
		return printLinkGroups(w, lgs)
	case "ss":
		if err := want(0); err != nil {
			return err
		}
		socks, err := smcnl.Sockets()
		if err != nil {
			return err
		}
		return printSockets(w, socks)
	case "-h", "--help", "help":
		_, err := fmt.Fprintln(w, usage)
		return err
	}
	return errUsage(fmt.Sprintf("unknown command %q", cmd))
}

func ueid(args []string, w io.Writer) error {
	if len(args) == 0 {
		return errUsage("ueid: add, del, flush or list?")
	}
	sub, rest := args[0], args[1:]
	name := func() (string, error) {
		if len(rest) != 1 {
			return "", errUsage(fmt.Sprintf("ueid %s takes one NAME, got %d arguments", sub, len(rest)))
		}
		return rest[0], nil
	}
	none := func() error {
		if len(rest) != 0 {
			return errUsage(fmt.Sprintf("ueid %s takes no arguments", sub))
		}
		return nil
	}
	switch sub {
	case "add":
		n, err := name()
		if err != nil {
			return err
		}
		return smcnl.AddUEID(n)
	case "del", "delete", "remove":
		n, err := name()
		if err != nil {
			return err
		}
		return smcnl.RemoveUEID(n)
	case "flush":
		if err := none(); err != nil {
			return err
		}
		return smcnl.FlushUEID()
	case "list", "show":
		if err := none(); err != nil {
			return err
		}
		ids, err := smcnl.UEIDs()
		if err != nil {
			return err
		}
		for _, id := range ids {
			if _, err := fmt.Fprintln(w, id); err != nil {
				return err
			}
		}
		return nil
	}
	return errUsage(fmt.Sprintf("ueid: unknown subcommand %q", sub))
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func printInfo(w io.Writer, s smcnl.System) error {
	ueids := "-"
	if len(s.UEIDs) > 0 {
		ueids = strings.Join(s.UEIDs, " ")
	}
	seid := orDash(s.SEID)
	if s.ISMv2 {
		seid += " (" + map[bool]string{true: "enabled", false: "disabled"}[s.SEIDEnabled] + ")"
	}
	_, err := fmt.Fprintf(w, "SMC version:   %d.%d\nHost name:     %s\nSMC-D v2:      %s\nSMC-R v2:      %s\nSEID:          %s\nUEIDs:         %s\n",
		s.Version, s.Release, orDash(s.Host), yesNo(s.ISMv2), yesNo(s.SMCRv2), seid, ueids)
	return err
}

func printDevices(w io.Writer, devs []smcnl.SMCDDevice) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PCI-ID\tVendor:Device\tFID\tPCHID\tInUse\t#LGs\tPNET-ID")
	for _, d := range devs {
		pnet := orDash(d.PNETID)
		if d.PNETIDByUser {
			pnet += "*"
		}
		fmt.Fprintf(tw, "%s\t%04x:%04x\t%04x\t%04x\t%s\t%d\t%s\n",
			orDash(d.PCIID), d.Vendor, d.Device, d.FID, d.PCHID, yesNo(d.Critical), d.UseCount, pnet)
	}
	return tw.Flush()
}

func printLinkGroups(w io.Writer, lgs []smcnl.SMCDLinkGroup) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "LG-ID\tGID\tPeer-GID\tCHID\tVLAN\t#Conns\tVersion\tEID\tPeer-Host")
	for _, l := range lgs {
		ver, eid, host := "1", "-", "-"
		if l.V2 != nil {
			ver, eid, host = fmt.Sprintf("%d.%d", l.V2.Version, l.V2.PeerRelease), orDash(l.V2.NegotiatedEID), orDash(l.V2.PeerHost)
		}
		fmt.Fprintf(tw, "%08x\t%016x\t%016x\t%04x\t%d\t%d\t%s\t%s\t%s\n",
			l.ID, l.GID, l.PeerGID, l.CHID, l.VLAN, l.Conns, ver, eid, host)
	}
	return tw.Flush()
}

// printSockets lists the AF_SMC sockets like smcss: the mode is SMCD, SMCR,
// or TCP with the fallback reason, the peer's diagnosis after a slash when
// it declined, and what the reason means.
func printSockets(w io.Writer, socks []smcnl.Socket) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "State\tUID\tInode\tLocal Address\tPeer Address\tIntf\tMode")
	for _, s := range socks {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%d\t%s\n",
			smcnl.StateName(s.State), s.UID, s.Inode, addr(s.Local), addr(s.Peer), s.Interface, mode(s))
	}
	return tw.Flush()
}

// smcLISTEN is SMC_LISTEN (enum smc_state).
const smcLISTEN = 10

func addr(a interface {
	IsValid() bool
	String() string
}) string {
	if !a.IsValid() {
		return "-"
	}
	return a.String()
}

func mode(s smcnl.Socket) string {
	if s.State == smcLISTEN {
		return "-" // decided per accepted connection
	}
	if s.Mode != smcnl.ModeFallbackTCP || s.Fallback == nil {
		if s.Mode == smcnl.ModeSMCD && s.DMB != nil {
			return fmt.Sprintf("SMCD token=%#x peer_token=%#x", s.DMB.Token, s.DMB.PeerToken)
		}
		return s.Mode.String()
	}
	m := fmt.Sprintf("TCP %#08x", s.Fallback.Reason)
	if s.Fallback.PeerDiagnosis != 0 {
		m += fmt.Sprintf("/%#08x", s.Fallback.PeerDiagnosis)
	}
	if t := smcnl.DeclineText(s.Fallback.Reason); t != "" {
		m += " (" + t + ")"
	}
	return m
}
