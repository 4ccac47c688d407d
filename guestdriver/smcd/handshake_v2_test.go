package smcd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"testing"
	"time"
)

const ueidA, ueidB, ueidC = "ISM-BACKEND-TEST", "UEID.B", "UEID-C"

func v2Env(e env, cli, srv []string, v2Only bool) env {
	e.dial.UEIDs, e.srv.UEIDs, e.dial.v2Only = cli, srv, v2Only
	return e
}

// TestV2Handshake: two of our stacks that share a UEID speak SMC-Dv2, with
// the first of the client's UEIDs the server has, and move data as in v1.
func TestV2Handshake(t *testing.T) {
	for _, v2Only := range []bool{false, true} {
		name := "v1 and v2 offered"
		if v2Only {
			name = "v2 only offered (as Linux on x86)"
		}
		t.Run(name, func(t *testing.T) {
			bothModes(t, twoHosts, func(t *testing.T, e env) {
				e = v2Env(e, []string{ueidC, ueidA}, []string{ueidB, ueidA, ueidC}, v2Only)
				c, s := e.pair(t)
				mustSMC(t, c, s)
				ci, si := c.(*Conn).Info(), s.(*Conn).Info()
				for _, in := range []Info{ci, si} {
					if in.CLCVersion != 2 || in.EID.String() != ueidC || in.PeerGIDExt != 0 {
						t.Fatalf("info %+v", in)
					}
				}
				if ci.PeerGID != e.srvDev.GID() || si.PeerGID != e.cliDev.GID() {
					t.Fatalf("peer GIDs %#x %#x", ci.PeerGID, si.PeerGID)
				}
				copyBothWays(t, c, s, 1<<20+3)
			})
		})
	}
}

// TestV2Negotiation is the version table: who offers what, and what both
// ends end up with (a version, or the Decline Linux's server would send).
func TestV2Negotiation(t *testing.T) {
	otherCHID := func() env {
		return withTestTimeouts(env{srvDev: NewFabric(0xFF00).NewDevice(), cliDev: NewFabric(0xFF01).NewDevice()})
	}
	unreachable := func() env {
		return withTestTimeouts(env{srvDev: NewFabric(0xFF00).NewDevice(), cliDev: NewFabric(0xFF00).NewDevice()})
	}
	cases := []struct {
		name     string
		env      func() env
		cli, srv []string
		v2Only   bool
		version  uint8  // SMC-D version both use; 0: fallback
		code     uint32 // the server's Decline
	}{
		{"v1 both", twoHosts, nil, nil, false, 1, 0},
		{"v2 client, v1 server", twoHosts, []string{ueidA}, nil, false, 1, 0},
		{"v1 client, v2 server", twoHosts, nil, []string{ueidA}, false, 1, 0},
		{"no common UEID, v1 offered", twoHosts, []string{ueidA}, []string{ueidB}, false, 1, 0},
		{"common UEID", twoHosts, []string{ueidA, ueidB}, []string{ueidC, ueidB}, false, 2, 0},
		{"v2-only client, common UEID", twoHosts, []string{ueidA}, []string{ueidA}, true, 2, 0},
		// Linux: smc_clc_match_eid fails and stores no code; the v1
		// search finds nothing: SMC_CLC_DECL_NOSMCDDEV.
		{"v2-only client, no common UEID", twoHosts, []string{ueidA}, []string{ueidB}, true, 0, DeclineNoSMCDDev},
		{"v2-only client, v1-only server", twoHosts, []string{ueidA}, nil, true, 0, DeclineNoSMCDDev},
		// smc_find_ism_v2_device_serv: no proposed GID/CHID usable.
		{"v2-only client, other CHID", otherCHID, []string{ueidA}, []string{ueidA}, true, 0, DeclineNoSMCD2Dev},
		{"v2-only client, GID unreachable", unreachable, []string{ueidA}, []string{ueidA}, true, 0, DeclineNoSMCD2Dev},
		// The v2 attempt's code is stored first and wins over v1's.
		{"v1 and v2, other CHID", otherCHID, []string{ueidA}, []string{ueidA}, false, 0, DeclineNoSMCD2Dev},
		{"v1 only, other CHID", otherCHID, nil, []string{ueidA}, false, 0, DeclineNoSMCDDev},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := v2Env(c.env(), c.cli, c.srv, c.v2Only)
			if c.version == 0 {
				cli, srv := fallbackPair(t, e)
				if srv.Reason.Remote || srv.Reason.Code != c.code || !cli.Reason.Remote || cli.Reason.Code != c.code {
					t.Fatalf("reasons: server %+v, client %+v; want %#x", srv.Reason, cli.Reason, c.code)
				}
				return
			}
			cc, sc := e.pair(t)
			mustSMC(t, cc, sc)
			if v1, v2 := cc.(*Conn).Info().CLCVersion, sc.(*Conn).Info().CLCVersion; v1 != c.version || v2 != c.version {
				t.Fatalf("versions %d, %d; want %d", v1, v2, c.version)
			}
			copyBothWays(t, cc, sc, 100<<10)
		})
	}
}

