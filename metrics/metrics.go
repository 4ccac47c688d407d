// Package metrics exports the backend's statistics to Prometheus.
//
// One Collector reads the counters the fabric (ism) and the vhost-user
// connections already keep, at each scrape: nothing on the data path counts
// twice or waits for a scrape, and a metric cannot disagree with the stats
// file or the SIGUSR1 log line, which read the same counters.
//
// Per VM (labels vm and gid): the VM's counters add up over all its
// connections, as in the stats file, so they are Prometheus counters that
// never go back; the gauges (DMBs, attach-mode memory) are those of its
// connected device now. The vhost-user counters are those of the current
// connection and restart from 0 when the VM reconnects, which Prometheus
// reads as a counter reset.
package metrics

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/ism"
	"github.com/ism-backend/ism-backend/vhostuser"
)

const namespace = "ism_backend"

// VM is one configured VM: the metrics list it from the start, with zero
// counters until it first connects.
type VM struct {
	Name string
	GID  uint64
}

// Collector is a prometheus.Collector over a fabric and its connections.
type Collector struct {
	fabric *ism.Fabric
	vms    func() []VM
	conn   func(vm string) vhostuser.Stats

	info, devices, dmbs *prometheus.Desc
	connected, vmDMBs   *prometheus.Desc
	counters            []counter
	refused             *prometheus.Desc
	signalsRefused      *prometheus.Desc
	eventsDropped       *prometheus.Desc
	limitRefused        *prometheus.Desc
	faults              *prometheus.Desc
	gauges              []gauge
	vhost               []vhostCounter
}

type counter struct {
	desc *prometheus.Desc
	get  func(*ism.Stats) uint64
}

type gauge counter

type vhostCounter struct {
	desc *prometheus.Desc
	get  func(*vhostuser.Stats) uint64
}

var vmLabels = []string{"vm", "gid"}

func vmDesc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(prometheus.BuildFQName(namespace, "vm", name), help, append(vmLabels[:2:2], labels...), nil)
}

// NewCollector returns a collector for fabric f, listing vms (in that
// order, also before they connect) and any other VM that has connected.
// conn returns a VM's current vhost-user connection counters (nil: none).
func NewCollector(f *ism.Fabric, vms []VM, conn func(vm string) vhostuser.Stats) *Collector {
	return NewLiveCollector(f, func() []VM { return vms }, conn)
}

