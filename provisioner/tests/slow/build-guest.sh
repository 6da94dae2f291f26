#!/bin/sh
# Builds the slow-tier test guest (debootstrap needs python3-cffi-backend named: its resolver
# misses the virtual package python3-cryptography needs) (Ubuntu cloud images cannot be downloaded here): a Debian
# bookworm root file system made with debootstrap — kernel, cloud-init, openssh-server — as
# a qcow2 image (our "cloud image") plus the kernel and initrd the domain boots directly.
# Usage: build-guest.sh [DIR]   (default $PROVISIONER_GUEST_DIR or /var/tmp/provisioner-guest)
set -eu
OUT=${1:-${PROVISIONER_GUEST_DIR:-/var/tmp/provisioner-guest}}
ROOT="$OUT/rootfs"
mkdir -p "$OUT"
if [ -f "$OUT/guest.qcow2" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ]; then
    echo "guest already built in $OUT"
    exit 0
fi
if [ ! -x "$ROOT/usr/bin/cloud-init" ]; then
    debootstrap --variant=minbase \
        --include=linux-image-amd64,python3-cffi-backend,cloud-init,openssh-server,systemd-sysv,ifupdown,isc-dhcp-client,sudo,netbase,iproute2 \
        bookworm "$ROOT" http://deb.debian.org/debian
fi
# Only the NoCloud seed; no network metadata services to wait for.
printf 'datasource_list: [ NoCloud, None ]\n' > "$ROOT/etc/cloud/cloud.cfg.d/90-provisioner-test.cfg"
printf 'LABEL=root / ext4 defaults 0 1\n' > "$ROOT/etc/fstab"
# The generic kernel: the seed ISO sits on a SATA CD-ROM, which the cloud kernel lacks (no AHCI).
kernel=$(ls "$ROOT"/boot/vmlinuz-*-amd64 | grep -v cloud | tail -n 1)
cp "$kernel" "$OUT/vmlinuz"
cp "$ROOT/boot/initrd.img-${kernel##*/vmlinuz-}" "$OUT/initrd.img"
mkfs.ext4 -q -F -L root -d "$ROOT" "$OUT/root.raw" 4G
qemu-img convert -O qcow2 "$OUT/root.raw" "$OUT/guest.qcow2"
rm -f "$OUT/root.raw"
echo "guest built in $OUT"