// rawV2 is a hand-driven client on the server's fabric.
type rawV2 struct {
	raw    net.Conn
	cliDev ISM
	srvDev ISM
	ln     net.Listener
	srv    net.Conn // lazily accepted
}

func rawV2Client(t *testing.T, s Server) *rawV2 {
	t.Helper()
	e := twoHosts()
	ln, err := s.Listen(e.srvDev, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	raw.SetDeadline(time.Now().Add(hangGuard))
	return &rawV2{raw: raw, cliDev: e.cliDev, srvDev: e.srvDev, ln: ln, srv: acceptAsync(t, ln)}
}

func (r *rawV2) send(t *testing.T, m interface{ Encode() ([]byte, error) }) {
	t.Helper()
	b, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.raw.Write(b); err != nil {
		t.Fatal(err)
	}
}

// TestServerV2Declines: a v2 Proposal the server cannot take is declined
// with a v2 Decline (Linux declines in the proposal's version) and Linux's
// code; both ends continue on TCP.
func TestServerV2Declines(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(p *Proposal)
		code uint32
	}{
		// smc_listen_v2_check: no EID and no SEID, and no v1 left.
		{"no UEID offered", func(p *Proposal) { p.V2.EIDs = nil }, DeclineNoUEID},
		// A lone emulated-CHID entry (no gid_ext entry) is skipped.
		{"lone emulated entry", func(p *Proposal) { p.V2.GIDCHIDs = p.V2.GIDCHIDs[:1] }, DeclineNoSMCD2Dev},
		// A gid_ext other than 0 is not a GID on our fabric.
		{"gid_ext set", func(p *Proposal) { p.V2.GIDCHIDs[1].GID = 1 }, DeclineNoSMCD2Dev},
		{"no common UEID", func(p *Proposal) { p.V2.EIDs = []EID{mustUEID(t, ueidB)} }, DeclineNoSMCDDev},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := rawV2Client(t, Server{UEIDs: []string{ueidA}})
			p := proposalFor(r.cliDev, r.raw.LocalAddr(), []EID{mustUEID(t, ueidA)}, true)
			c.edit(&p)
			r.send(t, &p)
			d := readDecline(t, r.raw)
			if d.Diagnosis != c.code || d.Version != 2 || d.OSType != OSTypeLinux {
				t.Fatalf("decline %+v, want code %#x in v2", d, c.code)
			}
			echoCheck(t, r.raw, r.srv)
		})
	}
}