// NewLiveCollector is NewCollector for a VM list that changes (VMs added
// and removed while the backend runs): each scrape lists vms().
func NewLiveCollector(f *ism.Fabric, vms func() []VM, conn func(vm string) vhostuser.Stats) *Collector {
	c := &Collector{fabric: f, vms: vms, conn: conn}
	c.info = prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "fabric_info"),
		"The fabric's channel id (CHID); always 1.", []string{"chid"}, nil)
	c.devices = prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "devices"),
		"ISM devices connected to the fabric now.", nil, nil)
	c.dmbs = prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "dmbs"),
		"Live DMBs of the whole fabric.", nil, nil)
	c.connected = vmDesc("connected", "1 if the VM's device is connected to the fabric now.")
	c.vmDMBs = vmDesc("dmbs", "Live DMBs of the VM's connected device.")
	c.counters = []counter{
		{vmDesc("dmbs_registered_total", "Successful REGISTER_DMB requests."), func(s *ism.Stats) uint64 { return s.Registered }},
		{vmDesc("moves_total", "Successful MOVEs the VM sent."), func(s *ism.Stats) uint64 { return s.Moves }},
		{vmDesc("move_bytes_total", "Bytes the backend copied for the VM's MOVEs."), func(s *ism.Stats) uint64 { return s.MoveBytes }},
		{vmDesc("signalled_moves_total", "Successful signalled MOVEs the VM sent."), func(s *ism.Stats) uint64 { return s.Signals }},
		{vmDesc("signals_total", "Successful SIGNAL requests the VM sent."), func(s *ism.Stats) uint64 { return s.SWEvents }},
		{vmDesc("interrupts_total", "Interrupts raised to the VM's driver."), func(s *ism.Stats) uint64 { return s.Interrupts }},
		{vmDesc("events_total", "Events posted to the VM's driver."), func(s *ism.Stats) uint64 { return s.Events }},
		{vmDesc("shmem_maps_total", "SHMEM_MAPs into the VM's shared-memory region the front-end did."), func(s *ism.Stats) uint64 { return s.Maps }},
		{vmDesc("shmem_unmaps_total", "SHMEM_UNMAPs of the VM's shared-memory region the front-end did."), func(s *ism.Stats) uint64 { return s.Unmaps }},
		{vmDesc("bad_chains_total", "Request chains of the VM refused as malformed before any request was read, over all its connections."), func(s *ism.Stats) uint64 { return s.BadChains }},
		{vmDesc("queues_broken_total", "Times the VM's driver moved the request ring's avail idx past the ring."), func(s *ism.Stats) uint64 { return s.QueuesBroken }},
	}
	c.refused = vmDesc("requests_refused_total", "Requests of the VM refused, by status.", "status")
	c.signalsRefused = vmDesc("signals_refused_total",
		"SIGNALs of the VM refused, by reason: no DMB with the target (peer), over the VM's rate (rate), no room in the target's event queue (queue).", "reason")
	c.eventsDropped = vmDesc("events_dropped_total",
		"Events for the VM's driver that were not queued, by kind: software (SIGNALs) or device (GID or DMB gone; 0 unless the design fails).", "kind")
	c.limitRefused = vmDesc("limit_refused_total",
		"Requests of the VM refused by a per-VM cap: DMBs (-max-dmbs), attach memory (-max-attach-memory), mapped bytes (-max-mapped).", "limit")
	c.faults = vmDesc("faults_injected_total",
		"Faults injected with the VM as the target (ism-backend fault), by kind: signals dropped or delayed, MOVEs failed, queue throttled, DMBs revoked, GID-gone events sent.", "kind")
	c.gauges = []gauge{
		{vmDesc("attach_dmbs", "Own live attach-mode DMBs of the connected device."), func(s *ism.Stats) uint64 { return s.AttachDMBs }},
		{vmDesc("attach_bytes", "Host memory of those DMBs, page-rounded."), func(s *ism.Stats) uint64 { return s.AttachBytes }},
		{vmDesc("attached_dmbs", "Peers' DMBs the connected device has attached."), func(s *ism.Stats) uint64 { return s.Attached }},
		{vmDesc("mapped_bytes", "Bytes mapped in the VM's shared-memory region: own attach-mode DMBs and attachments."), func(s *ism.Stats) uint64 { return s.MappedBytes }},
	}
	c.vhost = []vhostCounter{
		{vmDesc("vhost_messages_total", "Front-end messages of the current vhost-user connection."), func(s *vhostuser.Stats) uint64 { return s.Messages }},
		{vmDesc("vhost_bad_messages_total", "Refused front-end messages of the current connection."), func(s *vhostuser.Stats) uint64 { return s.BadMessages }},
		{vmDesc("vhost_bad_chains_total", "Malformed descriptor chains and broken-queue events of the current connection."), func(s *vhostuser.Stats) uint64 { return s.BadChains }},
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.info, c.devices, c.dmbs, c.connected, c.vmDMBs, c.refused, c.signalsRefused, c.eventsDropped, c.limitRefused, c.faults} {
		ch <- d
	}
	for _, m := range c.counters {
		ch <- m.desc
	}
	for _, m := range c.gauges {
		ch <- m.desc
	}
	for _, m := range c.vhost {
		ch <- m.desc
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	total := c.fabric.Stats()
	ch <- prometheus.MustNewConstMetric(c.info, prometheus.GaugeValue, 1, fmt.Sprintf("%#04x", c.fabric.CHID()))
	ch <- prometheus.MustNewConstMetric(c.devices, prometheus.GaugeValue, float64(total.Devices))
	ch <- prometheus.MustNewConstMetric(c.dmbs, prometheus.GaugeValue, float64(total.DMBs))

	seen := map[string]ism.DeviceStats{}
	var extra []ism.DeviceStats // connected under a name not configured
	configured := map[string]bool{}
	vms := c.vms()
	for _, v := range vms {
		configured[v.Name] = true
	}
	for _, d := range c.fabric.DeviceStats() {
		seen[d.Name] = d
		if !configured[d.Name] {
			extra = append(extra, d)
		}
	}
	for _, v := range vms {
		d, ok := seen[v.Name]
		if !ok {
			d = ism.DeviceStats{Name: v.Name, GID: v.GID}
		}
		c.collectVM(ch, d)
	}
	for _, d := range extra {
		c.collectVM(ch, d)
	}
}

