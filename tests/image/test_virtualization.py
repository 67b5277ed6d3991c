"""The host can run guests under KVM: CPU flag, modules with nesting, /dev/kvm, QEMU."""

from __future__ import annotations

import pytest
from testinfra.host import Host

# KVM_CREATE_VM = _IO(KVMIO=0xAE, 0x01); returns the new VM's file descriptor.
CREATE_VM = (
    "import fcntl, os; "
    "kvm = os.open('/dev/kvm', os.O_RDWR | os.O_CLOEXEC); "
    "print(fcntl.ioctl(kvm, 0xAE01, 0))"
)


def cpu_flags(host: Host) -> list[set[str]]:
    """The flags of every CPU in /proc/cpuinfo."""
    return [
        set(line.split(":", 1)[1].split())
        for line in host.file("/proc/cpuinfo").content_string.splitlines()
        if line.startswith("flags")
    ]


def cpu_vendor_module(host: Host) -> str:
    flags = cpu_flags(host)[0]
    if "svm" in flags:
        return "kvm_amd"
    if "vmx" in flags:
        return "kvm_intel"
    pytest.fail("neither svm nor vmx in /proc/cpuinfo: the CPU exposes no virtualization")


@pytest.mark.smoke
def test_cpu_exposes_svm_or_vmx(host: Host) -> None:
    flags = cpu_flags(host)
    assert flags, "no flags line in /proc/cpuinfo"
    assert all("svm" in f or "vmx" in f for f in flags)


@pytest.mark.smoke
def test_kvm_modules_loaded_with_nesting(host: Host) -> None:
    vendor = cpu_vendor_module(host)
    modules = host.file("/proc/modules").content_string.split("\n")
    loaded = {line.split(" ", 1)[0] for line in modules if line}
    assert {"kvm", vendor, "vhost_net"} <= loaded
    nested = host.file(f"/sys/module/{vendor}/parameters/nested").content_string.strip()
    assert nested in ("1", "Y")


@pytest.mark.smoke
def test_dev_kvm_creates_a_vm(host: Host) -> None:
    assert host.run("test -c /dev/kvm").rc == 0, "/dev/kvm is not a character device"
    out = host.check_output(f'python3 -c "{CREATE_VM}"')
    assert int(out) >= 0


@pytest.mark.parametrize("tool", ["qemu-system-x86_64", "qemu-img", "qemu-storage-daemon"])
def test_qemu_tools_run(host: Host, tool: str) -> None:
    out = host.check_output(f"{tool} --version")
    assert "version" in out.lower()


# Asks the agent on its unix socket (root is its administrator there) for /api/v1/agent.
AGENT_INFO = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "s.sendall(b'GET /api/v1/agent HTTP/1.0\\r\\nHost: agent\\r\\n\\r\\n'); "
    "data = b''.join(iter(lambda: s.recv(65536), b'')); "
    "print(data.split(b'\\r\\n\\r\\n', 1)[1].decode())"
)


def test_booted_with_the_accelerator_corehost_chose(host: Host) -> None:
    """`corehost test` says which accelerator it booted with; the guest's CPU agrees:
    TCG runs QEMU's own CPU model (qemu64), KVM the host's (-cpu host)."""
    import os

    accel = os.environ.get("COREHOST_ACCEL")
    assert accel in ("kvm", "tcg"), "run through `corehost test`, which sets COREHOST_ACCEL"
    models = {line.split(":", 1)[1].strip()
              for line in host.file("/proc/cpuinfo").content_string.splitlines()
              if line.startswith("model name")}
    assert models
    emulated = all("QEMU Virtual CPU" in m for m in models)
    assert emulated == (accel == "tcg"), (accel, os.environ.get("COREHOST_ACCEL_REASON"), models)


def test_agent_reports_its_accelerator_choice(host: Host) -> None:
    import json

    import yaml

    cfg = yaml.safe_load(host.file("/etc/hvagent/hvagent.yaml").content_string)
    # The agent's socket appears once it serves (its KVM probe runs meanwhile, and GET
    # /agent waits for the verdict): wait for it, bounded.
    waited = host.run("timeout 180 sh -c 'until test -S \"$1\"; do sleep 1; done' - %s",
                      cfg["listen"])
    assert waited.rc == 0, f"{cfg['listen']}: the agent's socket never appeared"
    info = json.loads(host.check_output("python3 -c %s %s", AGENT_INFO, cfg["listen"]))
    assert info.get("accel") in ("kvm", "tcg"), info
    if cfg["accel"] == "auto":
        # the probe decided, and says how
        assert info["accel_reason"].startswith(("probe guest", "/dev/kvm", "no probe kernel",
                                                "QEMU exited during the KVM probe"))
    else:
        assert info["accel"] == cfg["accel"]
    if info["accel"] == "kvm":
        assert host.run("test -c /dev/kvm").rc == 0


