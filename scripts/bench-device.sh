#!/usr/bin/env bash
# bench-device.sh: the host-side MOVE figures (make bench-device), no VM.
#
#   ismvirtio.Move64{K,B}      the whole vhost-user path: the test frontend
#                              plays QEMU and a guest keeping requests in flight
#   ism.Move64{K,B}VsMemmove   the device model alone (ism.Device.Move)
#
# Each reports the MOVE's ns/op, MB/s and Mops/s, memmove-ns/op for the same
# copy in the same run (batches alternate) and x_memmove = memmove time /
# MOVE time, plus allocations. ROUNDS rounds (default 5) run every benchmark
# once each, interleaved, so that drift hits all alike; the summary gives
# the median and the range over the rounds, and the load average before each
# round. Raw output: $OUT (default bench-results/device-<time>.txt).
set -euo pipefail

GO=${GO:-go}
ROUNDS=${ROUNDS:-5}
BENCHTIME=${BENCHTIME:-1s}
cd "$(dirname "$0")/.."
mkdir -p bench-results
[ -e bench-results/.gitignore ] || printf '# results stay out of git\n*\n' >bench-results/.gitignore
OUT=${OUT:-bench-results/device-$(date +%Y%m%d-%H%M%S).txt}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$GO test -c -o "$tmp/ism.test" ./ism
$GO test -c -o "$tmp/ismvirtio.test" ./ismvirtio
$GO build -o "$tmp/benchsum" ./internal/benchsum

run() { # dir binary pattern
	echo "pkg: $1"
	local out
	if ! out=$(cd "$1" && "$tmp/$2" -test.run='^$' -test.bench="$3" -test.benchmem -test.benchtime="$BENCHTIME" 2>&1); then
		printf '%s\n' "$out" >&2
		echo "# FAILED: $1 $3"
		touch "$tmp/failed"
	fi
	grep '^Benchmark' <<<"$out" || true
}

{
	echo "# $(date -u +%FT%TZ) $(uname -n), $(nproc) CPUs, $($GO env GOVERSION), GOMAXPROCS=${GOMAXPROCS:-default}"
	for r in $(seq "$ROUNDS"); do
		echo "# round $r: load average $(cut -d' ' -f1-3 /proc/loadavg)"
		if ((r % 2)); then
			run ismvirtio ismvirtio.test '^BenchmarkMove64(K|B)$'
			run ism ism.test '^BenchmarkMove64(K|B)VsMemmove$'
		else
			run ism ism.test '^BenchmarkMove64(K|B)VsMemmove$'
			run ismvirtio ismvirtio.test '^BenchmarkMove64(K|B)$'
		fi
	done
	echo "# end: load average $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT" | grep --line-buffered -E '^(# round|# FAILED|Benchmark)' >&2

echo
"$tmp/benchsum" <"$OUT"
echo
echo "raw output: $OUT"
if [ -e "$tmp/failed" ]; then
	grep '^# FAILED' "$OUT" >&2
	exit 1
fi
