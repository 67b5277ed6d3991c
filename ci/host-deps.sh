#!/usr/bin/env bash
# Installs the Debian packages that building images and running the tests need.
# Idempotent: only missing packages are installed.
set -eu -o pipefail

PKGS=(
  # image building (diskimage-builder's host tools)
  debootstrap qemu-utils kpartx squashfs-tools dosfstools gdisk parted e2fsprogs
  util-linux sudo kmod procps fdisk
  # booting images and child VMs
  qemu-system-x86 ovmf openssh-client
  # the hybrid (BIOS + UEFI) disk and the PXE bundle: GRUB for EFI, iPXE loaders, cpio
  grub-efi-amd64-bin ipxe
  # offline disk tooling
  mtools e2tools fuse3 qemu-block-extra zstd
  # tiny test guests and network tests (the agent's nat/isolated networks: dnsmasq, nft)
  busybox-static cpio iproute2 socat dnsmasq-base nftables
  # the metrics test scrapes the agent with a real Prometheus server
  prometheus
  # the Redfish virtual-media test's bootable ISO
  xorriso isolinux syslinux-common
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# A stock Debian kernel (with its modules) for the KVM probe and for tiny test guests.
# Unpacked, never installed: this machine may not boot Debian kernels itself.
KDIR=/var/cache/corehost/kernel
if ! ls "$KDIR"/boot/vmlinuz-* >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  (cd "$tmp" && apt-get download -q "$kpkg")
  mkdir -p "$KDIR.new"
  dpkg-deb -x "$tmp"/*.deb "$KDIR.new"
  rm -rf "$tmp" "$KDIR"
  mv "$KDIR.new" "$KDIR"
fi
