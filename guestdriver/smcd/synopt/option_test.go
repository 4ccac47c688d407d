package synopt

import (
	"encoding/binary"
	"errors"
	"testing"
)

func TestOptionBytes(t *testing.T) {
	got := Option()
	want := [OptLen]byte{254, 6, 0xE2, 0xD4, 0xC3, 0xD9}
	if got != want {
		t.Fatalf("Option() = % x, want % x", got, want)
	}
	// The program stores the option as two little-endian words at stOpt.
	lo, hi := optionWords()
	var b [8]byte
	binary.LittleEndian.PutUint32(b[:4], uint32(lo))
	binary.LittleEndian.PutUint32(b[4:], uint32(hi))
	if [OptLen]byte(b[:OptLen]) != want || b[6] != 0 || b[7] != 0 {
		t.Fatalf("program's option words give % x", b)
	}
}

func TestHasOption(t *testing.T) {
	smc := []byte{254, 6, 0xE2, 0xD4, 0xC3, 0xD9}
	cat := func(p ...[]byte) []byte {
		var b []byte
		for _, x := range p {
			b = append(b, x...)
		}
		return b
	}
	mss := []byte{2, 4, 0x05, 0xb4}
	ts := []byte{8, 10, 1, 2, 3, 4, 0, 0, 0, 0}
	for _, c := range []struct {
		name string
		opts []byte
		want bool
		err  bool
	}{
		{"empty", nil, false, false},
		{"linux SYN without", cat(mss, []byte{4, 2}, ts, []byte{1, 3, 3, 7}), false, false},
		{"linux SMC SYN", cat(mss, []byte{4, 2}, ts, []byte{1, 3, 3, 7}, []byte{1, 1}, smc), true, false},
		{"ours after padding", cat(mss, smc, []byte{1, 1}), true, false},
		{"longer even length", cat([]byte{254, 8, 0xE2, 0xD4, 0xC3, 0xD9, 0, 0}), true, false},
		{"odd length", cat([]byte{254, 7, 0xE2, 0xD4, 0xC3, 0xD9, 0}), false, false},
		{"other magic (fastopen)", cat([]byte{254, 4, 0xF9, 0x89}), false, false},
		{"other ExID", cat([]byte{254, 6, 0xE2, 0xD4, 0xC3, 0xC4}), false, false},
		{"kind 253", cat([]byte{253, 6, 0xE2, 0xD4, 0xC3, 0xD9}), false, false},
		{"after EOL", cat(mss, []byte{0, 0}, smc), false, false},
		{"truncated", cat(mss, smc[:5]), false, true},
		{"zero length", cat([]byte{3, 0}, smc), false, true},
		{"no length byte", []byte{2}, false, true},
		{"too short to hold magic", []byte{254, 2}, false, false},
	} {
		got, err := HasOption(c.opts)
		if got != c.want || (err != nil) != c.err {
			t.Errorf("%s: HasOption(% x) = %v, %v; want %v, error %v", c.name, c.opts, got, err, c.want, c.err)
		}
		if err != nil && !errors.Is(err, ErrOptions) {
			t.Errorf("%s: error %v is not ErrOptions", c.name, err)
		}
	}
}

// syn builds an IPv4 (or IPv6) SYN with the given TCP options.
func syn(v6 bool, flags byte, opts []byte) []byte {
	var ip []byte
	if v6 {
		ip = make([]byte, 40)
		ip[0], ip[6] = 0x60, 6
	} else {
		ip = make([]byte, 20)
		ip[0], ip[9] = 0x45, 6
	}
	for len(opts)%4 != 0 {
		opts = append(opts, 0)
	}
	tcp := make([]byte, 20, 20+len(opts))
	tcp[12] = byte((20 + len(opts)) / 4 << 4)
	tcp[13] = flags
	return append(append(ip, tcp...), opts...)
}

