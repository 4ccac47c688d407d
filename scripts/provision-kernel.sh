#!/usr/bin/env bash
# Provides a guest kernel at $CACHE/kernel/vmlinuz plus the modules the image
# needs ($CACHE/kernel/modules/lib/modules/<ver>/...) with their modules.dep.
# Debian bookworm's 6.1 kernel: CONFIG_VIRTIO_PCI=m, so nothing binds the ISM
# device until virtio_pci is loaded (for the guests' virtio-net NIC); then the
# userspace driver takes the device back (guestdriver/takeover.go).
set -euo pipefail

CACHE=${ISM_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache}
DIR=$CACHE/kernel
STAMP=$DIR/.stamp
# Modules for the guest network (virtio_net over virtio_pci, the default NIC;
# e1000 for VMs that ask for one) and for the ISM driver's interrupts
# (uio_pci_generic), and the kernel's own SMC (smc, with ib_core, and
# smc_diag for its view of each connection) for the AF_SMC interop tests.
# Dependencies (virtio_net: net_failover, failover, virtio, virtio_ring;
# smc: ib_core) are added from each module's .modinfo.
MODULES=${ISM_KERNEL_MODULES:-"e1000 uio_pci_generic virtio_pci virtio_net smc smc_diag"}

# The stamp names the module list, so a changed list provisions again.
if [ -f "$STAMP" ] && [ -f "$DIR/vmlinuz" ] && [ "$(cat "$STAMP")" = "$MODULES" ]; then
	echo "kernel: up to date ($(cat "$DIR/version"))"
	exit 0
fi
start=$(date +%s)
mkdir -p "$DIR"

# Newest bookworm linux-image-6.1.0-N-amd64 the apt lists know.
pick() {
	apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n1
}
pkg=$(pick)
if [ -z "$pkg" ]; then
	echo "kernel: no linux-image-6.1.0-*-amd64 in the apt lists; running apt-get update"
	apt-get update -q
	pkg=$(pick)
fi
[ -n "$pkg" ] || { echo "kernel: no linux-image-6.1.0-*-amd64 available" >&2; exit 1; }
echo "kernel: fetching $pkg into $DIR (about 10 s, 70 MB download)"

tmp=$(mktemp -d "$DIR/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# _apt cannot write into a root-owned temp dir; apt then warns and
# downloads as root, which is fine here.
(cd "$tmp" && apt-get download -q "$pkg" 2>&1 | grep -v "unsandboxed" || true)
ls "$tmp"/*.deb >/dev/null
dpkg-deb -x "$tmp"/*.deb "$tmp/x"
ver=$(ls "$tmp/x/lib/modules" | head -n1)
src=$tmp/x/lib/modules/$ver

# Keep only the wanted modules and their dependencies, with a modules.dep
# that lists just those, so the image stays small and modprobe works. The
# package ships no modules.dep (depmod runs at install time) and the host may
# lack kmod, so dependencies come from each module's .modinfo "depends=".
dest=$DIR/modules/lib/modules/$ver
rm -rf "$DIR/modules"
mkdir -p "$dest"
declare -A want=()
order=()
# name<TAB>path index, built once (a find per lookup took over a minute).
(cd "$src" && find kernel -name '*.ko*') | awk '{n=$0; sub(/.*\//,"",n); sub(/\.ko.*/,"",n); gsub(/-/,"_",n); print n "\t" $0}' >"$tmp/index"
modpath() { # name -> path relative to $src ("-" and "_" are the same in names)
	local f
	f=$(awk -F'\t' -v n="${1//-/_}" '$1==n {print $2; exit}' "$tmp/index")
	[ -n "$f" ] || { echo "kernel: module $1 not found" >&2; return 1; }
	echo "$f"
}
deps_of() { tr '\0' '\n' <"$src/$1" | sed -n 's/^depends=//p' | tr ',' ' '; }
add() {
	local path d
	path=$(modpath "$1")
	[ -n "${want[$path]:-}" ] && return 0
	want[$path]=1
	for d in $(deps_of "$path"); do add "$d"; done
	order+=("$path")
}
for m in $MODULES; do add "$m"; done
: >"$dest/modules.dep"
for path in "${order[@]}"; do
	mkdir -p "$dest/$(dirname "$path")"
	cp "$src/$path" "$dest/$path"
	line="$path:"
	for d in $(deps_of "$path"); do line="$line $(modpath "$d")"; done
	echo "$line" >>"$dest/modules.dep"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
	[ -f "$src/$f" ] && cp "$src/$f" "$dest/$f"
done
# modules.dep.bin would disagree with the trimmed modules.dep: drop it.
rm -f "$dest/modules.dep.bin"

cp "$tmp/x/boot/vmlinuz-$ver" "$DIR/vmlinuz"
echo "$ver" >"$DIR/version"
echo "kernel: $ver; modules: $(cut -d: -f1 "$dest/modules.dep" | xargs -n1 basename | tr '\n' ' ')"
echo "$MODULES" >"$STAMP"
echo "kernel: done in $(($(date +%s) - start)) s"
