package synopt

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrNoCgroup2 means the process has no cgroup v2 directory to attach to.
var ErrNoCgroup2 = errors.New("no cgroup2 hierarchy mounted for this process")

// ownCgroup finds the process's cgroup v2 directory from the text of
// /proc/self/cgroup and /proc/self/mountinfo.
func ownCgroup(cgroup, mountinfo string) (string, error) {
	rel := ""
	found := false
	for _, l := range strings.Split(cgroup, "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			rel, found = p, true
			break
		}
	}
	if !found {
		return "", fmt.Errorf("%w: no 0:: line in /proc/self/cgroup", ErrNoCgroup2)
	}
	for _, l := range strings.Split(mountinfo, "\n") {
		// id parent major:minor root mountpoint options... - fstype source superopts
		pre, post, ok := strings.Cut(l, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 1 || g[0] != "cgroup2" {
			continue
		}
		root, mnt := unescapeMount(f[3]), unescapeMount(f[4])
		// The mount shows the hierarchy from root; the process's path
		// is relative to the hierarchy's top.
		r, ok := strings.CutPrefix(rel, root)
		if root == "/" {
			r, ok = rel, true
		}
		if !ok {
			continue
		}
		return filepath.Join(mnt, r), nil
	}
	return "", fmt.Errorf("%w: no cgroup2 line in /proc/self/mountinfo", ErrNoCgroup2)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// LoadInChildCgroup creates the cgroup name below the process's own cgroup v2
// directory, moves the whole process into it and loads the program there, so
// that only this process's sockets meet it. Close moves the process back
// and removes the cgroup. For tests and tools on a shared host; a guest
// program attaches to its own cgroup with Load(OwnCgroup()).
func LoadInChildCgroup(name string) (*Program, error) {
	parent, err := OwnCgroup()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(parent, name)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, &LoadError{"cgroup", err}
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0); err != nil {
		os.Remove(dir)
		return nil, &LoadError{"cgroup", err}
	}
	leave := func() error {
		err := os.WriteFile(filepath.Join(parent, "cgroup.procs"), pid, 0)
		return errors.Join(err, os.Remove(dir))
	}
	p, err := Load(dir)
	if err != nil {
		leave()
		return nil, err
	}
	p.onClose = leave
	return p, nil
}
