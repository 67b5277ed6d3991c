"""Partition tables (MBR with logical partitions, GPT) and file system signatures, read
from the raw bytes of a disk. Nothing here writes."""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

from hvagent.disk.errors import DiskError

SECTOR = 512
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MBR_ESP = 0xEF
MBR_EXTENDED = (0x05, 0x0F, 0x85)

# read(offset, length) -> bytes; short reads mean the disk ends there.
Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based as Linux numbers them; 0 = a file system on the whole disk
    start: int  # bytes
    size: int  # bytes
    type: str  # GPT type GUID, or MBR type as "0x83"
    name: str
    scheme: str  # "gpt", "mbr" or "none"
    fs: str | None = None  # "ext2"/"ext3"/"ext4"/"vfat" when recognised

    @property
    def is_esp(self) -> bool:
        return self.type.upper() == ESP_GUID or self.type == f"{MBR_ESP:#04x}"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "esp": self.is_esp}


def detect_fs(read: Reader, start: int) -> str | None:
    """'ext2', 'ext3', 'ext4' or 'vfat' for the file system starting at `start`."""
    sb = read(start + 1024, 128)
    if len(sb) >= 104 and struct.unpack_from("<H", sb, 56)[0] == 0xEF53:
        compat, incompat = struct.unpack_from("<II", sb, 92)
        if incompat & (0x40 | 0x80 | 0x200):  # extents, 64bit, flex_bg
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"
    boot = read(start, SECTOR)
    if len(boot) == SECTOR and boot[510:512] == b"\x55\xaa":
        bps, spc = struct.unpack_from("<HB", boot, 11)
        labels = (boot[54:59], boot[82:87])
        if bps in (512, 1024, 2048, 4096) and spc and spc & (spc - 1) == 0 and (
            any(lab.startswith(b"FAT") for lab in labels) or boot[0] in (0xEB, 0xE9)
        ):
            return "vfat"
    return None


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw)).upper()


def _gpt(read: Reader, disk_size: int) -> list[Partition]:
    hdr = read(SECTOR, SECTOR)
    if hdr[:8] != b"EFI PART":
        raise DiskError("protective MBR present but no GPT header (corrupt partition table)")
    hsize = struct.unpack_from("<I", hdr, 12)[0]
    if not 92 <= hsize <= SECTOR:
        raise DiskError(f"GPT header size {hsize} is invalid (corrupt partition table)")
    stored = struct.unpack_from("<I", hdr, 16)[0]
    zeroed = hdr[:16] + b"\0\0\0\0" + hdr[20:hsize]
    if zlib.crc32(zeroed) != stored:
        raise DiskError("GPT header checksum mismatch (corrupt partition table)")
    entries_lba, count, esize, ecrc = struct.unpack_from("<QIII", hdr, 72)
    if esize < 128 or count > 4096:
        raise DiskError("GPT entry table has an invalid shape (corrupt partition table)")
    table = read(entries_lba * SECTOR, count * esize)
    if len(table) != count * esize or zlib.crc32(table) != ecrc:
        raise DiskError("GPT entry table checksum mismatch (corrupt partition table)")
    parts = []
    for i in range(count):
        ent = table[i * esize : (i + 1) * esize]
        if ent[:16] == b"\0" * 16:
            continue
        first, last = struct.unpack_from("<QQ", ent, 32)
        name = ent[56:128].decode("utf-16-le", errors="replace").rstrip("\0")
        parts.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR,
                               _guid(ent[:16]), name, "gpt"))
    return parts


def _mbr(read: Reader, mbr: bytes) -> list[Partition]:
    parts = []
    for i in range(4):
        ent = mbr[446 + 16 * i : 462 + 16 * i]
        if ent[0] not in (0x00, 0x80):
            raise DiskError(f"MBR entry {i + 1} has boot flag {ent[0]:#x} (corrupt table)")
        ptype = ent[4]
        lba, count = struct.unpack_from("<II", ent, 8)
        if ptype == 0 or count == 0:
            continue
        if ptype in MBR_EXTENDED:
            parts.extend(_logical(read, lba))
            continue
        parts.append(Partition(i + 1, lba * SECTOR, count * SECTOR, f"{ptype:#04x}", "", "mbr"))
    return parts


def _logical(read: Reader, ext_lba: int) -> list[Partition]:
    """Walk the chain of extended boot records; logical partitions number from 5."""
    parts: list[Partition] = []
    ebr_lba = ext_lba
    seen = set()
    while ebr_lba not in seen and len(parts) < 128:
        seen.add(ebr_lba)
        ebr = read(ebr_lba * SECTOR, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            raise DiskError(f"extended boot record at sector {ebr_lba} is invalid")
        ptype, (lba, count) = ebr[446 + 4], struct.unpack_from("<II", ebr, 446 + 8)
        if ptype and count:
            parts.append(Partition(5 + len(parts), (ebr_lba + lba) * SECTOR, count * SECTOR,
                                   f"{ptype:#04x}", "", "mbr"))
        nxt_type, (nxt, _n) = ebr[462 + 4], struct.unpack_from("<II", ebr, 462 + 8)
        if not nxt_type or not nxt:
            break
        ebr_lba = ext_lba + nxt
    return parts


def read_partitions(read: Reader, disk_size: int) -> tuple[str, list[Partition]]:
    """(scheme, partitions with their file systems). A disk without a table but with a
    file system at its start yields one partition numbered 0."""
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR:
        raise DiskError(f"disk is only {len(mbr)} bytes long")
    has_sig = mbr[510:512] == b"\x55\xaa"
    if has_sig and any(mbr[446 + 16 * i + 4] == 0xEE for i in range(4)):
        scheme, parts = "gpt", _gpt(read, disk_size)
    elif detect_fs(read, 0):
        scheme, parts = "none", [Partition(0, 0, disk_size, "", "", "none")]
    elif has_sig:
        scheme, parts = "mbr", _mbr(read, mbr)
    else:
        raise DiskError("no partition table (MBR or GPT) and no known file system on the disk")
    out = []
    for p in parts:
        if p.start + p.size > disk_size:
            raise DiskError(
                f"partition {p.number} ends at byte {p.start + p.size}, past the end of the "
                f"{disk_size}-byte disk (truncated image or corrupt table)"
            )
        out.append(Partition(p.number, p.start, p.size, p.type, p.name, p.scheme,
                             detect_fs(read, p.start)))
    return scheme, out


def pick_partition(parts: list[Partition], number: int | None) -> Partition:
    """The partition asked for, or by default: the only one, else the largest ext one
    (the root file system of a usual Linux guest)."""
    if number is not None:
        for p in parts:
            if p.number == number:
                if p.fs is None:
                    raise DiskError(f"partition {number}: unknown file system "
                                    "(supported: ext2/3/4, FAT)")
                return p
        raise DiskError(f"partition {number}: no such partition "
                        f"(have {', '.join(str(p.number) for p in parts) or 'none'})")
    known = [p for p in parts if p.fs]
    if len(known) == 1:
        return known[0]
    ext = [p for p in known if p.fs and p.fs.startswith("ext")]
    if ext:
        return max(ext, key=lambda p: p.size)
    if not known:
        raise DiskError("no partition with a known file system (supported: ext2/3/4, FAT)")
    raise DiskError("several FAT partitions: name one as IMAGE@N")
