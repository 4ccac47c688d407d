package vhostuser

import (
	"github.com/ism-backend/ism-backend/internal/ratelog"
)

// Complaints a guest can cause (malformed chains and a broken queue, per
// queue; refused front-end messages, per connection) are logged at most
// logBurst at once and then one per logEvery, so that a guest cannot flood
// the host's log; the count of lines left out goes with the next line.
const (
	logBurst = ratelog.Burst
	logEvery = ratelog.Every
)

type logLimiter = ratelog.Limiter