func TestSYNHasOption(t *testing.T) {
	o := Option()
	with := append([]byte{2, 4, 5, 0xb4, 1, 1}, o[:]...)
	for _, c := range []struct {
		name string
		b    []byte
		want bool
		err  bool
	}{
		{"v4 with", syn(false, 0x02, with), true, false},
		{"v6 with", syn(true, 0x02, with), true, false},
		{"v4 without", syn(false, 0x02, []byte{2, 4, 5, 0xb4}), false, false},
		{"not a SYN", syn(false, 0x10, with), false, true},
		{"cut TCP header", syn(false, 0x02, with)[:30], false, true},
		{"data offset past end", func() []byte { b := syn(false, 0x02, nil); b[20+12] = 0xf0; return b }(), false, true},
		{"not TCP", func() []byte { b := syn(false, 0x02, with); b[9] = 17; return b }(), false, true},
		{"IP version 5", func() []byte { b := syn(false, 0x02, with); b[0] = 0x55; return b }(), false, true},
		{"empty", nil, false, true},
	} {
		got, err := SYNHasOption(c.b)
		if got != c.want || (err != nil) != c.err {
			t.Errorf("%s: SYNHasOption = %v, %v; want %v, error %v", c.name, got, err, c.want, c.err)
		}
	}
}

func TestDecide(t *testing.T) {
	rec := func(bits uint32) Record { return Record{Found: true, Bits: bits} }
	for _, c := range []struct {
		name   string
		active bool
		r      Record
		want   error // nil: CLC
	}{
		{"dial: both ways", true, rec(RecActive | RecDone | RecSent | RecPeer), nil},
		{"dial: SYN-ACK without", true, rec(RecActive | RecDone | RecSent), ErrPeerNoSMC},
		{"dial: not sent, peer had it", true, rec(RecActive | RecDone | RecPeer), ErrNotSent},
		{"dial: no record", true, Record{}, ErrNoRecord},
		{"dial: record of our SYN only", true, rec(RecActive | RecSent), ErrNoRecord},
		{"dial: passive record", true, rec(RecDone | RecPeer), ErrNoRecord},
		{"listen: SYN had it", false, rec(RecDone | RecPeer), nil},
		{"listen: SYN without", false, rec(RecDone), ErrPeerNoSMC},
		{"listen: SYN cookies", false, rec(RecDone | RecNoSYN), ErrSYNNotSaved},
		{"listen: no record", false, Record{}, ErrNoRecord},
		{"listen: active record", false, rec(RecActive | RecDone | RecSent | RecPeer), ErrNoRecord},
	} {
		err := Decide(c.active, c.r)
		if (c.want == nil) != (err == nil) || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("%s: Decide(%v, %v) = %v, want %v", c.name, c.active, c.r, err, c.want)
		}
	}
}

func TestOwnCgroup(t *testing.T) {
	const unified = "36 25 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n" +
		"37 25 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
	const pure = "30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
	const ns = "30 22 0:26 /system.slice/x.service /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
	const spaced = "30 22 0:26 / /mnt/cg\\0402 rw - cgroup2 none rw\n"
	for _, c := range []struct {
		name, cg, mi, want string
		err                bool
	}{
		{"hybrid, root", "1:cpu:/\n0::/\n", unified, "/sys/fs/cgroup/unified", false},
		{"pure v2", "0::/user.slice/a\n", pure, "/sys/fs/cgroup/user.slice/a", false},
		{"mount of a subtree", "0::/system.slice/x.service/sub\n", ns, "/sys/fs/cgroup/sub", false},
		{"escaped mountpoint", "0::/a\n", spaced, "/mnt/cg 2/a", false},
		{"v1 only", "1:cpu:/\n", unified, "", true},
		{"no cgroup2 mount", "0::/\n", "37 25 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n", "", true},
	} {
		got, err := ownCgroup(c.cg, c.mi)
		if got != c.want || (err != nil) != c.err {
			t.Errorf("%s: ownCgroup = %q, %v; want %q, error %v", c.name, got, err, c.want, c.err)
		}
		if err != nil && !errors.Is(err, ErrNoCgroup2) {
			t.Errorf("%s: %v is not ErrNoCgroup2", c.name, err)
		}
	}
}
