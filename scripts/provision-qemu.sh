#!/usr/bin/env bash
# Provides a QEMU >= 11.0 with vhost-user-test-device-pci at $CACHE/qemu/qemu-system-x86_64.
# Uses the host's QEMU when it qualifies; otherwise builds a private Debian trixie
# root with mmdebstrap (the host's libraries stay untouched) and writes a wrapper
# that runs that QEMU through the root's own dynamic loader.
set -euo pipefail

CACHE=${ISM_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache}
DIR=$CACHE/qemu
WRAPPER=$DIR/qemu-system-x86_64
STAMP=$DIR/.stamp
mkdir -p "$DIR"

# qualifies BIN: version >= 11.0 and the generic vhost-user device present.
qualifies() {
	local bin=$1 ver major
	ver=$("$bin" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1)
	[ -n "$ver" ] || return 1
	major=${ver%%.*}
	[ "$major" -ge 11 ] || return 1
	"$bin" -device help 2>/dev/null | grep -q '"vhost-user-test-device-pci"'
}

if [ -f "$STAMP" ] && [ -x "$WRAPPER" ] && qualifies "$WRAPPER"; then
	echo "qemu: up to date ($WRAPPER: $("$WRAPPER" --version | head -n1))"
	exit 0
fi

start=$(date +%s)
host=$(command -v qemu-system-x86_64 || true)
if [ -n "$host" ] && qualifies "$host"; then
	echo "qemu: using the host's $host"
	cat >"$WRAPPER.tmp" <<W
#!/bin/sh
exec "$host" "\$@"
W
else
	ROOT=$DIR/root
	echo "qemu: host has no QEMU >= 11.0 with vhost-user-test-device-pci;"
	echo "qemu: fetching QEMU 11.1 from Debian trixie-backports into $ROOT (25 s idle, up to 2 min on a busy machine; 255 MB)"
	if ! command -v mmdebstrap >/dev/null; then
		echo "qemu: installing mmdebstrap (apt-get)"
		apt-get update -q
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap
	fi
	rm -rf "$ROOT"
	# --variant=apt keeps the root minimal; Default-Release picks the
	# backports QEMU (11.x) over trixie's own.
	mmdebstrap --quiet --variant=apt --include=qemu-system-x86,qemu-system-common \
		--aptopt='APT::Install-Recommends "false"' \
		--aptopt='APT::Default-Release "trixie-backports"' \
		trixie "$ROOT" \
		"deb http://deb.debian.org/debian trixie main" \
		"deb http://deb.debian.org/debian trixie-backports main"
	cat >"$WRAPPER.tmp" <<W
#!/bin/sh
# Runs the private root's QEMU with that root's loader and libraries (generated
# by scripts/provision-qemu.sh).
R="$ROOT"
exec "\$R/lib64/ld-linux-x86-64.so.2" \\
	--library-path "\$R/usr/lib/x86_64-linux-gnu:\$R/lib/x86_64-linux-gnu" \\
	"\$R/usr/bin/qemu-system-x86_64" -L "\$R/usr/share/qemu" -L "\$R/usr/share/seabios" "\$@"
W
fi
chmod +x "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

if ! qualifies "$WRAPPER"; then
	echo "qemu: $WRAPPER does not qualify:" >&2
	"$WRAPPER" --version >&2 || true
	exit 1
fi
"$WRAPPER" --version | head -n1
echo "qemu: vhost-user-test-device-pci present"
touch "$STAMP"
echo "qemu: done in $(($(date +%s) - start)) s"
