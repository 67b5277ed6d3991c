"""The VHDX facts read straight from the file: whether an image is fixed (its File
Parameters metadata item has LeaveBlocksAllocated set) or dynamic, which qemu-img does
not report, and its virtual size (so that `hvdisk convert` needs no qemu-img info)."""

from __future__ import annotations

import struct
from pathlib import Path

REGION_TABLE = 192 * 1024
# GUIDs as stored on disk (uuid.UUID(...).bytes_le), compared as bytes: no uuid import
# on every `hvdisk info` / `convert` of a VHDX.
METADATA_REGION = bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e")  # 8B7CA206-4790-...
FILE_PARAMETERS = bytes.fromhex("3767a1ca36fa434db3b633f0aa44e76b")  # CAA16737-FA36-...
VIRTUAL_DISK_SIZE = bytes.fromhex("2442a52f1bcd7648b2115dbed83bf4b8")  # 2FA54224-CD1B-...


def _metadata_item(path: Path, item: bytes, length: int) -> bytes | None:
    """The first `length` bytes of metadata item `item`, None when it cannot be read."""
    with path.open("rb") as fh:
        fh.seek(REGION_TABLE)
        regions = fh.read(64 * 1024)
        if regions[:4] != b"regi":
            return None
        count = struct.unpack_from("<I", regions, 8)[0]
        meta_off = None
        for i in range(min(count, 2047)):
            ent = regions[16 + 32 * i : 48 + 32 * i]
            if ent[:16] == METADATA_REGION:
                meta_off = struct.unpack_from("<Q", ent, 16)[0]
        if meta_off is None:
            return None
        fh.seek(meta_off)
        table = fh.read(64 * 1024)
        if table[:8] != b"metadata":
            return None
        entries = struct.unpack_from("<H", table, 10)[0]
        for i in range(min(entries, 2047)):
            ent = table[32 + 32 * i : 64 + 32 * i]
            if ent[:16] == item:
                item_off = struct.unpack_from("<I", ent, 16)[0]
                fh.seek(meta_off + item_off)
                data = fh.read(length)
                return data if len(data) == length else None
    return None


def subformat(path: Path) -> str | None:
    """'fixed' or 'dynamic', None when the metadata cannot be read."""
    data = _metadata_item(path, FILE_PARAMETERS, 8)
    if data is None:
        return None
    _block_size, flags = struct.unpack("<II", data)
    return "fixed" if flags & 1 else "dynamic"


def virtual_size(path: Path) -> int | None:
    """The guest-visible size in bytes, None when the metadata cannot be read."""
    data = _metadata_item(path, VIRTUAL_DISK_SIZE, 8)
    return None if data is None else int(struct.unpack("<Q", data)[0])
