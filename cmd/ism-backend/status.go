package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// runStatus is `ism-backend status [-socket-dir DIR] [-json]`: it asks the
// backend serving DIR for its status and prints it, as smc-tools' `smcd
// device`, `smcd stats` and `smcss` do for the kernel's SMC.
func runStatus(args []string, out, errOut io.Writer) error {
	fs := flag.NewFlagSet("ism-backend status", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dir := fs.String("socket-dir", "/run/ism", "the backend's socket directory `DIR` (its control socket is DIR/"+controlName+")")
	asJSON := fs.Bool("json", false, "print the status as JSON, for scripts")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the backend")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(errOut)
			fmt.Fprintln(errOut, "usage: ism-backend status [-socket-dir DIR] [-json]")
			fs.PrintDefaults()
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	a, err := askControl(*dir, "status", *timeout)
	if err != nil {
		return err
	}
	if a.Status == nil {
		return errors.New("the backend answered without a status")
	}
	if *asJSON {
		e := json.NewEncoder(out)
		e.SetIndent("", "  ")
		return e.Encode(a.Status)
	}
	return writeStatus(out, a.Status)
}

// writeStatus prints s as tables: devices, DMBs, counters per VM.
func writeStatus(out io.Writer, s *statusJSON) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "Devices (CHID %s, %s)\n", s.CHID, s.Time)
	fmt.Fprintln(w, "VM\tGID\tConnected\tSince\tModes")
	for _, d := range s.Devices {
		since := d.Since
		if since == "" {
			since = "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", d.VM, d.GID, yesNo(d.Connected), since, d.Modes)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "DMBs (%d)\n", len(s.DMBs))
	fmt.Fprintln(w, "Owner\tIndex\tToken\tRGID\tSize\tMode\tAttached by")
	for _, d := range s.DMBs {
		by := strings.Join(d.AttachedBy, ",")
		if by == "" {
			by = "-"
		}
		fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%d\t%s\t%s\n", d.Owner, d.Index, d.TokenPrefix, d.RGID, d.Size, d.Mode, by)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Counters")
	fmt.Fprintln(w, "VM\tDMBs\tMOVEs\tBytes\tSignalled\tSIGNALs\tEvents\tMaps\tRefused\tDropped")
	row := func(name string, c statsJSON) {
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", name, c.DMBs, c.Moves, c.MoveBytes, c.Signals, c.SWEvents,
			c.Events, c.Maps, c.RefusedTotal, c.SWEventsDropped+c.DeviceEventsDropped)
	}
	for _, v := range s.VMs {
		row(v.Name, v.Stats)
	}
	row("(total)", s.Total)
	if err := w.Flush(); err != nil {
		return err
	}
	if len(s.Faults) > 0 {
		fmt.Fprintf(out, "\nFAULT INJECTION ON (%d)\n", len(s.Faults))
		return writeFaults(out, s.Faults)
	}
	return nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
