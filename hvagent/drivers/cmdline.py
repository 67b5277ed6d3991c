"""The QEMU side of a VMSpec: the command line QEMU starts with, the ids of the QEMU
objects (block nodes, devices, netdevs, memory backends, hotplug ports) derived from the
spec, and where one VM's runtime files live.

Ids come from the spec alone, so every start of the same spec names its devices the
same way: a checkpoint's saved device state only loads into a QEMU with the same ids.
Cold devices (on the command line) are `disk{i}` / `nic{i}` / `net{i}`; hot-added ones
are named by their hotplug port (`hpdisk{slot}`, `hpnic{slot}`, `hpnet{slot}`) or
memory slot (`dimm{slot}`, `mem-dimm{slot}`), and plugged over QMP (hvagent.drivers.machine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvagent.drivers.net import tap_name
from hvagent.host.kvm import QEMU
from hvagent.spec import (
    BootDevice,
    DimmSpec,
    DiskFormat,
    DiskSpec,
    Firmware,
    MediaSlot,
    MediaSpec,
    PendingUnplug,
    VMSpec,
)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Secure Boot: the SMM-protected build, and a variable store with Microsoft's keys enrolled
# (Debian's shim and the guests that boot on PCs boot under it).
OVMF_CODE_SECURE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_SECURE = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")


def ovmf_vars_template(spec: VMSpec) -> Path:
    """The variable store a UEFI VM starts from."""
    return OVMF_VARS_SECURE if spec.secure_boot else OVMF_VARS
# CPU features that give a guest hardware virtualization (AMD, Intel).
NESTED_FEATURES = ("svm", "vmx")


@dataclass(frozen=True)
class VMFiles:
    """Where one VM's runtime and state files live."""

    qmp: Path
    pidfile: Path
    serial_log: Path
    state_dir: Path  # per-VM persistent files (UEFI variables)

    @property
    def efivars(self) -> Path:
        return self.state_dir / "OVMF_VARS.fd"

    @property
    def qmp_arg(self) -> str:
        """The -qmp argument; also how a running QEMU is recognised as this VM's."""
        return f"unix:{self.qmp},server=on,wait=off"

    @classmethod
    def for_vm(cls, name: str, run_dir: Path, log_dir: Path, state_dir: Path) -> VMFiles:
        return cls(
            qmp=run_dir / f"{name}.qmp",
            pidfile=run_dir / f"{name}.pid",
            serial_log=log_dir / f"{name}.serial.log",
            state_dir=state_dir / "vms" / name,
        )


# QEMU ids of devices, derived from the spec


def disk_node(spec: VMSpec, i: int) -> str:
    """Block node name (and device id) of disk `i`."""
    slot = spec.disks[i].slot
    return f"hpdisk{slot}" if slot is not None else f"disk{i}"


def nic_ids(spec: VMSpec, i: int) -> tuple[str, str]:
    """(device id, netdev id) of NIC `i`."""
    slot = spec.nics[i].slot
    return (f"hpnic{slot}", f"hpnet{slot}") if slot is not None else (f"nic{i}", f"net{i}")


def netdev_of(device: str) -> str:
    """The netdev id of a hot-added NIC's device id."""
    return device.replace("hpnic", "hpnet")


def dimm_ids(d: DimmSpec) -> tuple[str, str]:
    """(device id, memory backend id) of a DIMM."""
    return f"dimm{d.slot}", f"mem-dimm{d.slot}"


def memory_backend_of(device: str) -> str:
    """The memory backend id of a DIMM's device id."""
    return "mem-" + device


def media_ids(slot: MediaSlot) -> tuple[str, str]:
    """(device id, block node) of a removable-media drive."""
    return f"{slot}0", f"media-{slot}"


def media_blockdev(node: str, media: MediaSpec) -> dict[str, Any]:
    """The block node of an inserted medium: a raw image (ISO 9660 or a stick image)."""
    assert media.image is not None
    return {"driver": "raw", "node-name": node, "read-only": media.write_protected,
            "file": {"driver": "file", "filename": media.image,
                     "read-only": media.write_protected}}


