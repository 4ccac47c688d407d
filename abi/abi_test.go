package abi

import "testing"

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
