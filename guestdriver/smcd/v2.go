package smcd

// SMC-Dv2 negotiation, after Linux's af_smc.c: the client offers v2 with
// its UEIDs (smc_find_proposal_devices, smc_clc_send_proposal); the server
// picks a proposed GID on its own CHID that its device reaches and the
// first of the client's EIDs it shares (smc_listen_v2_check,
// smc_find_ism_v2_device_serv, smc_clc_match_eid); the client checks the
// Accept's CHID (smc_v2_determine_accepted_chid) and echoes the EID and
// release in its Confirm; the server checks the release
// (smc_clc_v2x_features_confirm_check).
//
// GIDs are 128 bits in Linux (struct smcd_gid: gid, gid_ext); gid_ext is
// carried only for emulated CHIDs (0xFF00..0xFFFF). Our device's GIDs are
// 64-bit, which Linux sees as gid_ext 0: a peer whose gid_ext is not 0 is
// not on our fabric.

import (
	"errors"
	"fmt"
	"net"
	"os"
)

// v2Choice is what an SMC-Dv2 handshake settled on.
type v2Choice struct {
	peerGID    uint64
	peerGIDExt uint64
	eid        EID
	release    uint8  // negotiated SMC release
	features   uint16 // negotiated supplemental features
}

var localHostname = func() [hostnameLen]byte {
	h, _ := os.Hostname()
	return hostnameField(h)
}()

// ourGIDCHIDs lists our device as Linux lists an SMC-Dv2 device in a
// Proposal: an emulated device takes two entries, GID then gid_ext (0).
func ourGIDCHIDs(dev ISM) []GIDCHID {
	e := []GIDCHID{{GID: dev.GID(), CHID: dev.CHID()}}
	if IsEmulatedCHID(dev.CHID()) {
		e = append(e, GIDCHID{GID: 0, CHID: dev.CHID()})
	}
	return e
}

// proposalFor builds the client's Proposal: v1 SMC-D always; with UEIDs
// also v2. Linux lists a device offered in the v1 area only there, not
// again among the v2 entries (smc_find_ism_v2_device_clnt skips
// ism_dev[0]); servers look at both.
//
// v2Only (with UEIDs) proposes as Linux on x86 does, where no device has
// the PNETID v1 needs: typev1 N, no prefix area, the device among the v2
// entries.
func proposalFor(dev ISM, local net.Addr, ueids []EID, v2Only bool) Proposal {
	p := Proposal{TypeV1: SMCTypeD, SMCDArea: true, GID: dev.GID(), CHID: dev.CHID()}
	setPrefix(&p, local)
	if len(ueids) == 0 {
		return p
	}
	p.Version, p.TypeV2 = 2, SMCTypeD
	p.V2 = &ProposalV2{EIDs: ueids, Release: SMCRelease, FeatureMask: SMCFeatureMask}
	if v2Only {
		p = Proposal{Version: 2, TypeV1: SMCTypeN, TypeV2: SMCTypeD, SMCDArea: true, V2: p.V2}
		p.V2.GIDCHIDs = ourGIDCHIDs(dev)
	}
	return p
}

func hasEID(list []EID, e EID) bool {
	for _, x := range list {
		if x == e {
			return true
		}
	}
	return false
}

// chooseV2 is the server's SMC-Dv2 choice. Without one it returns the
// Decline code Linux would store (0 when Linux stores none: no common
// EID), and why.
func chooseV2(dev ISM, prop *Proposal, ueids []EID) (*v2Choice, uint32, error) {
	x := prop.V2
	if len(x.EIDs) == 0 && !x.SEID {
		return nil, DeclineNoUEID, errors.New("client offers SMC-Dv2 without an EID")
	}
	// Candidates in Linux's order: the native device of the v1 area,
	// then the v2 entries, an emulated CHID's entry with its gid_ext
	// entry after it (a lone one is skipped, as Linux does).
	type cand struct {
		gid, ext uint64
		chid     uint16
	}
	var cands []cand
	if prop.CHID != 0 {
		cands = append(cands, cand{prop.GID, 0, prop.CHID})
	}
	for i := 0; i < len(x.GIDCHIDs); i++ {
		g := x.GIDCHIDs[i]
		c := cand{g.GID, 0, g.CHID}
		if IsEmulatedCHID(g.CHID) {
			if i+1 == len(x.GIDCHIDs) || x.GIDCHIDs[i+1].CHID != g.CHID {
				continue
			}
			i++
			c.ext = x.GIDCHIDs[i].GID
		}
		cands = append(cands, c)
	}
	var ch *v2Choice
	var why error = fmt.Errorf("no proposed GID on CHID %#04x", dev.CHID())
	for _, c := range cands {
		if c.chid != dev.CHID() || c.gid == 0 {
			continue
		}
		if c.ext != 0 {
			why = fmt.Errorf("proposed GID %#x has gid_ext %#x: not on our fabric", c.gid, c.ext)
			continue
		}
		if err := dev.QueryRGID(c.gid); err != nil {
			why = fmt.Errorf("proposed GID %#x: %w", c.gid, err)
			continue
		}
		ch = &v2Choice{peerGID: c.gid, peerGIDExt: c.ext}
		break
	}
	if ch == nil {
		return nil, DeclineNoSMCD2Dev, why
	}
	// We have no system EID (Linux on x86 has none either): user EIDs
	// only, the first of the client's that we share.
	for _, e := range x.EIDs {
		if hasEID(ueids, e) {
			ch.eid = e
			break
		}
	}
	if ch.eid == (EID{}) {
		return nil, 0, errors.New("no UEID in common")
	}
	ch.release = min(x.Release, SMCRelease)
	ch.features = SMCFeatureMask
	return ch, 0, nil
}