def boot_indexes(spec: VMSpec, order: list[BootDevice]) -> dict[str, int]:
    """Device id -> bootindex of the devices fixed at boot, for `order`: every disk (in
    spec order), every NIC, the CD or the USB stick, by kind in that order. Devices
    of a kind `order` does not name get none."""
    ids: dict[BootDevice, list[str]] = {
        BootDevice.DISK: [disk_node(spec, i) for i, d in enumerate(spec.disks)
                          if d.slot is None],
        BootDevice.NETWORK: [nic_ids(spec, i)[0] for i, n in enumerate(spec.nics)
                             if n.slot is None],
        BootDevice.CD: [media_ids(MediaSlot.CD)[0]] if spec.media_in(MediaSlot.CD) else [],
        BootDevice.USB: ([media_ids(MediaSlot.USB)[0]]
                         if (m := spec.media_in(MediaSlot.USB)) and m.image else []),
    }
    out: dict[str, int] = {}
    for kind in dict.fromkeys(order):
        for dev in ids[kind]:
            out[dev] = len(out) + 1
    return out


def bootable_devices(spec: VMSpec) -> list[str]:
    """Every device id boot_indexes can number (what a new order is set on, live)."""
    return list(boot_indexes(spec, list(BootDevice)))


def hotplug_port(slot: int) -> str:
    """Id of the pcie-root-port that hotplug port `slot` is."""
    return f"hp{slot}"


def blockdev(node: str, disk: DiskSpec) -> dict[str, Any]:
    """One definition of a disk's block node, for -blockdev (as JSON) and blockdev-add."""
    assert disk.path is not None and disk.format is not None
    out: dict[str, Any] = {"driver": str(disk.format), "node-name": node,
                           "cache": {"direct": False},
                           "file": {"driver": "file", "filename": disk.path}}
    if disk.created and disk.format is DiskFormat.QCOW2:
        # The agent made the image (qcow2 v3, which has them). Without lazy refcounts
        # every cluster a checkpoint's memory state copies on write (after a revert
        # the state area is shared with the loaded checkpoint) waits for an fdatasync
        # of the refcount block: ~2000 of them for a 512 MiB guest. QEMU and qemu-img
        # rebuild the refcounts when they open an image a crash left dirty.
        out["lazy-refcounts"] = True
    return out


def tap_netdev(netdev: str, mac: str) -> dict[str, Any]:
    """A bridge NIC's backend: the tap the agent made and put on its VLAN's bridge."""
    return {"type": "tap", "id": netdev, "ifname": tap_name(mac), "script": "no",
            "downscript": "no"}


# unplug bookkeeping: which part of the spec a QEMU device id is


def without(spec: VMSpec, p: PendingUnplug) -> VMSpec:
    """`spec` after the removal `p` completed."""
    upd: dict[str, Any] = {"pending_unplugs": [x for x in spec.pending_unplugs
                                               if x.device != p.device]}
    if p.kind == "vcpu":
        upd |= {"vcpus": spec.vcpus - 1, "hot_vcpus": spec.hot_vcpus - 1}
    elif p.kind == "memory":
        gone = [d for d in spec.dimms if dimm_ids(d)[0] == p.device]
        upd |= {"dimms": [d for d in spec.dimms if d not in gone],
                "memory_mib": spec.memory_mib - sum(d.size_mib for d in gone)}
    elif p.kind == "disk":
        upd["disks"] = [d for i, d in enumerate(spec.disks) if disk_node(spec, i) != p.device]
    else:
        upd["nics"] = [n for i, n in enumerate(spec.nics) if nic_ids(spec, i)[0] != p.device]
    return VMSpec.model_validate(spec.model_copy(update=upd).model_dump())


def settle_pending(spec: VMSpec) -> VMSpec:
    """The spec for a fresh start: unplugs still pending are complete (the devices are
    simply not plugged again)."""
    for p in list(spec.pending_unplugs):
        spec = without(spec, p)
    return spec


# the command line


def cpu_args(accel_args: list[str], nested: bool) -> list[str]:
    """The accelerator's arguments, with hardware virtualization hidden from the guest's
    CPU unless `nested` (the host policy's nested_virtualization)."""
    out = list(accel_args)
    if nested:
        return out
    for i, a in enumerate(out[:-1]):
        if a == "-cpu":
            feats = [f for f in out[i + 1].split(",")
                     if f not in {f"+{x}" for x in NESTED_FEATURES}]
            out[i + 1] = ",".join([*feats, *(f"-{x}" for x in NESTED_FEATURES)])
    return out


