package vmharness

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
)

func TestFlagValue(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-vm", "a", "-stats-file", "/x/s.json"}, "/x/s.json"},
		{[]string{"--stats-file", "/y"}, "/y"},
		{[]string{"-stats-file=/z", "-vm", "a"}, "/z"},
		{[]string{"--stats-file=/z"}, "/z"},
		{[]string{"-stats-file", "/a", "-stats-file", "/b"}, "/b"}, // the last one counts, as with flag
		{[]string{"-stats-interval", "1s", "-vm", "stats-file"}, ""},
		{[]string{"-stats-file"}, ""},
		{nil, ""},
	} {
		if got := flagValue(c.args, "stats-file"); got != c.want {
			t.Errorf("%q: %q, want %q", c.args, got, c.want)
		}
	}
}

// backendBinary is ISM_BACKEND, else cmd/ism-backend built for this test.
func backendBinary(t *testing.T) string {
	if p := os.Getenv("ISM_BACKEND"); p != "" {
		return p
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no ISM_BACKEND and no go tool to build cmd/ism-backend")
	}
	bin := filepath.Join(t.TempDir(), "ism-backend")
	if out, err := exec.Command(gobin, "build", "-o", bin, "github.com/ism-backend/ism-backend/cmd/ism-backend").CombinedOutput(); err != nil {
		t.Fatalf("building ism-backend: %v\n%s", err, out)
	}
	return bin
}

// TestBackendStats runs a real backend (no guests) with -stats-file and
// asks it for statistics twice; its last write comes at exit.
func TestBackendStats(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs ism-backend")
	}
	bin := backendBinary(t)
	dir, err := os.MkdirTemp("", "ismvm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	r := &Run{T: t, Cfg: Config{Backend: bin, TimeoutScale: 1}, Dir: dir}

	plain := r.StartBackend([]string{"-socket-dir", r.Path("p"), "-vm", "p"}, r.Path("p/p.sock"))
	if _, err := plain.Stats(); err == nil {
		t.Error("Stats of a backend without -stats-file did not fail")
	}

	b := r.StartBackend([]string{"-socket-dir", r.Dir, "-vm", "a=0xa1", "-vm", "b", "-vm-modes", "b=copy",
		"-stats-file", r.Path("stats.json")}, r.Path("a.sock"), r.Path("b.sock"))
	if b.StatsPath != r.Path("stats.json") {
		t.Fatalf("StatsPath %q", b.StatsPath)
	}
	s1, err := b.Stats()
	if err != nil {
		t.Fatal(err)
	}
	a, ok := s1.VM("a")
	if !ok || a.GID != "0x00000000000000a1" || a.Modes != "copy,attach" || a.Connected || a.Stats.Refused == nil {
		t.Errorf("a: %+v (found %v)", a, ok)
	}
	if vb, ok := s1.VM("b"); !ok || vb.Modes != "copy" || vb.Connected {
		t.Errorf("b: %+v (found %v)", vb, ok)
	}
	if _, ok := s1.VM("c"); ok || s1.Total.Devices != 0 || s1.Time.IsZero() {
		t.Errorf("stats %+v", s1)
	}
	s2, err := b.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if s2.Seq <= s1.Seq || !slices.EqualFunc(s1.VMs, s2.VMs, func(x, y VMStats) bool { return x.Name == y.Name }) {
		t.Errorf("second Stats: seq %d after %d, vms %+v", s2.Seq, s1.Seq, s2.VMs)
	}
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	if last, err := b.ReadStats(); err != nil || last.Seq <= s2.Seq {
		t.Errorf("no write at exit: %+v, %v", last, err)
	}
	if _, err := b.Stats(); err == nil {
		t.Error("Stats of a stopped backend did not fail")
	}
}