func mustUEID(t testing.TB, s string) EID {
	e, err := ParseUEID(s)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// TestServerV2Accept checks the server's v2 Accept field by field, then
// what it does with Confirms a Linux client could send.
func TestServerV2Accept(t *testing.T) {
	accept := func(t *testing.T, release uint8) (*rawV2, *AcceptConfirm) {
		r := rawV2Client(t, Server{UEIDs: []string{ueidA}, HandshakeTimeout: 2 * time.Second})
		p := proposalFor(r.cliDev, r.raw.LocalAddr(), []EID{mustUEID(t, ueidB), mustUEID(t, ueidA)}, true)
		p.V2.Release = release
		r.send(t, &p)
		typ, msg, err := ReadCLC(r.raw)
		if err != nil || typ != CLCAccept {
			t.Fatalf("want an accept: type %d, %v", typ, err)
		}
		acc, err := DecodeAcceptConfirm(msg, CLCAccept)
		if err != nil {
			t.Fatal(err)
		}
		return r, acc
	}
	for _, rel := range []uint8{0, 1, 5} {
		_, acc := accept(t, rel)
		want := min(rel, SMCRelease)
		f := acc.FCE
		switch {
		case acc.Version != 2 || !acc.FirstContact || acc.CHID != 0xFF00 || acc.EID.String() != ueidA || acc.GIDExt != 0:
			t.Fatalf("release %d: accept %+v", rel, acc)
		case f == nil || f.Release != want || f.OSType != OSTypeLinux || f.Hostname != localHostname:
			t.Fatalf("release %d: first-contact extension %+v", rel, f)
		case want > 0 && f.FeatureMask != SMCFeatureMask:
			t.Fatalf("feature mask %#x", f.FeatureMask)
		}
	}
	confirm := func(r *rawV2, acc *AcceptConfirm, edit func(*AcceptConfirm)) *AcceptConfirm {
		c := &AcceptConfirm{Type: CLCConfirm, Version: 2, FirstContact: true, GID: r.cliDev.GID(), Token: 42,
			DMBESize: 2, LinkID: 7, CHID: 0xFF00, EID: acc.EID,
			FCE: &FirstContactExt{OSType: OSTypeLinux, Release: acc.FCE.Release, FeatureMask: acc.FCE.FeatureMask}}
		edit(c)
		return c
	}
	// Each of these fails the connection, as TestServerFailsAfterAccept.
	for _, c := range []struct {
		name string
		edit func(*AcceptConfirm)
	}{
		// smc_clc_v2x_features_confirm_check: SMC_CLC_DECL_RELEASEERR.
		{"other release", func(c *AcceptConfirm) { c.FCE.Release, c.FCE.FeatureMask = 0, 0 }},
		{"v1 confirm", func(c *AcceptConfirm) { c.Version, c.CHID, c.EID, c.FCE = 1, 0, EID{}, nil }},
		{"gid_ext", func(c *AcceptConfirm) { c.GIDExt = 1 }},
		{"other GID", func(c *AcceptConfirm) { c.GID++ }},
	} {
		t.Run(c.name, func(t *testing.T) {
			r, acc := accept(t, 1)
			r.send(t, confirm(r, acc, c.edit))
			var b [64]byte
			n, err := r.raw.Read(b[:])
			if n > 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("want the server to close the connection, got %d bytes % x, %v", n, b[:n], err)
			}
			if n := loopDMBs(r.srvDev); n != 0 {
				t.Fatalf("server left %d DMBs registered", n)
			}
		})
	}
}

// TestClientChecksV2Accept: what the client declines in a v2 Accept, and
// the Confirm it builds for the ones it takes.
func TestClientChecksV2Accept(t *testing.T) {
	dev := fixedGID{NewFabric(0xFF00).NewDevice(), 0xa0002}
	ueids := []EID{mustUEID(t, ueidA)}
	prop := proposalFor(dev, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1)}, ueids, false)
	v1prop := proposalFor(dev, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1)}, nil, false)
	for _, c := range []struct {
		name string
		prop *Proposal
		edit func(*AcceptConfirm)
		code uint32
	}{
		{"v2 accept to v1 proposal", &v1prop, func(*AcceptConfirm) {}, DeclineModeUnsupp},
		{"other CHID", &prop, func(a *AcceptConfirm) { a.CHID = 0xFF01 }, DeclineCnfErr},
		{"EID not offered", &prop, func(a *AcceptConfirm) { a.EID = mustUEID(t, ueidB) }, DeclineCnfErr},
		{"release 2", &prop, func(a *AcceptConfirm) { a.FCE.Release = 2 }, DeclineReleaseErr},
		{"gid_ext", &prop, func(a *AcceptConfirm) { a.GIDExt = 5 }, DeclineNoSMCDDev},
	} {
		acc := kernelAcceptV2(t)
		c.edit(acc)
		_, de := checkAcceptV2(dev, c.prop, acc, ueids)
		if de == nil || de.Code != c.code {
			t.Errorf("%s: %v, want code %#x", c.name, de, c.code)
		}
	}
	// A Linux server that has a link group with our GID already accepts
	// without first contact: the Confirm then has no extension either.
	for _, first := range []bool{true, false} {
		acc := kernelAcceptV2(t)
		if !first {
			acc.FirstContact, acc.FCE = false, nil
		}
		ch, de := checkAcceptV2(dev, &prop, acc, ueids)
		if de != nil {
			t.Fatal(de)
		}
		conf := AcceptConfirm{Type: CLCConfirm, FirstContact: true, GID: dev.GID(), Token: 1, LinkID: 2}
		ch.fillConfirm(dev, &conf, acc)
		b, err := conf.Encode()
		if err != nil {
			t.Fatal(err)
		}
		q, err := DecodeAcceptConfirm(b, CLCConfirm)
		switch {
		case err != nil:
			t.Fatal(err)
		case q.Version != 2 || q.FirstContact != first || q.EID != acc.EID || q.CHID != 0xFF00 || q.GIDExt != 0:
			t.Fatalf("first contact %v: confirm %+v", first, q)
		case first && (q.FCE.Release != 1 || q.FCE.FeatureMask != SMCFeatureMask || len(b) != 130):
			t.Fatalf("confirm extension %+v, %d bytes", q.FCE, len(b))
		case !first && len(b) != AcceptConfirmLenV2:
			t.Fatalf("confirm of %d bytes", len(b))
		}
	}
}

