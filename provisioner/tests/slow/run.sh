#!/bin/sh
# The slow tier in one command (as root): builds the Debian test guest once, then runs the
# ignored real-VM test. QEMU: put qemu-system-x86_64 on PATH or set PROVISIONER_QEMU_BIN_DIR
# (see MACHINE-NOTES: apt-get download qemu-system-x86 qemu-system-common && dpkg -x).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export PROVISIONER_GUEST_DIR="${PROVISIONER_GUEST_DIR:-/var/tmp/provisioner-guest}"
"$here/build-guest.sh" "$PROVISIONER_GUEST_DIR"
cd "$here/../../.."
exec cargo test -p provisioner --test vm_slow -- --ignored --nocapture
