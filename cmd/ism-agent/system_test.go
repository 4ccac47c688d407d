package main

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fakePCI makes a sysfs-like PCI device directory per "vendor:device".
func fakePCI(t *testing.T, ids ...string) string {
	t.Helper()
	root := t.TempDir()
	for i, id := range ids {
		v, d, _ := strings.Cut(id, ":")
		dir := filepath.Join(root, "0000:00:0"+string(rune('1'+i))+".0")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for f, val := range map[string]string{"vendor": "0x" + v, "device": "0x" + d, "class": "0x020000"} {
			if err := os.WriteFile(filepath.Join(dir, f), []byte(val+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return root
}

func TestNICModules(t *testing.T) {
	for _, c := range []struct {
		ids  []string
		want []string
	}{
		// The ISM device (1af4:1066) is virtio too, but not a NIC.
		{[]string{"8086:29c0", "1af4:1000", "1af4:1066"}, []string{"virtio_pci", "virtio_net"}},
		{[]string{"1af4:1041"}, []string{"virtio_pci", "virtio_net"}},
		{[]string{"8086:100e", "1af4:1066"}, []string{"e1000"}},
		{[]string{"8086:100e", "1af4:1000", "1af4:1041"}, []string{"e1000", "virtio_pci", "virtio_net"}},
	} {
		got, err := nicModules(fakePCI(t, c.ids...))
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("%v: %v, %v; want %v", c.ids, got, err, c.want)
		}
	}
	if _, err := nicModules(fakePCI(t, "8086:29c0", "1af4:1066")); err == nil || !strings.Contains(err.Error(), "1af4:1066") {
		t.Errorf("no NIC: %v; want an error listing the devices", err)
	}
}

func TestWaitNetdevEndsWithContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := waitNetdev(ctx, "no-such-netdev0"); err == nil {
		t.Fatal("waitNetdev of a missing interface returned nil")
	}
	if _, err := os.Stat("/sys/class/net/lo"); err == nil {
		if err := waitNetdev(context.Background(), "lo"); err != nil {
			t.Fatalf("lo: %v", err)
		}
	}
}
