# The network is configured by systemd-networkd (static/etc/systemd/network); the
# ifupdown file debootstrap would write names eth0/eth1 and is never read here.
export DIB_APT_MINIMAL_CREATE_INTERFACES=0

# Reuse the debootstrap tarball between builds (DIB_IMAGE_CACHE); the base is
# dist-upgraded right after unpacking, so a cached base never ships stale packages.
export DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE=${DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE:-1}
export DIB_DEBOOTSTRAP_CACHE=${DIB_DEBOOTSTRAP_CACHE:-1}

# A headless host boots unattended: one second at the GRUB menu, not DIB's five.
export DIB_GRUB_TIMEOUT=${DIB_GRUB_TIMEOUT:-1}

# DIB's `base` element installs an iSCSI initiator (open-iscsi, its iscsid.socket) into
# every image; a KVM host's disks are local or given by a profile that asks for iSCSI.
export DIB_SKIP_BASE_PACKAGE_INSTALL=1