# Modules of the allow-list (elements/server-core/kernel-modules.allow) that the host's
# own checks, its guests and its deployment load: KVM and the vhost backends; bridges,
# VLANs and netfilter for guest networks; the diskless boot (squashfs, overlay, loop);
# USB/UEFI deployment (vfat and its code pages, usb-storage, uas, xhci); the host as a
# guest (virtio); storage controllers and server NICs; FUSE disk exports; VFIO. Names
# as in /sys/module (kmod spells them with _ there). The vendor module is added per CPU.
KEPT_MODULES = (
    "kvm", "vhost_net", "vhost_vsock", "vhost_scsi", "tun", "bridge", "8021q",
    "br_netfilter", "nf_tables", "nf_conntrack", "nft_chain_nat", "sch_htb", "vxlan",
    "macvtap", "squashfs", "overlay", "loop", "vfat", "nls_cp437", "nls_iso8859_1",
    "nls_utf8", "ext4", "xfs", "isofs", "fuse", "usb_storage", "uas", "xhci_pci",
    "ehci_pci", "usbhid", "virtio_net", "virtio_blk", "virtio_scsi", "virtio_pci",
    "nvme", "ahci", "sd_mod", "sr_mod", "dm_mod", "raid1", "megaraid_sas", "mpt3sas",
    "e1000e", "igb", "ixgbe", "i40e", "bnxt_en", "mlx5_core", "r8169", "vfio_pci",
    "ipmi_devintf",
)


def builtin_modules(host: Host) -> set[str]:
    """Names of the modules compiled into the running kernel (modules.builtin)."""
    text = host.check_output("cat /lib/modules/$(uname -r)/modules.builtin")
    return {line.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")
            for line in text.splitlines() if line}


def loaded_modules(host: Host) -> set[str]:
    return {line.split(" ", 1)[0] for line in
            host.file("/proc/modules").content_string.splitlines() if line}


def test_every_kept_module_loads(host: Host) -> None:
    """The pruning kept each module with everything it depends on: modprobe loads it
    (a missing dependency fails here, naming the module) and the kernel lists it."""
    wanted = (cpu_vendor_module(host), *KEPT_MODULES)
    builtin = builtin_modules(host)
    before = loaded_modules(host)
    failed = []
    try:
        for name in wanted:
            if name in builtin:
                continue  # nothing to load; the kernel has it
            r = host.run("modprobe %s", name)
            if r.rc != 0 or r.stderr.strip():
                failed.append(f"{name}: modprobe rc={r.rc}: {r.stderr.strip()}")
            elif not host.file(f"/sys/module/{name}").is_directory:
                failed.append(f"{name}: modprobe succeeded but /sys/module/{name} is missing")
    finally:
        # Unload exactly what this test loaded, dependencies included (br_netfilter would
        # otherwise filter the guests' bridged traffic in later checks). rmmod refuses a
        # module in use, so a few passes take dependents before what they depend on;
        # unlike `modprobe -r` it never takes a module that was loaded before.
        extra = " ".join(sorted(loaded_modules(host) - before))
        if extra:
            host.run(f"for pass in 1 2 3 4 5 6; do for m in {extra}; do "
                     "rmmod $m 2>/dev/null; done; done; true")
    assert failed == []


# Families the allow-list prunes: sound, radios, desktop GPUs, cameras/TV, staging,
# InfiniBand adapters, industrial sensors, cluster file systems. Paths below kernel/.
PRUNED_FAMILIES = (
    "sound", "drivers/bluetooth", "net/bluetooth", "drivers/net/wireless", "net/mac80211",
    "net/wireless", "drivers/gpu/drm/amd", "drivers/gpu/drm/i915", "drivers/gpu/drm/nouveau",
    "drivers/gpu/drm/radeon", "drivers/media/usb", "drivers/media/pci", "drivers/staging",
    "drivers/infiniband/hw", "drivers/iio/accel", "drivers/nfc", "drivers/isdn",
    "drivers/usb/gadget", "fs/ocfs2", "fs/gfs2", "fs/reiserfs",
)
# Size guard, measured on Debian 12's 6.1.0-57-amd64: 4023 modules in the package,
# 2259 with the former deny-list, 1670 with the allow-list. A kernel update may add a
# few; a bound far above 1670 means the allow-list is no longer applied.
MAX_MODULES = 1900


def test_pruned_module_families_are_gone(host: Host) -> None:
    kernel = "/lib/modules/$(uname -r)/kernel"
    present = [f for f in PRUNED_FAMILIES if host.run(f"test -e {kernel}/{f}").rc == 0]
    assert present == [], f"pruned families present under {kernel}: {present}"
    count = int(host.check_output(f"find {kernel} -name '*.ko*' | wc -l"))
    assert 0 < count <= MAX_MODULES, f"{count} kernel modules (allow-list: ~1670)"


def test_kernel_updates_are_pruned_the_same_way(host: Host) -> None:
    """The allow-list stays in dpkg's configuration, so a kernel installed later on the
    host (apt upgrade) is pruned like the image's own."""
    rules = host.file("/etc/dpkg/dpkg.cfg.d/50-corehost-kernel-modules")
    assert rules.is_file, "no kernel module rules for dpkg in /etc/dpkg/dpkg.cfg.d"
    lines = [line for line in rules.content_string.splitlines() if line.startswith("path-")]
    assert lines[0] == "path-exclude=/lib/modules/*/kernel/*"
    assert "path-include=/lib/modules/*/kernel/arch/x86/kvm" in lines


def test_no_firmware_files(host: Host) -> None:
    """No package of the image brings firmware (the kernel package has none; firmware
    packages are only recommended, and recommends are never installed)."""
    count = host.check_output("find /lib/firmware /usr/lib/firmware -type f 2>/dev/null | wc -l")
    assert count == "0"
