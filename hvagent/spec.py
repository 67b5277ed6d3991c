"""The VM spec: what a VM is (desired state), validated. The source of truth from which
the QEMU command line is rebuilt on every start (hvagent.drivers.machine)."""

from __future__ import annotations

import random
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Stated in hvagent.host.formats (hvdisk and the builder share them, without pydantic).
from hvagent.host.formats import DiskFormat, parse_size

# VM names become file names (disks, logs, the QMP socket under run_dir) and appear in
# QEMU's command line: ASCII letters, digits and `_.-`, starting with a letter or digit,
# at most 63 characters (a DNS label, so a name can also be a host name). Non-ASCII
# names are refused: they would be file names whose byte length (sun_path!) differs from
# their length in characters. The agent may refuse a long name at create when its
# run_dir is long (hvagent.services.limits: the QMP socket path must fit sun_path).
NAME_MAX = 63
NAME_RE = rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX - 1}}}$"
NAME_RULE = (f"1 to {NAME_MAX} characters of A-Z a-z 0-9 _ . - (ASCII), starting with a "
             "letter or digit")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
# Pre-created pcie-root-ports: the slots later hot-adds (disks, NICs) plug into.
DEFAULT_HOTPLUG_PORTS = 8
DEFAULT_MEMORY_SLOTS = 8
# q35's built-in ICH9 AHCI controller has six ports (QEMU buses ide.0 .. ide.5).
AHCI_PORTS = 6
# 802.1Q VLAN ids a bridge NIC, a network or a policy may name (0 and 4095 are reserved).
VLAN_MIN, VLAN_MAX = 1, 4094
VLAN_RULE = f"{VLAN_MIN}..{VLAN_MAX}"
# Defaults a request may override: seconds a guest gets to shut down before it is forced
# off, and to release a hot-removed device before the removal is reported pending.
DEFAULT_STOP_TIMEOUT = 60.0
DEFAULT_UNPLUG_TIMEOUT = 10.0

# QEMU's own maxima for the machine the agent builds (q35, QEMU 7.2), independent of
# the host (the host's limits are hvagent.services.limits):
# - vCPUs: q35 accepts 288, but above 255 APIC ids need x2APIC with interrupt
#   remapping (an intel-iommu), which the agent does not configure: 255.
# - memory: the default CPU models have 40 physical address bits (1 TiB of guest
#   physical space), which must hold RAM, the 32-bit PCI hole and the hotplug region
#   (maxmem - RAM, plus 1 GiB alignment per memory slot): 512 GiB of RAM/maxmem fits
#   with all 256 slots.
# - memory slots: 256 (ACPI_MAX_RAM_SLOTS; QEMU: "unsupported amount of memory slots").
MAX_VCPUS = 255
MAX_MEMORY_MIB = 512 * 1024
MIN_MEMORY_MIB = 16
MAX_MEMORY_SLOTS = 256
MAX_HOTPLUG_PORTS = 32
# Largest virtual disk per format (qemu-img create refuses more): qcow2 with its default
# 64 KiB clusters 2 PiB (QCOW_MAX_L1_SIZE); VHD 2040 GiB (VHD_MAX_SECTORS); VHDX 64 TiB;
# raw is a plain file, bounded by the file system: ext4's 16 TiB - 4 KiB.
MAX_DISK_BYTES = {"qcow2": 1 << 51, "vpc": 2040 << 30, "vhdx": 64 << 40,
                  "raw": (16 << 40) - 4096}
MAX_ANY_DISK_BYTES = max(MAX_DISK_BYTES.values())

# Host paths in requests (disk images, kernel, initrd): non-empty, no NUL or other
# control character, each component at most NAME_MAX_BYTES bytes in UTF-8 and the
# whole at most PATH_MAX_CHARS characters (4 bytes each stays below Linux's PATH_MAX).
PATH_MAX_CHARS = 1000
NAME_MAX_BYTES = 255
# Each component at most 255 characters: the schema's measure; the validator also
# counts its UTF-8 bytes (BYTE_LENGTH), which no JSON schema can state.
PATH_PATTERN = r"^(?:/|[^/\x00-\x1f\x7f]{1,255})+$"
APPEND_MAX_CHARS = 2048  # the x86 kernel's COMMAND_LINE_SIZE
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"


# The error type of a rule across fields, which a JSON schema cannot state: the models'
# descriptions state them; the API answers them 422 like every schema violation.
CROSS_FIELD = "cross_field"
# The error type of a length in bytes (the schema counts characters).
BYTE_LENGTH = "byte_length"


def cross_field(message: str) -> PydanticCustomError:
    return PydanticCustomError(CROSS_FIELD, message.replace("{", "(").replace("}", ")"))


