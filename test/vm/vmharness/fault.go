package vmharness

// StatusFault is one standing fault of `ism-backend status -json`.
type StatusFault struct {
	ID       uint64 `json:"id"`
	Fault    string `json:"fault"`
	Kind     string `json:"kind"`
	VM       string `json:"vm"`
	Injected uint64 `json:"injected"`
}

// Fault runs `ism-backend fault args...` (e.g. "drop-signals", "to=a",
// "every=3") against the backend and returns what it printed.
func (b *Backend) Fault(args ...string) (string, error) {
	out, err := b.command(append([]string{"fault"}, args...)...)
	return string(out), err
}