// TestChooseV2 covers the server's device choice: the v1 area's native
// device first, then the v2 entries in order, emulated ones in pairs.
func TestChooseV2(t *testing.T) {
	f := NewFabric(0xFF00)
	srv, cli := f.NewDevice(), f.NewDevice()
	ueids := []EID{mustUEID(t, ueidA)}
	prop := func(area uint64, areaCHID uint16, entries ...GIDCHID) *Proposal {
		return &Proposal{Version: 2, TypeV1: SMCTypeN, TypeV2: SMCTypeD, SMCDArea: true, GID: area, CHID: areaCHID,
			V2: &ProposalV2{EIDs: ueids, Release: 1, GIDCHIDs: entries}}
	}
	g := cli.GID()
	for _, c := range []struct {
		name string
		p    *Proposal
		gid  uint64
		code uint32
	}{
		{"area", prop(g, 0xFF00), g, 0},
		{"pair", prop(0, 0, GIDCHID{g, 0xFF00}, GIDCHID{0, 0xFF00}), g, 0},
		{"other device first", prop(0, 0, GIDCHID{7, 0x0001}, GIDCHID{g, 0xFF00}, GIDCHID{0, 0xFF00}), g, 0},
		{"unreachable then reachable", prop(0, 0, GIDCHID{g + 1, 0xFF00}, GIDCHID{0, 0xFF00}, GIDCHID{g, 0xFF00}, GIDCHID{0, 0xFF00}), g, 0},
		{"pair split by CHID", prop(0, 0, GIDCHID{g, 0xFF00}, GIDCHID{0, 0xFF01}), 0, DeclineNoSMCD2Dev},
		{"no entries", prop(0, 0), 0, DeclineNoSMCD2Dev},
	} {
		ch, code, err := chooseV2(srv, c.p, ueids)
		switch {
		case c.code != 0 && (ch != nil || code != c.code):
			t.Errorf("%s: %+v, code %#x (%v); want %#x", c.name, ch, code, err, c.code)
		case c.code == 0 && (ch == nil || ch.peerGID != c.gid || ch.eid != ueids[0] || ch.release != 1):
			t.Errorf("%s: %+v, %v", c.name, ch, err)
		}
	}
}

// kernelPropValid is Linux's smc_clc_msg_prop_valid with the offset bounds
// of smc_get_clc_v2_ext and smc_get_clc_smcd_v2_ext, written out on the
// bytes: what a kernel server checks before it looks at a Proposal.
func kernelPropValid(b []byte) bool {
	be16 := func(o int) int { return int(b[o])<<8 | int(b[o+1]) }
	version, typev2, typev1 := b[7]>>4, b[7]>>2&3, b[7]&3
	ipOff := be16(38)
	if ipOff > 40 {
		return false
	}
	n6 := int(b[40+ipOff+7])
	if n6 > 8 {
		return false
	}
	length := be16(5)
	if version == 1 {
		return typev1 != SMCTypeN && length == 40+ipOff+8+n6*17+4
	}
	const maxV2Off, maxDOff = 172, 288
	v2Off := be16(50)
	if typev1 == SMCTypeD || typev1 == SMCTypeB {
		if ipOff != 40 {
			return false
		}
	}
	if typev2 == SMCTypeN {
		return length == 80+map[bool]int{true: 8 + n6*17}[typev1 != SMCTypeN]+4
	}
	if v2Off == 0 || v2Off > maxV2Off {
		return false
	}
	v2 := 52 + v2Off
	eids, gids := int(b[v2]), int(b[v2+1])
	if eids > 8 || smcdIndicated(typev2) && gids > 8 {
		return false
	}
	want := 80 + 40 + eids*32 + 4
	if typev1 != SMCTypeN {
		want += 8 + n6*17
	}
	if smcdIndicated(typev2) {
		if d := be16(v2 + 6); d == 0 || d > maxDOff {
			return false
		}
		want += 48 + gids*10
	}
	return length == want
}

