#!/bin/sh
# The slow tier in one command (as root): builds the Debian test guest once, fetches QEMU once
# when none is on PATH and PROVISIONER_QEMU_BIN_DIR is unset (fetch-qemu.sh), then runs the
# ignored real-VM test. Both caches live in /var/tmp and are reused by later runs.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export PROVISIONER_GUEST_DIR="${PROVISIONER_GUEST_DIR:-/var/tmp/provisioner-guest}"
"$here/build-guest.sh" "$PROVISIONER_GUEST_DIR"
if [ -z "${PROVISIONER_QEMU_BIN_DIR:-}" ] && ! command -v qemu-system-x86_64 >/dev/null; then
    PROVISIONER_QEMU_BIN_DIR=$("$here/fetch-qemu.sh")
    export PROVISIONER_QEMU_BIN_DIR
fi
cd "$here/../../.."
exec cargo test -p provisioner --test vm_slow -- --ignored --nocapture
