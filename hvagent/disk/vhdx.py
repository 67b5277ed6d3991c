"""The one VHDX fact qemu-img does not report: whether an image is fixed (its File
Parameters metadata item has LeaveBlocksAllocated set) or dynamic."""

from __future__ import annotations

import struct
from pathlib import Path

REGION_TABLE = 192 * 1024
# GUIDs as stored on disk (uuid.UUID(...).bytes_le), compared as bytes: no uuid import
# on every `hvdisk info` / `convert` of a VHDX.
METADATA_REGION = bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e")  # 8B7CA206-4790-...
FILE_PARAMETERS = bytes.fromhex("3767a1ca36fa434db3b633f0aa44e76b")  # CAA16737-FA36-...


def subformat(path: Path) -> str | None:
    """'fixed' or 'dynamic', None when the metadata cannot be read."""
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
            if ent[:16] == FILE_PARAMETERS:
                item_off = struct.unpack_from("<I", ent, 16)[0]
                fh.seek(meta_off + item_off)
                _block_size, flags = struct.unpack("<II", fh.read(8))
                return "fixed" if flags & 1 else "dynamic"
    return None
