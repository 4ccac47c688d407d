#!/usr/bin/env bash
# Builds the guest initramfs: u-root's init and a few base commands, the
# kernel modules from scripts/provision-kernel.sh and our DIBS driver for the
# SMC kernel (scripts/build-kmod.sh), and our guest tools
# (cmd/ism-agent, plus cmd/smcat, cmd/smcd-bench, cmd/ismctl when they exist,
# plus any cmd/* whose Go files carry the line "//ism:guest-tool").
# init runs /bbin/ism-agent (-uinitcmd), which reads ism.* from the kernel
# command line.
#
# Usage: images/build.sh [output.cpio]   (default $CACHE/image/initramfs.cpio)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${ISM_CACHE:-$REPO/.cache}
OUT=${1:-$CACHE/image/initramfs.cpio}
MODULES=$CACHE/kernel/modules/lib/modules
# The SMC kernel's own modules (our DIBS driver: scripts/build-kmod.sh), under
# that kernel's version, beside the Debian kernel's.
SMC_MODULES=$CACHE/smc-kernel/modules/lib/modules
cd "$REPO"

[ -d "$MODULES" ] || { echo "image: no kernel modules at $MODULES: run scripts/provision-kernel.sh first" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")" "$CACHE/bin"

# Base commands; keep them in tools.go so go.mod keeps their dependencies.
BASE="init cat dmesg echo insmod ip ls lsmod mount ping poweroff ps uname uptime"
cmds=()
for c in $BASE; do cmds+=("github.com/u-root/u-root/cmds/core/$c"); done

tools=()
for d in cmd/*/; do
	d=${d%/}
	n=$(basename "$d")
	case $n in
	ism-agent | smcat | smcd-bench | ismctl) ;;
	*) grep -qs '^//ism:guest-tool' "$d"/*.go || continue ;;
	esac
	ls "$d"/*.go >/dev/null 2>&1 || continue
	tools+=("./$d")
done

echo "image: building $OUT with u-root v0.16.0 (about 30 s idle, 90 s on a busy machine)"
echo "image: guest tools: ${tools[*]}"
start=$(date +%s)
go build -o "$CACHE/bin/u-root" github.com/u-root/u-root
smc_files=()
for d in "$SMC_MODULES"/*/; do
	[ -d "$d" ] || continue
	d=${d%/}
	v=$(basename "$d")
	smc_files+=(-files "$d:lib/modules/$v")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# GOFLAGS from the caller (e.g. -race) must not leak into the guest build.
# -tmp-dir: u-root keeps its build dir on failure; keep it inside ours.
GOFLAGS= "$CACHE/bin/u-root" -build=gbb -o "$tmp/initramfs.cpio" -tmp-dir "$tmp" \
	-defaultsh="" \
	-uinitcmd=/bbin/ism-agent \
	-files "$MODULES:lib/modules" \
	"${smc_files[@]}" \
	"${cmds[@]}" "${tools[@]}" 2>&1 | grep -v 'has not been tested with' || true
[ -s "$tmp/initramfs.cpio" ] || { echo "image: u-root produced nothing" >&2; exit 1; }
mv "$tmp/initramfs.cpio" "$OUT"
echo "image: $OUT ($(du -h "$OUT" | cut -f1)) built in $(($(date +%s) - start)) s"
