package metrics

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/sirupsen/logrus"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
)

type notifier struct {
	mu     sync.Mutex
	events []abi.Event
}

func (n *notifier) Interrupt() {}
func (n *notifier) PostEvent(ev abi.Event) bool {
	n.mu.Lock()
	n.events = append(n.events, ev)
	n.mu.Unlock()
	return true
}

func connect(t *testing.T, f *ism.Fabric, name string, gid uint64) *ism.Device {
	t.Helper()
	mem, err := ism.NewSliceMemory(ism.Region{GPA: 0, Data: make([]byte, 1<<20)})
	if err != nil {
		t.Fatal(err)
	}
	d, err := f.Connect(name, gid, mem, &notifier{})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func handle(t *testing.T, d *ism.Device, req abi.Request, data [][]byte, want abi.Status) abi.Response {
	t.Helper()
	r := d.Handle(req, data)
	if r.Status != want {
		t.Fatalf("%v: %v, want %v", req.Op, r.Status, want)
	}
	return r
}

// fabricAfterTraffic: a and b connected (c configured, never connected);
// a owns a DMB for b; b MOVEs 100 + 28 bytes into it, one signalled; b
// tries a forged token once; c... is not there, and b SIGNALs a GID it has
// no DMB with.
func fabricAfterTraffic(t *testing.T) *Collector {
	log := logrus.New()
	log.SetOutput(io.Discard)
	f := ism.NewFabric(abi.DefaultCHID, logrus.NewEntry(log))
	a := connect(t, f, "a", 0xA)
	b := connect(t, f, "b", 0xB)
	connect(t, f, "d", 0xD)
	handle(t, a, abi.Request{Op: abi.OpSetSBA, Addr: 0x1000}, nil, abi.StatusOK)
	tok := handle(t, a, abi.Request{Op: abi.OpRegisterDMB, Addr: 0x10000, Len: 4096, GID: 0xB, Index: 1}, nil, abi.StatusOK).Value
	handle(t, b, abi.Request{Op: abi.OpMove, Token: tok, Len: 100}, [][]byte{make([]byte, 100)}, abi.StatusOK)
	handle(t, b, abi.Request{Op: abi.OpMove, Token: tok, Offset: 100, Len: 28, Flags: abi.FlagSignal}, [][]byte{make([]byte, 28)}, abi.StatusOK)
	handle(t, b, abi.Request{Op: abi.OpMove, Token: tok ^ 0x5a5a, Len: 1}, [][]byte{{1}}, abi.StatusNoEntry)
	handle(t, b, abi.Request{Op: abi.OpSignal, GID: 0xD, Index: 1}, nil, abi.StatusPermission)
	conn := func(vm string) vhostuser.Stats {
		if vm == "b" {
			return vhostuser.Stats{Messages: 42, BadMessages: 1, BadChains: 2}
		}
		return vhostuser.Stats{}
	}
	return NewCollector(f, []VM{{"a", 0xA}, {"b", 0xB}, {"c", 0xC}}, conn)
}

func TestCollectorValues(t *testing.T) {
	c := fabricAfterTraffic(t)
	want := `
# HELP ism_backend_devices ISM devices connected to the fabric now.
# TYPE ism_backend_devices gauge
ism_backend_devices 3
# HELP ism_backend_dmbs Live DMBs of the whole fabric.
# TYPE ism_backend_dmbs gauge
ism_backend_dmbs 1
# HELP ism_backend_fabric_info The fabric's channel id (CHID); always 1.
# TYPE ism_backend_fabric_info gauge
ism_backend_fabric_info{chid="0xff00"} 1
# HELP ism_backend_vm_connected 1 if the VM's device is connected to the fabric now.
# TYPE ism_backend_vm_connected gauge
ism_backend_vm_connected{gid="0x000000000000000a",vm="a"} 1
ism_backend_vm_connected{gid="0x000000000000000b",vm="b"} 1
ism_backend_vm_connected{gid="0x000000000000000c",vm="c"} 0
ism_backend_vm_connected{gid="0x000000000000000d",vm="d"} 1
# HELP ism_backend_vm_dmbs Live DMBs of the VM's connected device.
# TYPE ism_backend_vm_dmbs gauge
ism_backend_vm_dmbs{gid="0x000000000000000a",vm="a"} 1
ism_backend_vm_dmbs{gid="0x000000000000000b",vm="b"} 0
ism_backend_vm_dmbs{gid="0x000000000000000c",vm="c"} 0
ism_backend_vm_dmbs{gid="0x000000000000000d",vm="d"} 0
# HELP ism_backend_vm_move_bytes_total Bytes the backend copied for the VM's MOVEs.
# TYPE ism_backend_vm_move_bytes_total counter
ism_backend_vm_move_bytes_total{gid="0x000000000000000a",vm="a"} 0
ism_backend_vm_move_bytes_total{gid="0x000000000000000b",vm="b"} 128
ism_backend_vm_move_bytes_total{gid="0x000000000000000c",vm="c"} 0
ism_backend_vm_move_bytes_total{gid="0x000000000000000d",vm="d"} 0
# HELP ism_backend_vm_moves_total Successful MOVEs the VM sent.
# TYPE ism_backend_vm_moves_total counter
ism_backend_vm_moves_total{gid="0x000000000000000a",vm="a"} 0
ism_backend_vm_moves_total{gid="0x000000000000000b",vm="b"} 2
ism_backend_vm_moves_total{gid="0x000000000000000c",vm="c"} 0
ism_backend_vm_moves_total{gid="0x000000000000000d",vm="d"} 0
# HELP ism_backend_vm_signalled_moves_total Successful signalled MOVEs the VM sent.
# TYPE ism_backend_vm_signalled_moves_total counter
ism_backend_vm_signalled_moves_total{gid="0x000000000000000a",vm="a"} 0
ism_backend_vm_signalled_moves_total{gid="0x000000000000000b",vm="b"} 1
ism_backend_vm_signalled_moves_total{gid="0x000000000000000c",vm="c"} 0
ism_backend_vm_signalled_moves_total{gid="0x000000000000000d",vm="d"} 0
# HELP ism_backend_vm_vhost_messages_total Front-end messages of the current vhost-user connection.
# TYPE ism_backend_vm_vhost_messages_total counter
ism_backend_vm_vhost_messages_total{gid="0x000000000000000a",vm="a"} 0
ism_backend_vm_vhost_messages_total{gid="0x000000000000000b",vm="b"} 42
ism_backend_vm_vhost_messages_total{gid="0x000000000000000c",vm="c"} 0
ism_backend_vm_vhost_messages_total{gid="0x000000000000000d",vm="d"} 0
`
	names := []string{"ism_backend_devices", "ism_backend_dmbs", "ism_backend_fabric_info", "ism_backend_vm_connected",
		"ism_backend_vm_dmbs", "ism_backend_vm_move_bytes_total", "ism_backend_vm_moves_total",
		"ism_backend_vm_signalled_moves_total", "ism_backend_vm_vhost_messages_total"}
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), names...); err != nil {
		t.Fatal(err)
	}
}

