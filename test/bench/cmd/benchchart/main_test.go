package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// synth is the synthetic run test/bench's TestRenderChart writes (and keeps
// as a golden file); its chart is testdata/synth.svg there.
const synth = "../../testdata/synth.json"

func TestRenderFromJSON(t *testing.T) {
	var out, errOut bytes.Buffer
	if err := run([]string{synth}, nil, &out, &errOut); err != nil {
		t.Fatalf("%v; stderr: %s", err, errOut.String())
	}
	want, err := os.ReadFile("../../testdata/synth.svg")
	if err != nil {
		t.Fatal(err)
	}
	// Read back and recomputed, the report draws the same chart as when it
	// was written.
	if !bytes.Equal(out.Bytes(), want) {
		t.Errorf("chart from %s differs from ../../testdata/synth.svg", synth)
	}
	d := xml.NewDecoder(bytes.NewReader(out.Bytes()))
	for {
		if _, err := d.Token(); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("not well-formed XML: %v", err)
		}
	}

	// Standard input, and the table.
	js, err := os.ReadFile(synth)
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := run([]string{"-table", "-"}, bytes.NewReader(js), &out, &errOut); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "vs smcd-copy") || !strings.Contains(out.String(), "intra-VM  http") {
		t.Errorf("table:\n%s", out.String())
	}
}

func TestOldFile(t *testing.T) {
	// A file from before the attach/copy split: transport "smcd", no
	// cells' ratio ranges. It still draws, with one bar per group.
	old := `{"started":"2025-01-02T03:04:05Z","accel":"tcg","samples":[
{"scope":"intra-VM","test":"tput","transport":"smcd","round":0,"value":300},
{"scope":"intra-VM","test":"tput","transport":"tcp","round":0,"value":100},
{"scope":"intra-VM","test":"lat","transport":"smcd","round":0,"value":50},
{"scope":"intra-VM","test":"lat","transport":"tcp","round":0,"value":100}],
"cells":[],"ratios":[{"scope":"intra-VM","test":"tput","num":"smcd","den":"tcp","value":3,"num_better":true}]}`
	p := filepath.Join(t.TempDir(), "old.json")
	if err := os.WriteFile(p, []byte(old), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := run([]string{p}, nil, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	s := out.String()
	for _, want := range []string{"accelerator tcg", "vCPUs per guest unknown", "1 round", "2025-01-02 03:04 UTC",
		">3.00</text>", ">2.00</text>", ">smcd</text>"} {
		if !strings.Contains(s, want) {
			t.Errorf("chart lacks %q", want)
		}
	}
}

func TestErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		in   string
		want string
	}{
		{[]string{"a.json", "b.json"}, "", "one results file"},
		{[]string{"/nonexistent/x.json"}, "", "no such file"},
		{nil, "{", "reading a bench report"},
		{nil, `{"samples":[]}`, "no samples"},
	} {
		err := run(c.args, strings.NewReader(c.in), io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("run(%q, %q) = %v, want an error with %q", c.args, c.in, err, c.want)
		}
	}
}
