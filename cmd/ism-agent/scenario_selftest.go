package main

import (
	"errors"
	"time"
)

// agent-selftest fails on purpose so the VM tests can check that every way
// a scenario goes wrong still ends in "ISM-AGENT-END fail" and a power-off:
// ism.mode=error | panic | gopanic (panic in another goroutine) | hang.
func init() {
	register("agent-selftest", func(e *Env) error {
		switch m := e.Arg("mode", "error"); m {
		case "error":
			return errors.New("selftest error")
		case "panic":
			panic("selftest panic")
		case "gopanic":
			go func() { panic("selftest goroutine panic") }()
			time.Sleep(time.Minute)
		case "hang":
			// Ignores e.Ctx: only the supervisor's watchdog ends this.
			// (select{} would be caught as a deadlock by the runtime.)
			time.Sleep(24 * time.Hour)
		default:
			return errors.New("unknown ism.mode " + m)
		}
		return nil
	})
}
