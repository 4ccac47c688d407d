package abi

import (
	"testing"
	"unsafe"
)

func TestParseModes(t *testing.T) {
	for _, c := range []struct {
		in   string
		want uint16
	}{{"copy", ModeCopy}, {"attach", ModeAttach}, {"copy,attach", ModeCopy | ModeAttach}, {" attach , copy", ModeCopy | ModeAttach}} {
		got, err := ParseModes(c.in)
		if err != nil || got != c.want {
			t.Errorf("ParseModes(%q) = %#x, %v; want %#x", c.in, got, err, c.want)
		}
		if back, _ := ParseModes(ModesString(got)); back != got {
			t.Errorf("ModesString(%#x) = %q does not parse back", got, ModesString(got))
		}
	}
	for _, bad := range []string{"", "copy,", "nocopy", "copy,attch"} {
		if _, err := ParseModes(bad); err == nil {
			t.Errorf("ParseModes(%q) accepted", bad)
		}
	}
}

func TestConfigRoundTrip(t *testing.T) {
	c := Config{Magic: Magic, Version: Version, Modes: ModeCopy | ModeAttach, GID: 0x1122334455667788, CHID: 0xff01,
		MaxDMBs: MaxDMBs, MaxDMBSize: MaxDMBSize, MaxMoveLen: 4096, ShmSize: 64 << 20, QueueSize: 1024, HeartbeatMS: 500}
	var b [ConfigSize]byte
	c.Encode(b[:])
	got, err := DecodeConfig(b[:])
	if err != nil || got != c {
		t.Fatalf("DecodeConfig(Encode(%+v)) = %+v, %v", c, got, err)
	}
	if b[cfgHeartbeatMS] != 0xf4 || b[cfgHeartbeatMS+1] != 0x01 {
		t.Errorf("heartbeat period not little-endian at %d: % x", cfgHeartbeatMS, b[40:48])
	}
}

// The heartbeat is a word of its own: beats never touch a signal counter,
// and signals never the heartbeat.
func TestSBAHeartbeat(t *testing.T) {
	mem := make([]uint32, SBASize/4)
	s, err := NewSBA(unsafe.Slice((*byte)(unsafe.Pointer(&mem[0])), SBASize))
	if err != nil {
		t.Fatal(err)
	}
	s.Beat(7)
	s.Signal(MaxDMBs-1, MaxDMBEs-1)
	s.Signal(0, 0)
	if s.Heartbeat() != 7 || s.Sum() != 2 {
		t.Fatalf("heartbeat %d sum %d, want 7 and 2", s.Heartbeat(), s.Sum())
	}
	for i, w := range mem {
		if i*4 != SBAHeartbeatOffset && w == 7 {
			t.Errorf("word at %d holds the heartbeat", i*4)
		}
	}
}