// TestCollectorRefusals: every refusal lands under its status, reason and
// VM, and nowhere else.
func TestCollectorRefusals(t *testing.T) {
	c := fabricAfterTraffic(t)
	got := map[string]float64{}
	for _, name := range []string{"ism_backend_vm_requests_refused_total", "ism_backend_vm_signals_refused_total"} {
		for _, vm := range []string{"a", "b", "c", "d"} {
			for _, l := range []string{"invalid", "unsupported", "no_entry", "permission", "range", "fault", "no_space", "busy", "not_ready", "internal", "peer", "rate", "queue"} {
				got[name+"/"+vm+"/"+l] = 0
			}
		}
	}
	// Gather through a registry, as a scrape does, and read every sample.
	r := Registry(c)
	mfs, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series := 0
	for _, mf := range mfs {
		switch mf.GetName() {
		case "ism_backend_vm_requests_refused_total", "ism_backend_vm_signals_refused_total":
		default:
			continue
		}
		for _, m := range mf.GetMetric() {
			var vm, l string
			for _, lp := range m.GetLabel() {
				switch lp.GetName() {
				case "vm":
					vm = lp.GetValue()
				case "status", "reason":
					l = lp.GetValue()
				}
			}
			key := mf.GetName() + "/" + vm + "/" + l
			if _, ok := got[key]; !ok {
				t.Errorf("unexpected series %s", key)
			}
			got[key] = m.GetCounter().GetValue()
			series++
		}
	}
	if series != 4*(ism.NumStatus-1)+4*3 {
		t.Errorf("%d refusal series, want %d", series, 4*(ism.NumStatus-1)+4*3)
	}
	for key, v := range got {
		want := 0.0
		switch key {
		case "ism_backend_vm_requests_refused_total/b/no_entry",
			"ism_backend_vm_requests_refused_total/b/permission",
			"ism_backend_vm_signals_refused_total/b/peer":
			want = 1
		}
		if v != want {
			t.Errorf("%s = %v, want %v", key, v, want)
		}
	}
	// The process and Go collectors are registered beside ours.
	var process, goRuntime bool
	for _, mf := range mfs {
		process = process || strings.HasPrefix(mf.GetName(), "process_")
		goRuntime = goRuntime || strings.HasPrefix(mf.GetName(), "go_")
	}
	if !process || !goRuntime {
		t.Errorf("process metrics %v, Go metrics %v", process, goRuntime)
	}
}

