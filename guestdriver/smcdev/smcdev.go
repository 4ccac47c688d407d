// Package smcdev lets the SMC-D stack (guestdriver/smcd) run over the
// guest's virtio ISM driver (guestdriver). It only converts types: Go's
// interfaces need the exact return types smcd.ISM names, and keeping the
// two packages apart keeps smcd testable on its in-process loopback device.
package smcdev

import (
	"fmt"
	"sync"

	"github.com/ism-backend/ism-backend/abi"
	"github.com/ism-backend/ism-backend/guestdriver"
	"github.com/ism-backend/ism-backend/guestdriver/smcd"
)

// Adapter is a *guestdriver.Driver as an smcd.Adapter. It also tells the
// stack when a peer's device goes away (smcd.PeerWatcher), how long a MOVE
// may be (smcd.MoveLimiter), and attaches peers' DMBs in attach mode
// (smcd.Attacher). It takes over the driver's event channel.
type Adapter struct {
	d        *guestdriver.Driver
	peers    *smcd.PeerWatchers
	dmbs     *smcd.PeerWatchers // by token
	once     *sync.Once
	copyOnly bool
}

var (
	_ smcd.ISM           = Adapter{}
	_ smcd.PeerWatcher   = Adapter{}
	_ smcd.DMBWatcher    = Adapter{}
	_ smcd.RevokeChecker = Adapter{}
	_ smcd.MoveLimiter   = Adapter{}
	_ smcd.Attacher      = Adapter{}
	_ smcd.SharedDMB     = (*guestdriver.DMB)(nil)
	_ smcd.PeerDMB       = (*guestdriver.Attachment)(nil)
)

// New wraps d.
func New(d *guestdriver.Driver) Adapter {
	return Adapter{d: d, peers: &smcd.PeerWatchers{}, dmbs: &smcd.PeerWatchers{}, once: &sync.Once{}}
}

// WatchPeer implements smcd.PeerWatcher from the device's GID events: the
// backend posts one when a peer's device resets or its VM disconnects.
func (v Adapter) WatchPeer(gid uint64, gone func()) (cancel func()) {
	v.once.Do(func() { go v.dispatch() })
	return v.peers.Watch(gid, gone)
}

// WatchDMB implements smcd.DMBWatcher from the device's DMB events with
// code abi.DMBRevoked: the backend posts one to a DMB's owner and rgid when
// it revokes the DMB.
func (v Adapter) WatchDMB(token uint64, gone func()) (cancel func()) {
	v.once.Do(func() { go v.dispatch() })
	return v.dmbs.Watch(token, gone)
}

// Revoked implements smcd.RevokeChecker through the driver, which reaps
// the event queue first.
func (v Adapter) Revoked(token uint64) bool { return v.d.Revoked(token) }

// dispatch reads events until the driver closes its channel.
func (v Adapter) dispatch() {
	for ev := range v.d.Events() {
		switch ev.Type {
		case abi.EventGID:
			v.peers.Gone(ev.GID)
		case abi.EventDMB:
			// Only a revoke fails connections here: an attached peer
			// DMB that its owner unregistered or lost comes with the
			// peer's CDC close or its GID event, which say more.
			if ev.Code == abi.DMBRevoked {
				v.dmbs.Gone(ev.Token)
			}
		}
	}
}

// CopyOnly returns the same device for connections that must use copy
// mode whatever the driver offers: their DMBs are in guest RAM and peers'
// DMBs are MOVEd into, never attached (for side-by-side measurements).
func (v Adapter) CopyOnly() Adapter {
	v.copyOnly = true
	return v
}

// MaxMoveLen implements smcd.MoveLimiter from the config space.
func (v Adapter) MaxMoveLen() int { return int(v.d.Config().MaxMoveLen) }

// Driver returns the wrapped driver.
func (v Adapter) Driver() *guestdriver.Driver { return v.d }

func (v Adapter) GID() uint64                 { return v.d.GID() }
func (v Adapter) CHID() uint16                { return v.d.CHID() }
func (v Adapter) QueryRGID(rgid uint64) error { return v.d.QueryRGID(rgid) }

func (v Adapter) RegisterDMB(size int, rgid uint64) (smcd.DMB, error) {
	var m *guestdriver.DMB
	var err error
	if v.copyOnly {
		m, err = v.d.RegisterDMBIn(abi.ModeCopy, size, rgid)
	} else {
		m, err = v.d.RegisterDMB(size, rgid)
	}
	if err != nil {
		return nil, err
	}
	return m, nil
}

func (v Adapter) UnregisterDMB(m smcd.DMB) error {
	dm, ok := m.(*guestdriver.DMB)
	if !ok {
		return fmt.Errorf("smcdev: DMB %T is not this driver's", m)
	}
	return v.d.UnregisterDMB(dm)
}

func (v Adapter) AllocBuffer(size int) (smcd.Buffer, error) {
	b, err := v.d.AllocBuffer(size)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// AttachDMB implements smcd.Attacher through the driver's attach mode; a
// driver that does not use it answers abi.StatusUnsupported, and the stack
// MOVEs.
func (v Adapter) AttachDMB(token uint64) (smcd.PeerDMB, error) {
	if v.copyOnly {
		return nil, fmt.Errorf("smcdev: copy mode only: %w", abi.StatusUnsupported)
	}
	a, err := v.d.Attach(token)
	if err != nil {
		return nil, err
	}
	return a, nil
}

func (v Adapter) Move(token uint64, dmbe uint32, signal bool, offset uint32, src smcd.Buffer, srcOff, n int) error {
	if n == 0 && src == nil { // a signal alone
		return v.d.Move(token, dmbe, signal, offset, nil, 0, 0)
	}
	b, ok := src.(*guestdriver.Buffer)
	if !ok {
		return fmt.Errorf("smcdev: buffer %T is not this driver's DMA memory", src)
	}
	return v.d.Move(token, dmbe, signal, offset, b, srcOff, n)
}
