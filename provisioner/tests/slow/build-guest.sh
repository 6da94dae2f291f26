#!/bin/sh
# Builds the slow-tier test guest (Ubuntu cloud images cannot be downloaded here): a Debian
# bookworm root file system made with debootstrap — kernel, cloud-init, openssh-server — as a
# qcow2 image (our "cloud image") plus the kernel and initrd the domain boots directly.
# debootstrap needs python3-cffi-backend named: its resolver misses the virtual package
# python3-cryptography needs. The guest has no way out of the test's namespace, so what our
# user-data installs (`packages:` qemu-guest-agent, openssh-server) is installed here already;
# cloud-init's install is then a no-op, as it must be for `cloud-init status` to end "done".
# DIR is a cache: the root file system is kept (`rootfs`, rebuilt when the package list
# changes) and the image is rebuilt when this script changes; about 2 GB in all.
# Usage: build-guest.sh [DIR]   (default $PROVISIONER_GUEST_DIR or /var/tmp/provisioner-guest)
set -eu
OUT=${1:-${PROVISIONER_GUEST_DIR:-/var/tmp/provisioner-guest}}
ROOT="$OUT/rootfs"
PACKAGES=linux-image-amd64,python3-cffi-backend,cloud-init,openssh-server,systemd-sysv,ifupdown,isc-dhcp-client,sudo,netbase,iproute2,locales,qemu-guest-agent
mkdir -p "$OUT"
built_by=$(sha256sum "$0" | cut -d' ' -f1)
if [ -f "$OUT/guest.qcow2" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] &&
    [ "$(cat "$OUT/built-by" 2>/dev/null)" = "$built_by" ]; then
    echo "guest already built in $OUT"
    exit 0
fi
rm -f "$OUT/built-by"
if [ "$(cat "$OUT/rootfs.packages" 2>/dev/null)" != "$PACKAGES" ]; then
    rm -rf "$ROOT"
    debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOT" http://deb.debian.org/debian
    echo "$PACKAGES" > "$OUT/rootfs.packages"
fi
# Only the NoCloud seed; no network metadata services to wait for.
printf 'datasource_list: [ NoCloud, None ]\n' > "$ROOT/etc/cloud/cloud.cfg.d/90-provisioner-test.cfg"
printf 'LABEL=root / ext4 defaults 0 1\n' > "$ROOT/etc/fstab"
# cloud-init's locale module sets en_US.UTF-8 (as on Ubuntu's images) and fails, leaving
# `cloud-init status` at "error", when the locale is not generated; Debian's locale-gen only
# generates what /etc/locale.gen names.
printf 'en_US.UTF-8 UTF-8\n' > "$ROOT/etc/locale.gen"
chroot "$ROOT" locale-gen
# The generic kernel: the seed ISO sits on a SATA CD-ROM, which the cloud kernel lacks (no AHCI).
kernel=$(ls "$ROOT"/boot/vmlinuz-*-amd64 | grep -v cloud | tail -n 1)
cp "$kernel" "$OUT/vmlinuz"
cp "$ROOT/boot/initrd.img-${kernel##*/vmlinuz-}" "$OUT/initrd.img"
rm -f "$OUT/root.raw"
mkfs.ext4 -q -F -L root -d "$ROOT" "$OUT/root.raw" 4G
qemu-img convert -O qcow2 "$OUT/root.raw" "$OUT/guest.qcow2"
rm -f "$OUT/root.raw"
echo "$built_by" > "$OUT/built-by"
echo "guest built in $OUT"
