"""The VM spec: what a VM is (desired state), validated. The source of truth from which
the QEMU command line is rebuilt on every start (hvagent.vm.machine)."""

from __future__ import annotations

import random
import re
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Pre-created pcie-root-ports: the slots later hot-adds (disks, NICs) plug into.
DEFAULT_HOTPLUG_PORTS = 8
DEFAULT_MEMORY_SLOTS = 8
# q35's built-in ICH9 AHCI controller has six ports (QEMU buses ide.0 .. ide.5).
AHCI_PORTS = 6


class VMState(StrEnum):
    DEFINED = "defined"  # created, never started
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"  # QEMU died without being asked to


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    VPC = "vpc"  # VHD
    VHDX = "vhdx"


class BootDevice(StrEnum):
    DISK = "disk"
    NETWORK = "network"


def parse_size(value: int | str) -> int:
    """Bytes from 1073741824, "1G", "512M", "10GiB"."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value.strip())
    if not m:
        raise ValueError(f"not a size: {value!r} (examples: 512M, 10G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


class DiskSpec(BaseModel):
    """An existing image (`path`) or a new one (`size`) the agent creates in its storage
    directory. After creation the stored spec always has `path` and `format`."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    size: int | None = Field(default=None, gt=0, description="bytes; for a new disk")
    format: DiskFormat | None = None
    created: bool = Field(default=False, description="the agent created it (and owns it)")
    slot: int | None = Field(default=None, ge=0, description=(
        "hotplug port it sits on (hot-attached, so hot-detachable); None: fixed at boot"))
    bus: Literal["virtio", "sata"] = Field(default="virtio", description=(
        "virtio-blk, or an emulated SATA disk on the AHCI controller for guests without "
        "virtio drivers (fixed at boot: only virtio disks hot-attach)"))

    @field_validator("format", mode="before")
    @classmethod
    def _vhd_alias(cls, v: object) -> object:
        return "vpc" if v == "vhd" else v

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return parse_size(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _path_or_size(self) -> DiskSpec:
        if self.created:  # a disk the agent made records both
            if self.path is None:
                raise ValueError("a created disk needs its path")
        elif (self.path is None) == (self.size is None):
            raise ValueError("give exactly one of path (existing image) or size (new disk)")
        if self.bus == "sata" and self.slot is not None:
            raise ValueError("a sata disk cannot be hot-attached (only virtio disks can)")
        return self


class NicSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    network: Literal["user", "bridge"] = Field(default="user", description=(
        "user: QEMU user-mode networking (NAT, no VLAN); bridge: a tap on the host "
        "bridge of VLAN `vlan` (hvbr<vlan>). Giving `vlan` alone means bridge"))
    vlan: int | None = Field(default=None, ge=1, le=4094, description=(
        "VLAN id (1..4094) of a bridge NIC; NICs on the same VLAN share one L2 segment"))
    model: Literal["virtio-net-pci"] = "virtio-net-pci"
    mac: str = Field(default_factory=lambda: random_mac())
    slot: int | None = Field(default=None, ge=0, description=(
        "hotplug port it sits on (hot-added, so hot-removable); None: fixed at boot"))

    @model_validator(mode="before")
    @classmethod
    def _vlan_means_bridge(cls, v: object) -> object:
        if isinstance(v, dict) and v.get("vlan") is not None and "network" not in v:
            return {**v, "network": "bridge"}
        return v

    @model_validator(mode="after")
    def _vlan_iff_bridge(self) -> NicSpec:
        if self.network == "bridge" and self.vlan is None:
            raise ValueError("a bridge NIC needs a vlan (1..4094)")
        if self.network == "user" and self.vlan is not None:
            raise ValueError("a user-mode NIC has no VLAN (use network: bridge)")
        return self

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if not MAC_RE.match(v):
            raise ValueError(f"not a MAC address: {v!r}")
        return v


class DimmSpec(BaseModel):
    """A hot-added memory module (pc-dimm) in memory slot `slot`."""

    model_config = ConfigDict(extra="forbid")

    slot: int = Field(ge=0)
    size_mib: int = Field(ge=128)


class PendingUnplug(BaseModel):
    """A removal QEMU was asked for that the guest has not completed yet. It completes
    when the guest ejects the device, at the latest on the VM's next power cycle."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["vcpu", "memory", "disk", "nic"]
    device: str  # QEMU device id
    requested_at: float


def random_mac() -> str:
    # 52:54:00 is QEMU's locally administered prefix.
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


class VMSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_RE)
    vcpus: int = Field(default=1, ge=1, le=255)
    max_vcpus: int | None = Field(default=None, ge=1, le=255)
    memory_mib: int = Field(default=512, ge=16)
    max_memory_mib: int | None = Field(default=None, ge=16)
    memory_slots: int | None = Field(default=None, ge=0, le=256)
    firmware: Firmware = Firmware.BIOS
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    boot_order: list[BootDevice] = Field(default_factory=lambda: [BootDevice.DISK])
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    hotplug_ports: int = Field(default=DEFAULT_HOTPLUG_PORTS, ge=0, le=32)
    # Hot-added resources (hvagent.vm.devices). They are plugged again over QMP on every
    # start, before the guest runs, so that a checkpoint's device state always matches.
    hot_vcpus: int = Field(default=0, ge=0, description="of `vcpus`, how many are hot-added")
    dimms: list[DimmSpec] = Field(default_factory=list, description="within `memory_mib`")
    pending_unplugs: list[PendingUnplug] = Field(default_factory=list)

    @property
    def boot_memory_mib(self) -> int:
        return self.memory_mib - sum(d.size_mib for d in self.dimms)

    @model_validator(mode="after")
    def _limits(self) -> VMSpec:
        if self.max_vcpus is None:
            self.max_vcpus = self.vcpus
        if self.vcpus > self.max_vcpus:
            raise ValueError(f"vcpus ({self.vcpus}) is above max_vcpus ({self.max_vcpus})")
        if self.max_memory_mib is None:
            self.max_memory_mib = self.memory_mib
        if self.memory_mib > self.max_memory_mib:
            raise ValueError(
                f"memory_mib ({self.memory_mib}) is above max_memory_mib "
                f"({self.max_memory_mib})"
            )
        if self.memory_slots is None:
            self.memory_slots = DEFAULT_MEMORY_SLOTS if self.max_memory_mib > self.memory_mib else 0
        if self.max_memory_mib > self.memory_mib and self.memory_slots == 0:
            raise ValueError("max_memory_mib above memory_mib needs memory_slots >= 1")
        if (self.initrd or self.append) and not self.kernel:
            raise ValueError("initrd and append need kernel")
        if self.hot_vcpus >= self.vcpus:
            raise ValueError(f"hot_vcpus ({self.hot_vcpus}) must be below vcpus ({self.vcpus})")
        if self.boot_memory_mib < 16:
            raise ValueError("dimms add up to more than memory_mib")
        dimm_slots = [d.slot for d in self.dimms]
        if len(set(dimm_slots)) != len(dimm_slots) or any(
                s >= self.memory_slots for s in dimm_slots):
            raise ValueError("dimms: slots must be distinct and below memory_slots")
        ports = [d.slot for d in self.disks if d.slot is not None] + [
            n.slot for n in self.nics if n.slot is not None]
        if len(set(ports)) != len(ports) or any(p >= self.hotplug_ports for p in ports):
            raise ValueError("disk/NIC slots must be distinct and below hotplug_ports")
        if sum(d.bus == "sata" for d in self.disks) > AHCI_PORTS:
            raise ValueError(f"disks: at most {AHCI_PORTS} sata disks (AHCI ports)")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise ValueError("two NICs have the same MAC address")
        return self
