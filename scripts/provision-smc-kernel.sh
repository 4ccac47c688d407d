#!/usr/bin/env bash
# Provides the guest kernel for the kernel's own SMC-D (issue 13): Linux from
# Debian's linux-source-7.x, configured by guestdriver/kernel/ism-guest.config
# on top of allnoconfig (DIBS, DIBS_LO, SMC, SMC_DIAG, virtio, BPF built in),
# built inside a Debian trixie root whose gcc is the one Debian builds 7.x with
# (the host's gcc-12 is older).
#
# The build is cached outside the clone, keyed by the config, the source
# package and this script's recipe, so a machine builds it once and every
# clone (and CI) reuses it:
#   $ISM_KERNEL_CACHE/smc-kernel/<source>-<key>/
#       root/          the trixie root; the built tree in root/usr/src/<source>
#       bzImage, version
#       .done          written last
# and links $ISM_CACHE/smc-kernel/{bzImage,version,tree} to it. The module
# (guestdriver/kernel) is built against that tree by scripts/build-kmod.sh.
#
# ISM_KERNEL_CACHE defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/ism-backend.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${ISM_CACHE:-$HERE/.cache}
KCACHE=${ISM_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ism-backend}
SOURCE=${ISM_SMC_KERNEL_SOURCE:-linux-source-7.3}
CONFIG=$HERE/guestdriver/kernel/ism-guest.config
# Bump when the recipe below changes in a way the key would not see.
RECIPE=1
# Build tools for the root; linux-source itself comes from trixie-backports.
PACKAGES=gcc,make,bc,flex,bison,libelf-dev,libssl-dev,cpio,kmod,xz-utils,python3,perl

key=$( { cat "$CONFIG"; echo "$SOURCE $RECIPE $PACKAGES"; } | sha256sum | cut -c1-12)
DIR=$KCACHE/smc-kernel/$SOURCE-$key
LINK=$CACHE/smc-kernel

link() {
	mkdir -p "$LINK"
	ln -sfn "$DIR/bzImage" "$LINK/bzImage"
	ln -sfn "$DIR/version" "$LINK/version"
	ln -sfn "$DIR/root" "$LINK/root"
	echo "$SOURCE" >"$LINK/source.tmp" && mv "$LINK/source.tmp" "$LINK/source"
}

if [ -f "$DIR/.done" ]; then
	echo "smc-kernel: up to date ($(cat "$DIR/version"), $DIR)"
	link
	exit 0
fi

mkdir -p "$KCACHE/smc-kernel"
# One build per machine at a time; a second clone waits and then finds it done.
exec 9>"$KCACHE/smc-kernel/.lock"
if ! flock -n 9; then
	echo "smc-kernel: another build holds $KCACHE/smc-kernel/.lock; waiting"
	flock 9
fi
if [ -f "$DIR/.done" ]; then
	echo "smc-kernel: built meanwhile ($(cat "$DIR/version"))"
	link
	exit 0
fi

start=$(date +%s)
echo "smc-kernel: building the guest kernel for the kernel's SMC-D into $DIR"
echo "smc-kernel: once per machine (key $key from $(basename "$CONFIG")); about 1 min to fetch, 10-20 min to build on 2 cores"
if ! command -v mmdebstrap >/dev/null; then
	echo "smc-kernel: installing mmdebstrap (apt-get)"
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap
fi
rm -rf "$DIR"
mkdir -p "$DIR"
ROOT=$DIR/root
mmdebstrap --quiet --variant=apt --include="$PACKAGES,$SOURCE" \
	--aptopt='APT::Install-Recommends "false"' \
	--aptopt='APT::Default-Release "trixie-backports"' \
	trixie "$ROOT" \
	"deb http://deb.debian.org/debian trixie main" \
	"deb http://deb.debian.org/debian trixie-backports main"
tarball=$(ls "$ROOT/usr/src/$SOURCE".tar.* 2>/dev/null | head -n1)
[ -n "$tarball" ] || { echo "smc-kernel: $SOURCE brought no tarball into $ROOT/usr/src" >&2; exit 1; }
echo "smc-kernel: unpacking $(basename "$tarball") ($(($(date +%s) - start)) s so far)"
tar -C "$ROOT/usr/src" -xf "$tarball"
rm -f "$tarball"
cp "$CONFIG" "$ROOT/usr/src/ism-guest.config"

# In the root, in a private mount namespace (objtool reads /proc; the mount
# goes with the namespace, whatever happens to this script).
inroot() {
	unshare -m sh -c 'mount -t proc proc "$1/proc" && shift && exec chroot "$@"' sh "$ROOT" "$ROOT" "$@"
}

inroot sh -c "cd /usr/src/$SOURCE && make -s allnoconfig KCONFIG_ALLCONFIG=/usr/src/ism-guest.config"
# allnoconfig drops what a dependency refuses without a word: every option
# the fragment names must come out as asked.
missing=""
while read -r line; do
	case $line in
	CONFIG_*=n) opt=${line%=n}; grep -q "^$opt=" "$ROOT/usr/src/$SOURCE/.config" && missing="$missing $opt" ;;
	CONFIG_*) grep -qxF "$line" "$ROOT/usr/src/$SOURCE/.config" || missing="$missing ${line%%=*}" ;;
	"# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}; grep -q "^$opt=" "$ROOT/usr/src/$SOURCE/.config" && missing="$missing $opt" ;;
	esac
done <"$CONFIG"
if [ -n "$missing" ]; then
	echo "smc-kernel: the config did not take:$missing (a dependency is missing from $(basename "$CONFIG"))" >&2
	exit 1
fi

jobs=$(nproc)
echo "smc-kernel: make -j$jobs bzImage modules_prepare (log: $DIR/build.log)"
if ! inroot sh -c "cd /usr/src/$SOURCE && make -j$jobs bzImage modules_prepare" >"$DIR/build.log" 2>&1; then
	tail -n 30 "$DIR/build.log" >&2
	echo "smc-kernel: build failed; the whole log is $DIR/build.log" >&2
	exit 1
fi
cp "$ROOT/usr/src/$SOURCE/arch/x86/boot/bzImage" "$DIR/bzImage"
inroot sh -c "cd /usr/src/$SOURCE && make -s kernelrelease" >"$DIR/version"
echo "$SOURCE" >"$DIR/source"
touch "$DIR/.done"
echo "smc-kernel: $(cat "$DIR/version") built in $(($(date +%s) - start)) s"
link