// TestClientAgainstKernelShapedServer: our client against a server that
// answers as Linux's does, byte for byte: it checks our Proposal as
// smc_clc_msg_prop_valid does, accepts in v2 with or without first
// contact (without: it has a link group with our GID already), and gets a
// Confirm it takes; then data flows.
func TestClientAgainstKernelShapedServer(t *testing.T) {
	for _, first := range []bool{true, false} {
		t.Run(map[bool]string{true: "first contact", false: "existing link group"}[first], func(t *testing.T) {
			e := twoHosts()
			e.dial.UEIDs = []string{ueidA}
			tl, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer tl.Close()
			type result struct {
				c   net.Conn
				err error
			}
			done := make(chan result, 1)
			go func() {
				c, err := kernelShapedServer(e.srvDev, tl, first)
				done <- result{c, err}
			}()
			cc, err := e.dial.DialContext(context.Background(), e.cliDev, "tcp", tl.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			r := <-done
			if r.err != nil {
				t.Fatal(r.err)
			}
			defer r.c.Close()
			mustSMC(t, cc, r.c)
			if in := cc.(*Conn).Info(); in.CLCVersion != 2 || in.EID.String() != ueidA {
				t.Fatalf("client info %+v", in)
			}
			copyBothWays(t, cc, r.c, 300<<10)
		})
	}
}

func kernelShapedServer(dev ISM, tl net.Listener, first bool) (net.Conn, error) {
	tcp, err := tl.Accept()
	if err != nil {
		return nil, err
	}
	tcp.SetDeadline(time.Now().Add(hangGuard))
	typ, msg, err := ReadCLC(tcp)
	if err != nil || typ != CLCProposal {
		return nil, fmt.Errorf("proposal: type %d, %v", typ, err)
	}
	if !kernelPropValid(msg) {
		return nil, fmt.Errorf("Linux would not take our proposal % x", msg)
	}
	prop, err := DecodeProposal(msg)
	if err != nil {
		return nil, err
	}
	dmb, err := dev.RegisterDMB(64<<10, prop.GID)
	if err != nil {
		return nil, err
	}
	clear(dmb.Bytes()[:CDCLen])
	acc := AcceptConfirm{Type: CLCAccept, Version: 2, FirstContact: first, GID: dev.GID(), Token: dmb.Token(),
		DMBESize: 2, LinkID: 0x101, CHID: dev.CHID(), EID: prop.V2.EIDs[0]}
	if first {
		acc.FCE = &FirstContactExt{OSType: OSTypeLinux, Release: 1, Hostname: hostnameField("kernel"), FeatureMask: 1}
	}
	b, err := acc.Encode()
	if err != nil {
		return nil, err
	}
	if _, err := tcp.Write(b); err != nil {
		return nil, err
	}
	typ, msg, err = ReadCLC(tcp)
	if err != nil || typ != CLCConfirm {
		return nil, fmt.Errorf("confirm: type %d, %v", typ, err)
	}
	conf, err := DecodeAcceptConfirm(msg, CLCConfirm)
	if err != nil {
		return nil, err
	}
	wantLen := AcceptConfirmLenV2
	if first {
		wantLen += fceV2xLen
	}
	switch {
	case conf.Version != 2 || conf.FirstContact != first || len(msg) != wantLen:
		return nil, fmt.Errorf("confirm %+v of %d bytes", conf, len(msg))
	case conf.EID != acc.EID || conf.CHID != dev.CHID() || conf.GIDExt != 0 || conf.GID != prop.GID:
		return nil, fmt.Errorf("confirm %+v", conf)
	case first && (conf.FCE.Release != 1 || conf.FCE.FeatureMask != 1 || conf.FCE.OSType != OSTypeLinux):
		return nil, fmt.Errorf("confirm extension %+v", conf.FCE)
	}
	peerSize, err := DMBESize(conf.DMBESize)
	if err != nil {
		return nil, err
	}
	cdcBuf, stage, err := connBuffers(dev, stageSize(peerSize-CDCLen))
	if err != nil {
		return nil, err
	}
	tcp.SetDeadline(time.Time{})
	return newConn(dev, tcp, dmb, conf.GID, conf.Token, uint32(conf.DMBEIndex), peerSize, cdcBuf, stage), nil
}

// TestKernelPropValid: the test's rendering of Linux's check takes the
// kernel's own Proposal and ours, and refuses a broken one.
func TestKernelPropValid(t *testing.T) {
	for _, g := range []string{goldenKernelProposalV2, goldenProposalV1V2, goldenProposal} {
		if !kernelPropValid(golden(t, g)) {
			t.Fatalf("rejects % x", golden(t, g))
		}
	}
	b := golden(t, goldenKernelProposalV2)
	b[81] = 1
	if kernelPropValid(b) {
		t.Fatal("takes a wrong ism_gid_cnt")
	}
}
