"""VHD (Microsoft "vpc") on-disk structures: footer, dynamic header, block table.

qemu-img has no `check` for VHD and probes a fixed VHD (footer only, at the end) as raw;
this module owns reading those structures, verifying their checksums and the block
table's bounds, and telling fixed from dynamic images.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
SECTOR = 512
UNUSED = 0xFFFFFFFF

DISK_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}

# Big-endian layout of the 512-byte footer (the rest is reserved).
_FOOTER = struct.Struct(">8sIIQI4sIIQQHBBII16sB")
_DYN = struct.Struct(">8sQQIII")  # cookie, data offset, table offset, version, entries, block


def checksum(data: bytes, skip: tuple[int, int]) -> int:
    """Ones' complement of the byte sum, leaving out the checksum field itself."""
    total = sum(data[: skip[0]]) + sum(data[skip[1] :])
    return (~total) & 0xFFFFFFFF


@dataclass(frozen=True)
class Footer:
    data_offset: int
    current_size: int
    original_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: str
    creator_app: str
    stored_checksum: int
    computed_checksum: int

    @property
    def checksum_ok(self) -> bool:
        return self.stored_checksum == self.computed_checksum


def parse_footer(raw: bytes) -> Footer | None:
    """The footer in `raw` (512 bytes), or None when it carries no VHD cookie."""
    if len(raw) < FOOTER_SIZE or raw[:8] != COOKIE:
        return None
    f = _FOOTER.unpack_from(raw)
    (_, _features, _version, data_offset, _ts, app, _cver, _os, orig, cur, cyl, heads, spt,
     dtype, csum, _uuid, _saved) = f
    return Footer(
        data_offset=data_offset,
        current_size=cur,
        original_size=orig,
        cylinders=cyl,
        heads=heads,
        sectors=spt,
        disk_type=DISK_TYPES.get(dtype, f"unknown({dtype})"),
        creator_app=app.decode("latin-1"),
        stored_checksum=csum,
        computed_checksum=checksum(raw[:FOOTER_SIZE], (64, 68)),
    )


def read_footer(path: Path) -> Footer | None:
    """The VHD footer of `path`: at the end (every VHD), else the copy at the start
    (dynamic VHDs keep one there, which survives a truncated tail)."""
    size = path.stat().st_size
    if size < FOOTER_SIZE:
        return None
    with path.open("rb") as fh:
        fh.seek(size - FOOTER_SIZE)
        footer = parse_footer(fh.read(FOOTER_SIZE))
        if footer is None:
            fh.seek(0)
            head = parse_footer(fh.read(FOOTER_SIZE))
            if head is not None and head.disk_type != "fixed":
                return head
        return footer


def is_vhd(path: Path) -> str | None:
    """'fixed' or 'dynamic' (or 'differencing') when `path` is a VHD, else None."""
    with path.open("rb") as fh:
        if fh.read(8) == COOKIE:
            fh.seek(0)
            head = parse_footer(fh.read(FOOTER_SIZE))
            return head.disk_type if head else None
    footer = read_footer(path)
    return footer.disk_type if footer else None


@dataclass
class CheckReport:
    """What `check` found; `errors` empty means the image is consistent."""

    disk_type: str = "unknown"
    virtual_size: int = 0
    allocated_blocks: int = 0
    total_blocks: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check(path: Path) -> CheckReport:
    """Verify a VHD: footer cookie and checksum, and for dynamic images the header
    checksum and that every block-table entry lies inside the file without overlaps."""
    rep = CheckReport()
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size < FOOTER_SIZE:
            rep.errors.append(f"file is {size} bytes, smaller than a VHD footer")
            return rep
        fh.seek(size - FOOTER_SIZE)
        footer = parse_footer(fh.read(FOOTER_SIZE))
        fh.seek(0)
        head_copy = parse_footer(fh.read(FOOTER_SIZE))
        if footer is None:
            rep.errors.append("no VHD footer at the end of the file (truncated?)")
            footer = head_copy
            if footer is None:
                return rep
        if not footer.checksum_ok:
            rep.errors.append(
                f"footer checksum {footer.stored_checksum:#010x} != "
                f"computed {footer.computed_checksum:#010x}"
            )
        rep.disk_type = footer.disk_type
        rep.virtual_size = footer.current_size
        if footer.disk_type == "fixed":
            if size - FOOTER_SIZE < footer.current_size:
                rep.errors.append(
                    f"fixed VHD holds {size - FOOTER_SIZE} data bytes, footer says "
                    f"{footer.current_size}"
                )
            return rep
        if footer.disk_type not in ("dynamic", "differencing"):
            rep.errors.append(f"unknown VHD disk type {footer.disk_type}")
            return rep
        if head_copy is None:
            rep.errors.append("dynamic VHD lacks the footer copy at offset 0")
        elif not head_copy.checksum_ok:
            rep.errors.append("footer copy at offset 0 has a bad checksum")
        if footer.data_offset + DYN_HEADER_SIZE > size:
            rep.errors.append(f"dynamic header offset {footer.data_offset} is past the end")
            return rep
        fh.seek(footer.data_offset)
        hdr = fh.read(DYN_HEADER_SIZE)
        cookie, _data_off, table_off, _ver, entries, block_size = _DYN.unpack_from(hdr)
        if cookie != DYN_COOKIE:
            rep.errors.append("dynamic header cookie 'cxsparse' missing")
            return rep
        stored = struct.unpack_from(">I", hdr, 36)[0]
        computed = checksum(hdr, (36, 40))
        if stored != computed:
            rep.errors.append(
                f"dynamic header checksum {stored:#010x} != computed {computed:#010x}"
            )
        if block_size == 0 or block_size % SECTOR:
            rep.errors.append(f"block size {block_size} is not a positive multiple of 512")
            return rep
        needed = -(-footer.current_size // block_size)
        rep.total_blocks = entries
        if entries < needed:
            rep.errors.append(f"block table has {entries} entries, disk size needs {needed}")
        if table_off + 4 * entries > size:
            rep.errors.append(f"block table at {table_off} runs past the end of the file")
            return rep
        fh.seek(table_off)
        bat = struct.unpack(f">{entries}I", fh.read(4 * entries))
        bitmap = -(-(block_size // SECTOR) // 8)
        bitmap = -(-bitmap // SECTOR) * SECTOR
        data_end = size - FOOTER_SIZE
        table_end = table_off + 4 * entries
        spans: list[tuple[int, int, int]] = []
        for i, ent in enumerate(bat):
            if ent == UNUSED:
                continue
            start = ent * SECTOR
            end = start + bitmap + block_size
            if start < table_end and end > table_off:
                rep.errors.append(f"block {i} at {start} overlaps the block table")
            if end > data_end:
                rep.errors.append(f"block {i} at {start} ends past the data area ({data_end})")
            spans.append((start, end, i))
        spans.sort()
        for (_s1, e1, i1), (s2, _e2, i2) in zip(spans, spans[1:], strict=False):
            if s2 < e1:
                rep.errors.append(f"blocks {i1} and {i2} overlap at {s2}")
        rep.allocated_blocks = len(spans)
        if len(rep.errors) > 20:
            rep.errors[20:] = [f"... and {len(rep.errors) - 20} more"]
    return rep