// TestListen: /metrics answers with the text format while ctx lives.
func TestListen(t *testing.T) {
	c := fabricAfterTraffic(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := Listen(ctx, "127.0.0.1:0", Registry(c))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `ism_backend_vm_moves_total{gid="0x000000000000000b",vm="b"} 2`) {
		t.Fatalf("status %d, body:\n%s", resp.StatusCode, body)
	}
	cancel()
	if _, err := Listen(context.Background(), "256.0.0.1:1", Registry(fabricAfterTraffic(t))); err == nil {
		t.Fatal("Listen on a bad address did not fail")
	}
}

// TestCollectorFaults: injected faults are counted per target VM and kind:
// b's signals dropped (every one, from b), a's DMB revoked.
func TestCollectorFaults(t *testing.T) {
	log := logrus.New()
	log.SetOutput(io.Discard)
	f := ism.NewFabric(abi.DefaultCHID, logrus.NewEntry(log))
	a := connect(t, f, "a", 0xA)
	b := connect(t, f, "b", 0xB)
	handle(t, a, abi.Request{Op: abi.OpSetSBA, Addr: 0x1000}, nil, abi.StatusOK)
	tok := handle(t, a, abi.Request{Op: abi.OpRegisterDMB, Addr: 0x10000, Len: 4096, GID: 0xB, Index: 1}, nil, abi.StatusOK).Value
	if _, err := f.SetFault(ism.FaultSpec{Kind: ism.FaultDropSignals, VM: "b", From: true, Every: 1}, "test"); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		handle(t, b, abi.Request{Op: abi.OpMove, Token: tok, Flags: abi.FlagSignal}, nil, abi.StatusOK)
	}
	if _, err := f.RevokeDMB("a", tok, 0, "test"); err != nil {
		t.Fatal(err)
	}
	c := NewCollector(f, []VM{{"a", 0xA}, {"b", 0xB}}, nil)
	var want strings.Builder
	want.WriteString("# HELP ism_backend_vm_faults_injected_total Faults injected with the VM as the target (ism-backend fault), by kind: signals dropped or delayed, MOVEs failed, queue throttled, DMBs revoked, GID-gone events sent.\n# TYPE ism_backend_vm_faults_injected_total counter\n")
	for _, vm := range []struct {
		name, gid string
		n         map[string]int
	}{{"a", "0x000000000000000a", map[string]int{"revoke-dmb": 1}}, {"b", "0x000000000000000b", map[string]int{"drop-signals": 2}}} {
		for k := range ism.NumFaultKinds {
			kind := ism.FaultKind(k).String()
			fmt.Fprintf(&want, "ism_backend_vm_faults_injected_total{gid=%q,kind=%q,vm=%q} %d\n", vm.gid, kind, vm.name, vm.n[kind])
		}
	}
	if err := testutil.CollectAndCompare(c, strings.NewReader(want.String()), "ism_backend_vm_faults_injected_total"); err != nil {
		t.Fatal(err)
	}
}
