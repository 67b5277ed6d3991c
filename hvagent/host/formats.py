"""Disk image formats and sizes, stated once for the agent, hvdisk and the builder.

Light on purpose (no pydantic): `hvdisk convert` imports it on every run, next to
qemu-img's own start-up.
"""

from __future__ import annotations

import re
from enum import StrEnum

QEMU_IMG = "qemu-img"  # QEMU's image tool

# ASCII digits only, and few enough that no number is too long to convert (a 5000-digit
# size is "not a size", not an interpreter limit).
_SIZE_RE = re.compile(r"^([0-9]{1,24})(?:\.([0-9]{1,24}))?\s*([KMGTP]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class DiskFormat(StrEnum):
    """The disk image formats. The value is QEMU's driver name, as VM specs store it;
    `label` is the name people use ("vhd", also the file extension). Either name
    parses: DiskFormat("vhd") is DiskFormat.VPC, also spelt DiskFormat.VHD."""

    QCOW2 = "qcow2"
    RAW = "raw"
    VPC = "vpc"  # VHD
    VHDX = "vhdx"
    VHD = "vpc"  # an alias: the same member as VPC

    @classmethod
    def _missing_(cls, value: object) -> DiskFormat | None:
        return cls.VPC if value == "vhd" else None

    @property
    def qemu(self) -> str:
        """QEMU's driver name (qemu-img -f/-O, a block node's `driver`)."""
        return self.value

    @property
    def label(self) -> str:
        """The name shown to people and used as the file extension."""
        return "vhd" if self is DiskFormat.VPC else self.value


# What a command line offers as formats: the labels (vhd, not vpc).
DISK_FORMAT_LABELS = tuple(f.label for f in DiskFormat)


def parse_size(value: int | str, *, sectors: bool = False) -> int:
    """Bytes from 1073741824, "1G", "512M", "1.5M", "10GiB" (binary units, K to P).
    ValueError when it is no size or not a whole number of bytes; with `sectors` also
    when it is not a positive multiple of 512 bytes (as an image's size must be)."""
    shown = value if isinstance(value, int) or len(value) <= 40 else value[:37] + "..."
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(value.strip())
        if not m:
            raise ValueError(f"not a size: {shown!r} (examples: 512M, 10G, 1.5T)")
        whole, frac, unit = m.group(1), m.group(2) or "", _UNITS[m.group(3).upper()]
        scaled = int(whole + frac) * unit
        size, rest = divmod(scaled, 10 ** len(frac))
        if rest:
            raise ValueError(f"size {shown!r}: not a whole number of bytes")
    if sectors and (size <= 0 or size % 512):
        raise ValueError(f"size {shown!r}: must be a positive multiple of 512 bytes")
    return size


def create_options(fmt: DiskFormat, fixed: bool) -> list[str]:
    """qemu-img -o options for a new image of `fmt`, fully allocated when `fixed`."""
    if fmt is DiskFormat.VPC:
        # force_size: keep the exact byte size instead of rounding to CHS geometry.
        return ["-o", f"force_size=on,subformat={'fixed' if fixed else 'dynamic'}"]
    if fmt is DiskFormat.VHDX:
        return ["-o", f"subformat={'fixed' if fixed else 'dynamic'}"]
    if fixed:
        return ["-o", "preallocation=falloc" if fmt is DiskFormat.RAW else "preallocation=full"]
    return []