def build_command(spec: VMSpec, files: VMFiles, accel_args: list[str],
                  nested: bool = True) -> list[str]:
    """The full QEMU command line for `spec`; rebuilt on every start."""
    assert spec.max_vcpus is not None and spec.max_memory_mib is not None
    cmd = [
        QEMU, "-name", f"{spec.name},debug-threads=on",
        "-machine", "q35,smm=on" if spec.secure_boot else "q35", "-nodefaults",
        "-no-user-config", "-display", "none",
        *cpu_args(accel_args, nested),
        # Hot-added vCPUs and DIMMs are not on the command line: Machine.replay plugs
        # them again (like slotted disks and NICs) while QEMU waits (-S).
        "-smp", f"{spec.vcpus - spec.hot_vcpus},maxcpus={spec.max_vcpus}",
    ]
    if spec.memory_slots:
        cmd += ["-m", f"{spec.boot_memory_mib}M,slots={spec.memory_slots},"
                      f"maxmem={spec.max_memory_mib}M"]
    else:
        cmd += ["-m", f"{spec.memory_mib}M"]
    cmd += [
        "-qmp", files.qmp_arg,
        "-pidfile", str(files.pidfile),
        "-serial", f"file:{files.serial_log}",
        "-daemonize", "-no-shutdown",
        # A guest kernel panic reaches QEMU (status guest-panicked, the guest kept
        # paused by -no-shutdown), so the agent reports a crash instead of a VM that
        # looks running.
        "-device", "pvpanic",
    ]
    for i in range(spec.hotplug_ports):
        cmd += ["-device", f"pcie-root-port,id={hotplug_port(i)},chassis={i + 1},bus=pcie.0"]
    if spec.firmware is Firmware.UEFI:
        code = OVMF_CODE_SECURE if spec.secure_boot else OVMF_CODE
        cmd += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={files.efivars}",
        ]
        if spec.secure_boot:
            # Only SMM code may write the variable store: a guest cannot enroll keys.
            cmd += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    # bootindex follows the boot order (an enabled override's target first).
    index = boot_indexes(spec, spec.effective_boot_order())
    ahci_port = 0
    for i, d in enumerate(spec.disks):
        assert d.path is not None and d.format is not None
        if d.slot is not None:
            continue  # hot-attached: plugged over QMP
        node = disk_node(spec, i)
        if d.bus == "sata":
            # q35's built-in AHCI controller: one disk per port, ports in spec order.
            dev = f"ide-hd,drive={node},id={node},bus=ide.{ahci_port}"
            ahci_port += 1
        else:
            dev = f"virtio-blk-pci,drive={node},id={node}"
        if node in index:
            dev += f",bootindex={index[node]}"
        # JSON syntax: no comma escaping of paths needed.
        cmd += ["-blockdev", json.dumps(blockdev(node, d)), "-device", dev]
    for i, n in enumerate(spec.nics):
        if n.slot is not None:
            continue  # hot-added: plugged over QMP
        dev_id, netdev_id = nic_ids(spec, i)
        dev = f"{n.model},netdev={netdev_id},id={dev_id},mac={n.mac}"
        if dev_id in index:
            dev += f",bootindex={index[dev_id]}"
        elif BootDevice.NETWORK not in (*spec.boot_order, spec.boot_override.target):
            dev += ",romfile="  # no PXE option ROM when the NIC never boots
        if n.tapped:
            # The agent made the tap and put it on its bridge (hvagent.drivers.net).
            netdev = (f"tap,id={netdev_id},ifname={tap_name(n.mac)},script=no,"
                      "downscript=no")
        else:
            netdev = f"user,id={netdev_id}"
        cmd += ["-netdev", netdev, "-device", dev]
    cd = spec.media_in(MediaSlot.CD)
    if cd is not None:
        # On the AHCI controller after the sata disks; an empty drive has no medium.
        dev_id, node = media_ids(MediaSlot.CD)
        dev = f"ide-cd,id={dev_id},bus=ide.{ahci_port}"
        if cd.image is not None:
            cmd += ["-blockdev", json.dumps(media_blockdev(node, cd))]
            dev += f",drive={node}"
        if dev_id in index:
            dev += f",bootindex={index[dev_id]}"
        cmd += ["-device", dev]
    usb = spec.media_in(MediaSlot.USB)
    if usb is not None and usb.image is not None:
        # A stick exists only with a medium in it (usb-storage needs a drive).
        dev_id, node = media_ids(MediaSlot.USB)
        dev = f"usb-storage,id={dev_id},drive={node},removable=on,bus=usbhost.0"
        if dev_id in index:
            dev += f",bootindex={index[dev_id]}"
        cmd += ["-device", "qemu-xhci,id=usbhost",
                "-blockdev", json.dumps(media_blockdev(node, usb)), "-device", dev]
    if spec.kernel:
        cmd += ["-kernel", spec.kernel]
    if spec.initrd:
        cmd += ["-initrd", spec.initrd]
    if spec.append:
        cmd += ["-append", spec.append]
    return cmd
