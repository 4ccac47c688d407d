// Command benchchart re-renders the `make bench` chart from a results JSON
// (what test/bench writes as bench-results/latest.json and its time-stamped
// copies), e.g. for the checked-in copy the README shows:
//
//	go run ./test/bench/cmd/benchchart bench-results/latest.json > docs/bench.svg
//
// With -table it prints the text table instead. The cells and ratios are
// recomputed from the file's samples, so an older file gets today's figures.
// "-" or no argument reads standard input.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/ism-backend/ism-backend/test/bench"
)

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "benchchart:", err)
		os.Exit(1)
	}
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("benchchart", flag.ContinueOnError)
	fs.SetOutput(stderr)
	table := fs.Bool("table", false, "print the text table instead of the SVG")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: benchchart [-table] [results.json|-] > chart.svg")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 1 {
		fs.Usage()
		return errors.New("one results file at most")
	}
	in, name := stdin, "standard input"
	if p := fs.Arg(0); p != "" && p != "-" {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		in, name = f, p
	}
	r, err := bench.ReadReport(in)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if len(r.Samples) == 0 {
		return fmt.Errorf("%s: no samples to draw", name)
	}
	if *table {
		return r.WriteTable(stdout)
	}
	return r.WriteSVG(stdout)
}
