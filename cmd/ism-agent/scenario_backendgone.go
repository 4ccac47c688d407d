package main

// backend-gone: open the ISM device, wait until its heartbeat has moved
// twice (heartbeat_before), report ready=1 and wait for "go" on the
// control port (the host kills the backend in between), then send requests
// and expect them to fail with guestdriver.ErrBackendGone, not to wait for
// the driver's request timeout (30 s). Reports
// first_error, first_error_ms (from the request to the error), second_error
// (a request after that, which must fail at once) and closed=1 after Close,
// which must leave the device alone (QEMU 11.1.3 aborts on a config read of
// a vhost-user device whose back-end is gone).

import (
	"errors"
	"fmt"
	"time"

	"github.com/ism-backend/ism-backend/guestdriver"
)

func init() { register("backend-gone", backendGone) }

func backendGone(e *Env) error {
	ctl, err := openHostControl()
	if err != nil {
		return err
	}
	defer ctl.Close()
	d, err := openDriver(e)
	if err != nil {
		return err
	}
	if err := d.QueryRGID(d.GID()); err != nil {
		return fmt.Errorf("QUERY_RGID before the backend went: %w", err)
	}
	if d.Config().HeartbeatMS == 0 {
		return errors.New("the device has no heartbeat")
	}
	// A live backend beats: wait for two beats before the host kills it.
	for d.Heartbeat() < 2 {
		select {
		case <-e.Ctx.Done():
			return fmt.Errorf("heartbeat at %d: %w", d.Heartbeat(), e.Ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	e.Result("heartbeat_before", d.Heartbeat())
	e.Result("ready", 1)
	if err := ctl.WaitLine(e.Ctx, "go"); err != nil {
		return err
	}
	start := time.Now()
	err = d.QueryRGID(d.GID())
	e.Result("first_error_ms", time.Since(start).Milliseconds())
	if err == nil {
		return errors.New("QUERY_RGID succeeded with the backend gone")
	}
	e.Result("first_error", err.Error())
	if !errors.Is(err, guestdriver.ErrBackendGone) {
		return fmt.Errorf("QUERY_RGID with the backend gone: %w, want ErrBackendGone", err)
	}
	start = time.Now()
	err = d.QueryRGID(d.GID())
	e.Result("second_error_ms", time.Since(start).Milliseconds())
	if !errors.Is(err, guestdriver.ErrBackendGone) {
		return fmt.Errorf("the next request: %v, want ErrBackendGone", err)
	}
	e.Result("second_error", err.Error())
	d.Close()
	e.Result("closed", 1)
	return nil
}
