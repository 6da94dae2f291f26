#!/bin/sh
# QEMU for the slow tier without installing it: `qemu-system-x86` cannot be installed with apt on
# this machine (the preinstalled newer `qemu-utils` conflicts), so its two packages are downloaded
# and unpacked into DIR. Its libraries and firmware come from installed packages (.ci/apt-packages.txt:
# qemu-system-data seabios ipxe-qemu libcapstone4 …). An unpacked QEMU looks for firmware next to
# its binary (`qemu-system-x86_64 -L help`: ../share/qemu, ../share/seabios, ../lib/ipxe/qemu),
# so those are linked to the installed files; without them it stops with
# "could not load PC BIOS 'bios-256k.bin'".
# Usage: fetch-qemu.sh [DIR]   (default /var/tmp/provisioner-qemu; prints the directory of the binary)
set -eu
OUT=${1:-/var/tmp/provisioner-qemu}
ROOT="$OUT/root"
BIN="$ROOT/usr/bin"
if [ ! -x "$BIN/qemu-system-x86_64" ]; then
    mkdir -p "$OUT/debs"
    (cd "$OUT/debs" && apt-get download qemu-system-x86 qemu-system-common >&2)
    for deb in "$OUT"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
    rm -rf "$OUT/debs"
fi
ln -sfn /usr/share/seabios "$ROOT/usr/share/seabios"
mkdir -p "$ROOT/usr/lib/ipxe" "$ROOT/usr/share/qemu"
ln -sfn /usr/lib/ipxe/qemu "$ROOT/usr/lib/ipxe/qemu"
for f in /usr/share/qemu/*; do
    [ -e "$ROOT/usr/share/qemu/${f##*/}" ] || ln -s "$f" "$ROOT/usr/share/qemu/"
done
"$BIN/qemu-system-x86_64" --version >&2
echo "$BIN"