// fillAccept makes acc the v2 Accept: always first contact (each connection
// is its own link group), with the first-contact extension.
func (ch *v2Choice) fillAccept(dev ISM, acc *AcceptConfirm) {
	acc.Version = 2
	acc.CHID = dev.CHID()
	acc.EID = ch.eid
	acc.GIDExt = 0 // our own gid_ext
	acc.FirstContact = true
	acc.FCE = ch.fce()
}

func (ch *v2Choice) fce() *FirstContactExt {
	f := &FirstContactExt{OSType: OSTypeLinux, Release: ch.release, Hostname: localHostname}
	if ch.release > 0 {
		f.FeatureMask = ch.features
	}
	return f
}

// checkConfirm checks the client's Confirm against what we accepted; a
// nil choice is v1, which wants a v1 Confirm.
func (ch *v2Choice) checkConfirm(dev ISM, conf *AcceptConfirm) error {
	switch {
	case ch == nil && conf.Version != 1:
		return clcErr("v%d confirm to a v1 accept", conf.Version)
	case ch == nil:
		return nil
	case conf.Version < 2:
		return clcErr("v1 confirm to a v2 accept")
	case IsEmulatedCHID(dev.CHID()) && conf.GIDExt != ch.peerGIDExt:
		return clcErr("confirm gid_ext %#x, proposed %#x", conf.GIDExt, ch.peerGIDExt)
	case conf.FCE != nil && conf.FCE.Release != ch.release:
		return &DeclineError{Code: DeclineReleaseErr, Err: clcErr("confirm release %d, accepted %d", conf.FCE.Release, ch.release)}
	}
	return nil
}

// checkAcceptV2 is the client's check of a v2 Accept; the error has the
// code to decline with.
func checkAcceptV2(dev ISM, prop *Proposal, acc *AcceptConfirm, ueids []EID) (*v2Choice, *DeclineError) {
	bad := func(code uint32, err error) (*v2Choice, *DeclineError) {
		return nil, &DeclineError{Code: code, Err: err}
	}
	switch {
	case prop.V2 == nil:
		// smc_connect_check_aclc
		return bad(DeclineModeUnsupp, errors.New("v2 accept to a v1 proposal"))
	case acc.CHID != dev.CHID():
		return bad(DeclineCnfErr, clcErr("accept for CHID %#04x, ours %#04x", acc.CHID, dev.CHID()))
	case !hasEID(ueids, acc.EID):
		return bad(DeclineCnfErr, clcErr("accept with EID %q, which we did not offer", acc.EID.String()))
	case acc.FCE != nil && acc.FCE.Release > SMCRelease:
		return bad(DeclineReleaseErr, clcErr("accept with release %d, we offered %d", acc.FCE.Release, SMCRelease))
	}
	ch := &v2Choice{peerGID: acc.GID, eid: acc.EID, release: SMCRelease, features: SMCFeatureMask}
	if IsEmulatedCHID(acc.CHID) {
		ch.peerGIDExt = acc.GIDExt
	}
	if ch.peerGIDExt != 0 {
		return bad(DeclineNoSMCDDev, fmt.Errorf("server GID %#x has gid_ext %#x: not on our fabric", acc.GID, ch.peerGIDExt))
	}
	if acc.FCE != nil {
		// smc_clc_clnt_v2x_features_validate
		ch.release = acc.FCE.Release
		ch.features = acc.FCE.FeatureMask & SMCFeatureMask
	}
	return ch, nil
}

// fillConfirm makes conf the v2 Confirm to acc: first contact as the
// server said (a Linux server that already has a link group with our GID
// says not), echoing the EID, release and features.
func (ch *v2Choice) fillConfirm(dev ISM, conf *AcceptConfirm, acc *AcceptConfirm) {
	conf.Version = 2
	conf.CHID = dev.CHID()
	conf.EID = ch.eid
	conf.GIDExt = 0
	conf.FirstContact = acc.FirstContact
	conf.FCE = nil
	if acc.FirstContact {
		conf.FCE = ch.fce()
	}
}

// setCLC records in c what the handshake settled on; nil is v1.
func (c *Conn) setCLC(ch *v2Choice) {
	c.clcVersion = 1
	if ch != nil {
		c.clcVersion = 2
		c.peerGIDExt = ch.peerGIDExt
		c.eid = ch.eid
	}
}
