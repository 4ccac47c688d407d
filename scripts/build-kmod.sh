#!/usr/bin/env bash
# Builds the guest's DIBS driver (guestdriver/kernel) against the SMC kernel's
# tree from scripts/provision-smc-kernel.sh, in that kernel's trixie root (the
# compiler must be the kernel's), and installs it for the image as
# $CACHE/smc-kernel/modules/lib/modules/<version>/extra/ism_dibs.ko.
# Seconds; nothing is kept in the cached tree.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${ISM_CACHE:-$HERE/.cache}
LINK=$CACHE/smc-kernel
SRC=$HERE/guestdriver/kernel
[ -d "$LINK/root" ] && [ -f "$LINK/version" ] || { echo "kmod: no SMC kernel at $LINK: run scripts/provision-smc-kernel.sh first" >&2; exit 1; }
ROOT=$(readlink -f "$LINK/root")
ver=$(cat "$LINK/version")
source=$(cat "$LINK/source")
if [ ! -f "$SRC/Kbuild" ]; then
	echo "kmod: no module in $SRC (no Kbuild); the image carries none"
	rm -rf "$LINK/modules" && mkdir -p "$LINK/modules/lib/modules/$ver"
	cp "$ROOT/usr/src/$source/modules.builtin" "$LINK/modules/lib/modules/$ver/"
	exit 0
fi

# A private copy in the root's /tmp: clones building at once do not meet.
work=$(mktemp -d "$ROOT/tmp/kmod.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$SRC"/Kbuild "$SRC"/*.c "$work"/
cp "$SRC"/*.h "$work"/ 2>/dev/null || true
inroot="/tmp/$(basename "$work")"
# modpost needs the kernel's exported symbols in the tree's Module.symvers,
# which `make modules` writes and `make bzImage modules_prepare` does not:
# with every driver built in, it is vmlinux.symvers. Written once into the
# cached tree (kbuild warns, and fails on every symbol, without it).
tree=$ROOT/usr/src/$source
if [ ! -f "$tree/Module.symvers" ] && [ -f "$tree/vmlinux.symvers" ]; then
	cp "$tree/vmlinux.symvers" "$tree/Module.symvers.tmp" && mv "$tree/Module.symvers.tmp" "$tree/Module.symvers"
fi
if ! unshare -m sh -c 'mount -t proc proc "$1/proc" && shift && exec chroot "$@"' sh "$ROOT" "$ROOT" \
	make -s -C "/usr/src/$source" M="$inroot" W=1 modules >"$work/log" 2>&1; then
	cat "$work/log" >&2
	echo "kmod: build failed" >&2
	exit 1
fi
if [ -s "$work/log" ]; then
	echo "kmod: the compiler said:" && cat "$work/log"
fi
dest=$LINK/modules/lib/modules/$ver/extra
rm -rf "$LINK/modules"
mkdir -p "$dest"
cp "$work"/*.ko "$dest"/
# What the agent's loadModule reads: our module needs only built-in ones, and
# modules.builtin tells it that virtio_net and the like need no loading.
(cd "$LINK/modules/lib/modules/$ver" && for k in extra/*.ko; do echo "$k:"; done >modules.dep)
cp "$ROOT/usr/src/$source/modules.builtin" "$LINK/modules/lib/modules/$ver/"
echo "kmod: $(cd "$dest" && ls *.ko | tr '\n' ' ')for $ver"