def check_path(v: str) -> str:
    if not v:
        raise ValueError("must not be empty")
    bad = next((c for c in v if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"contains the control character {bad!r}; paths have none")
    try:
        raw = v.encode()
    except UnicodeEncodeError as e:
        raise ValueError("is not valid Unicode (lone surrogate)") from e
    if any(len(part) > NAME_MAX_BYTES for part in raw.split(b"/")):
        raise PydanticCustomError(
            BYTE_LENGTH, f"has a component longer than {NAME_MAX_BYTES} bytes (UTF-8)")
    return v


HostPath = Annotated[str, Field(
    min_length=1, max_length=PATH_MAX_CHARS,
    json_schema_extra={"pattern": PATH_PATTERN},
    description=(f"a host path: no control characters, at most {PATH_MAX_CHARS} "
                 f"characters, each component at most {NAME_MAX_BYTES} bytes in UTF-8 "
                 "(else 422)")), AfterValidator(check_path)]


def check_name(v: str) -> str:
    if not re.fullmatch(NAME_RE.removesuffix("$"), v):
        shown = repr(v) if len(v) <= 80 else repr(v[:77]) + "..."
        raise ValueError(f"{shown} is not a valid name: {NAME_RULE}")
    return v


# The pattern is in the schema; the validator gives the one clear message.
Name = Annotated[str, Field(
    json_schema_extra={"pattern": NAME_RE, "minLength": 1, "maxLength": NAME_MAX},
    description=NAME_RULE), AfterValidator(check_name)]


class VMState(StrEnum):
    DEFINED = "defined"  # created, never started
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"  # QEMU died without being asked to
    UNRESPONSIVE = "unresponsive"  # QEMU runs but its QMP monitor does not answer


# The states in which QEMU runs (so: no start, no delete, no offline disk edit); of these,
# only the ANSWERING ones take QMP commands. An unresponsive VM can still be stopped.
ANSWERING_STATES = frozenset({VMState.RUNNING, VMState.PAUSED})
ACTIVE_STATES = frozenset({*ANSWERING_STATES, VMState.UNRESPONSIVE})


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class BootDevice(StrEnum):
    DISK = "disk"
    NETWORK = "network"
    CD = "cd"  # the virtual CD drive (media slot `cd`)
    USB = "usb"  # the virtual USB stick (media slot `usb`)


class MediaSlot(StrEnum):
    """The VM's removable-media drives (Redfish VirtualMedia Cd and UsbStick)."""

    CD = "cd"
    USB = "usb"


class BootEnabled(StrEnum):
    """How a boot override applies (Redfish BootSourceOverrideEnabled)."""

    DISABLED = "disabled"
    ONCE = "once"  # the next boot only; then back to disabled
    CONTINUOUS = "continuous"


class MediaSpec(BaseModel):
    """A removable-media drive and what is in it. `image` is a file in the storage
    directory (a URL the agent downloaded is kept there under media/); None: empty."""

    model_config = ConfigDict(extra="forbid")

    slot: MediaSlot
    image: HostPath | None = None
    source: str | None = Field(default=None, max_length=PATH_MAX_CHARS, description=(
        "where the image came from (the URL or path the client gave)"))
    write_protected: bool = True


class BootOverride(BaseModel):
    """Boot from `target` first, before `boot_order`: at the next boot only (once) or
    until disabled (continuous)."""

    model_config = ConfigDict(extra="forbid")

    target: BootDevice = BootDevice.DISK
    enabled: BootEnabled = BootEnabled.DISABLED
    uefi_http: bool = Field(default=False, description=(
        "a network target boots by UEFI HTTP boot rather than PXE (UEFI VMs)"))
    http_boot_uri: str | None = Field(default=None, max_length=PATH_MAX_CHARS,
                                      json_schema_extra={"pattern": TEXT_PATTERN})


class DiskSpec(BaseModel):
    """An existing image (`path`) or a new one (`size`) the agent creates in its storage
    directory. After creation the stored spec always has `path` and `format`."""

    model_config = ConfigDict(extra="forbid")

    path: HostPath | None = None
    size: int | None = Field(default=None, gt=0, le=MAX_ANY_DISK_BYTES, description=(
        "bytes (or a string: 512M, 10G); for a new disk. Largest per format: "
        + ", ".join(f"{k} {v}" for k, v in MAX_DISK_BYTES.items()) + " (else 422)"))
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
        return DiskFormat(v) if v == "vhd" else v

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return parse_size(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _size_fits_format(self) -> DiskSpec:
        fmt = str(self.format or DiskFormat.QCOW2)
        if self.size is not None and not self.created and self.size > MAX_DISK_BYTES[fmt]:
            raise cross_field(f"size: {self.size} bytes is above the largest {fmt} disk "
                             f"({MAX_DISK_BYTES[fmt]} bytes)")
        return self

    @model_validator(mode="after")
    def _path_or_size(self) -> DiskSpec:
        if self.created:  # a disk the agent made records both
            if self.path is None:
                raise cross_field("a created disk needs its path")
        elif (self.path is None) == (self.size is None):
            raise cross_field("give exactly one of path (existing image) or size (new disk)")
        if self.bus == "sata" and self.slot is not None:
            raise cross_field("a sata disk cannot be hot-attached (only virtio disks can)")
        return self


# The networks a NIC may name besides the host's managed networks (hvagent.netspec):
# QEMU's user-mode NAT, and the built-in one-bridge-per-VLAN segments (hvbr<vlan>).
USER_NETWORK, VLAN_BRIDGES = "user", "bridge"
RESERVED_NETWORKS = (USER_NETWORK, VLAN_BRIDGES)


class NicSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    network: str = Field(default=USER_NETWORK, json_schema_extra={
        "pattern": NAME_RE, "minLength": 1, "maxLength": NAME_MAX}, description=(
        "user: QEMU user-mode networking (NAT, no VLAN); bridge: a tap on the host "
        "bridge of VLAN `vlan` (hvbr<vlan>); any other name: the host network of that "
        "name (GET /networks). Giving `vlan` alone means bridge; giving nothing means the "
        "host's network `default` where it has one, else user"))
    vlan: int | None = Field(default=None, ge=VLAN_MIN, le=VLAN_MAX, description=(
        f"VLAN id ({VLAN_RULE}): on `bridge` and on a bridged network the NIC's VLAN "
        "(untagged to the guest); NICs on the same network and VLAN share one L2 segment; "
        "with `trunk`, the native (untagged) VLAN"))
    trunk: list[Annotated[int, Field(ge=VLAN_MIN, le=VLAN_MAX)]] = Field(
        default_factory=list, max_length=64, description=(
            "VLAN ids the NIC carries tagged (a trunk port: a router or switch guest), on "
            "a bridged network in VLAN-aware mode"))
    model: Literal["virtio-net-pci"] = "virtio-net-pci"
    mac: str = Field(default_factory=lambda: random_mac(),
                     json_schema_extra={"pattern": MAC_PATTERN})
    slot: int | None = Field(default=None, ge=0, description=(
        "hotplug port it sits on (hot-added, so hot-removable); None: fixed at boot"))

    @model_validator(mode="before")
    @classmethod
    def _vlan_means_bridge(cls, v: object) -> object:
        if isinstance(v, dict) and v.get("vlan") is not None and "network" not in v:
            return {**v, "network": VLAN_BRIDGES}
        return v

    @field_validator("network")
    @classmethod
    def _network(cls, v: str) -> str:
        return check_name(v)

    @field_validator("trunk")
    @classmethod
    def _trunk(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise cross_field("trunk names a VLAN twice")
        return sorted(v)

    @model_validator(mode="after")
    def _vlan_iff_bridge(self) -> NicSpec:
        if self.network == VLAN_BRIDGES and self.vlan is None:
            raise cross_field(f"a bridge NIC needs a vlan ({VLAN_RULE})")
        if self.network == USER_NETWORK and (self.vlan is not None or self.trunk):
            raise cross_field("a user-mode NIC has no VLAN (use network: bridge)")
        if self.network == VLAN_BRIDGES and self.trunk:
            raise cross_field("a trunk needs a bridged network (bridge NICs have one VLAN)")
        if self.vlan is not None and self.vlan in self.trunk:
            raise cross_field(f"vlan {self.vlan} is the native (untagged) VLAN and also in "
                              "trunk (tagged)")
        return self

    @property
    def managed(self) -> bool:
        """On one of the host's managed networks (not user-mode, not `bridge`)."""
        return self.network not in RESERVED_NETWORKS

    @property
    def tapped(self) -> bool:
        """Has a tap on the host (every NIC but a user-mode one)."""
        return self.network != USER_NETWORK

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

    slot: int = Field(ge=0, lt=MAX_MEMORY_SLOTS)
    size_mib: int = Field(ge=128, le=MAX_MEMORY_MIB)


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
    """A VM. Rules across fields (each broken one answers 422 naming it): vcpus <=
    max_vcpus; memory_mib <= max_memory_mib; max_memory_mib above memory_mib needs
    memory_slots >= 1; initrd and append need kernel; hot_vcpus < vcpus; dimms add up to
    less than memory_mib - 16, on distinct slots below memory_slots; disk and NIC slots
    distinct and below hotplug_ports; at most 6 sata disks; distinct NIC MACs; a disk
    has exactly one of path and size, and a new disk's size fits its format."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    max_vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS)
    memory_mib: int = Field(default=512, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    max_memory_mib: int | None = Field(default=None, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    memory_slots: int | None = Field(default=None, ge=0, le=MAX_MEMORY_SLOTS)
    firmware: Firmware = Firmware.BIOS
    secure_boot: bool = Field(default=False, description=(
        "UEFI Secure Boot with Microsoft's keys enrolled (firmware uefi)"))
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    boot_order: list[BootDevice] = Field(default_factory=lambda: [BootDevice.DISK])
    boot_override: BootOverride = Field(default_factory=BootOverride)
    media: list[MediaSpec] = Field(default_factory=list, description=(
        "removable-media drives (at most one per slot)"))
    kernel: HostPath | None = None
    initrd: HostPath | None = None
    append: str | None = Field(default=None, max_length=APPEND_MAX_CHARS,
                               json_schema_extra={"pattern": TEXT_PATTERN},
                               description="kernel command line (no control characters)")
    hotplug_ports: int = Field(default=DEFAULT_HOTPLUG_PORTS, ge=0, le=MAX_HOTPLUG_PORTS)
    # Hot-added resources (hvagent.services.devices). They are plugged again over QMP on every
    # start, before the guest runs, so that a checkpoint's device state always matches.
    hot_vcpus: int = Field(default=0, ge=0, lt=MAX_VCPUS,
                           description="of `vcpus`, how many are hot-added")
    dimms: list[DimmSpec] = Field(default_factory=list, description="within `memory_mib`")
    pending_unplugs: list[PendingUnplug] = Field(default_factory=list)

    @field_validator("append")
    @classmethod
    def _append(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("contains a control character")
        return v

    @property
    def boot_memory_mib(self) -> int:
        return self.memory_mib - sum(d.size_mib for d in self.dimms)

    @model_validator(mode="after")
    def _limits(self) -> VMSpec:
        if self.max_vcpus is None:
            self.max_vcpus = self.vcpus
        if self.vcpus > self.max_vcpus:
            raise cross_field(f"vcpus ({self.vcpus}) is above max_vcpus ({self.max_vcpus})")
        if self.max_memory_mib is None:
            self.max_memory_mib = self.memory_mib
        if self.memory_mib > self.max_memory_mib:
            raise cross_field(
                f"memory_mib ({self.memory_mib}) is above max_memory_mib "
                f"({self.max_memory_mib})"
            )
        if self.memory_slots is None:
            self.memory_slots = DEFAULT_MEMORY_SLOTS if self.max_memory_mib > self.memory_mib else 0
        if self.max_memory_mib > self.memory_mib and self.memory_slots == 0:
            raise cross_field("max_memory_mib above memory_mib needs memory_slots >= 1")
        if (self.initrd or self.append) and not self.kernel:
            raise cross_field("initrd and append need kernel")
        if self.hot_vcpus >= self.vcpus:
            raise cross_field(f"hot_vcpus ({self.hot_vcpus}) must be below vcpus ({self.vcpus})")
        if self.boot_memory_mib < 16:
            raise cross_field("dimms add up to more than memory_mib")
        dimm_slots = [d.slot for d in self.dimms]
        if len(set(dimm_slots)) != len(dimm_slots) or any(
                s >= self.memory_slots for s in dimm_slots):
            raise cross_field("dimms: slots must be distinct and below memory_slots")
        ports = [d.slot for d in self.disks if d.slot is not None] + [
            n.slot for n in self.nics if n.slot is not None]
        if len(set(ports)) != len(ports) or any(p >= self.hotplug_ports for p in ports):
            raise cross_field("disk/NIC slots must be distinct and below hotplug_ports")
        if sum(d.bus == "sata" for d in self.disks) > AHCI_PORTS:
            raise cross_field(f"disks: at most {AHCI_PORTS} sata disks (AHCI ports)")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise cross_field("two NICs have the same MAC address")
        if self.secure_boot and self.firmware is not Firmware.UEFI:
            raise cross_field("secure_boot needs firmware uefi")
        slots = [m.slot for m in self.media]
        if len(set(slots)) != len(slots):
            raise cross_field("media: at most one drive per slot")
        if sum(d.bus == "sata" for d in self.disks) + (MediaSlot.CD in slots) > AHCI_PORTS:
            raise cross_field(f"disks and the CD drive: at most {AHCI_PORTS} on the AHCI "
                              "controller")
        return self

    def media_in(self, slot: MediaSlot) -> MediaSpec | None:
        return next((m for m in self.media if m.slot == slot), None)

    def effective_boot_order(self, override: bool = True) -> list[BootDevice]:
        """The order the next boot uses: the override's target first when it is
        enabled (and `override`), then `boot_order`."""
        order = list(dict.fromkeys(self.boot_order))
        o = self.boot_override
        if override and o.enabled is not BootEnabled.DISABLED:
            order = [o.target, *(d for d in order if d != o.target)]
        return order