func (c *Collector) collectVM(ch chan<- prometheus.Metric, d ism.DeviceStats) {
	labels := []string{d.Name, fmt.Sprintf("%#016x", d.GID)}
	with := func(l string) []string { return append(labels[:2:2], l) }
	s := &d.Stats
	connected := 0.0
	if d.Connected {
		connected = 1
	}
	ch <- prometheus.MustNewConstMetric(c.connected, prometheus.GaugeValue, connected, labels...)
	ch <- prometheus.MustNewConstMetric(c.vmDMBs, prometheus.GaugeValue, float64(s.DMBs), labels...)
	for _, m := range c.counters {
		ch <- prometheus.MustNewConstMetric(m.desc, prometheus.CounterValue, float64(m.get(s)), labels...)
	}
	for _, m := range c.gauges {
		ch <- prometheus.MustNewConstMetric(m.desc, prometheus.GaugeValue, float64(m.get(s)), labels...)
	}
	for st := abi.StatusOK + 1; int(st) < ism.NumStatus; st++ {
		ch <- prometheus.MustNewConstMetric(c.refused, prometheus.CounterValue, float64(s.Refused[st]), with(st.Name())...)
	}
	for _, r := range []struct {
		reason string
		n      uint64
	}{{"peer", s.SignalsRefusedPeer}, {"rate", s.SignalsRefusedRate}, {"queue", s.SignalsRefusedQueue}} {
		ch <- prometheus.MustNewConstMetric(c.signalsRefused, prometheus.CounterValue, float64(r.n), with(r.reason)...)
	}
	ch <- prometheus.MustNewConstMetric(c.eventsDropped, prometheus.CounterValue, float64(s.SWEventsDropped), with("software")...)
	ch <- prometheus.MustNewConstMetric(c.eventsDropped, prometheus.CounterValue, float64(s.DeviceEventsDropped), with("device")...)
	for _, r := range []struct {
		limit string
		n     uint64
	}{{"dmbs", s.DMBLimitRefused}, {"attach_memory", s.AttachLimitRefused}, {"mapped", s.MappedLimitRefused}} {
		ch <- prometheus.MustNewConstMetric(c.limitRefused, prometheus.CounterValue, float64(r.n), with(r.limit)...)
	}
	for k, n := range s.Faults {
		ch <- prometheus.MustNewConstMetric(c.faults, prometheus.CounterValue, float64(n), with(ism.FaultKind(k).String())...)
	}
	var vs vhostuser.Stats
	if c.conn != nil {
		vs = c.conn(d.Name)
	}
	for _, m := range c.vhost {
		ch <- prometheus.MustNewConstMetric(m.desc, prometheus.CounterValue, float64(m.get(&vs)), labels...)
	}
}

// Registry returns a registry with c and the process's and the Go
// runtime's collectors (ism_backend_* and the standard process_* and go_*).
func Registry(c *Collector) *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(c, collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), collectors.NewGoCollector())
	return r
}

// Listen serves r's metrics at /metrics on addr (host:port) until ctx is
// done. It returns once the listener is up (its Addr says where: addr may
// ask for port 0), or the error that kept it from listening.
func Listen(ctx context.Context, addr string, r *prometheus.Registry) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	Serve(ctx, ln, r)
	return ln, nil
}

// Serve serves r's metrics at /metrics on ln (one a previous process
// handed over, say) until ctx is done; it does not block.
func Serve(ctx context.Context, ln net.Listener, r *prometheus.Registry) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(r, promhttp.HandlerOpts{}))
	// Timeouts: a scraper that stalls must not hold a connection for ever.
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second}
	go srv.Serve(ln)
	context.AfterFunc(ctx, func() { srv.Close() })
}
