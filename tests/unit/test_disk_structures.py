"""On-disk structures hvdisk parses itself: VHD footers, partition tables made by
sfdisk, and initramfs archives made by cpio and compressed by the real tools."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from hvagent.disk import vhd
from hvagent.disk.errors import DiskError
from hvagent.disk.p2v import initramfs_names
from hvagent.disk.parttable import ESP_GUID, pick_partition, read_partitions


def footer(size: int, disk_type: int = 2) -> bytes:
    raw = bytearray(vhd._FOOTER.pack(
        vhd.COOKIE, 2, 0x10000, 0xFFFFFFFFFFFFFFFF, 0, b"test", 0x10000, 0x5769326B,
        size, size, 1024, 16, 63, disk_type, 0, uuid.uuid4().bytes, 0))
    raw += bytes(512 - len(raw))
    struct.pack_into(">I", raw, 64, vhd.checksum(bytes(raw), (64, 68)))
    return bytes(raw)


def test_fixed_vhd_footer_is_found_and_checked(tmp_path: Path) -> None:
    img = tmp_path / "f.vhd"
    img.write_bytes(bytes(4096) + footer(4096))
    f = vhd.read_footer(img)
    assert f is not None and f.checksum_ok and f.disk_type == "fixed"
    assert f.current_size == 4096 and vhd.is_vhd(img) == "fixed"
    assert vhd.check(img).ok
    data = bytearray(img.read_bytes())
    data[-300] ^= 1
    img.write_bytes(data)
    rep = vhd.check(img)
    assert not rep.ok and "checksum" in rep.errors[0]
    img.write_bytes(bytes(1024) + footer(4096))  # claims more data than it has
    assert any("data bytes" in e for e in vhd.check(img).errors)


def _disk(tmp_path: Path, table: str) -> Path:
    img = tmp_path / "d.raw"
    with img.open("wb") as fh:
        fh.truncate(32 << 20)
    subprocess.run(["sfdisk", "-q", str(img)], input=table.encode(), check=True,
                   capture_output=True, timeout=60)
    return img


def _reader(img: Path):  # type: ignore[no-untyped-def]
    data = img.read_bytes()
    return lambda off, n: data[off : off + n]


def test_gpt_and_mbr_with_logical_partitions(tmp_path: Path) -> None:
    img = _disk(tmp_path, f"label: gpt\nstart=2048, size=4096, type={ESP_GUID}\n"
                          "start=8192, size=8192, name=root\n")
    scheme, parts = read_partitions(_reader(img), img.stat().st_size)
    assert scheme == "gpt" and [p.number for p in parts] == [1, 2]
    assert parts[0].is_esp and parts[1].name == "root" and parts[1].start == 8192 * 512
    img = _disk(tmp_path, "label: dos\nstart=2048, size=4096, type=ef\n"
                          "start=8192, size=40000, type=5\n"
                          "start=10240, size=4096, type=83\nstart=16384, size=4096, type=83\n")
    scheme, parts = read_partitions(_reader(img), img.stat().st_size)
    assert scheme == "mbr" and [p.number for p in parts] == [1, 5, 6]
    assert parts[0].is_esp and parts[2].start == 16384 * 512
    with pytest.raises(DiskError, match="known file system"):
        pick_partition(parts, None)  # nothing formatted
    with pytest.raises(DiskError, match="no such partition"):
        pick_partition(parts, 3)


def _cpio(tmp_path: Path, names: list[str]) -> bytes:
    root = tmp_path / "root"
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"x" * 100)
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                          input="\n".join(names).encode(), capture_output=True,
                          check=True, timeout=60).stdout


def test_initramfs_segments_and_compression(tmp_path: Path) -> None:
    early = _cpio(tmp_path / "a", ["kernel/x86/microcode/GenuineIntel.bin"])
    main = _cpio(tmp_path / "b", ["usr/lib/modules/6.1/kernel/drivers/block/virtio_blk.ko",
                                  "init"])
    names = initramfs_names(early + gzip.compress(main))
    assert "init" in names and any("virtio_blk.ko" in n for n in names)
    assert "kernel/x86/microcode/GenuineIntel.bin" in names
    if shutil.which("zstd"):
        z = subprocess.run(["zstd", "-q", "-c"], input=main, capture_output=True,
                           check=True, timeout=60).stdout
        assert any("virtio_blk" in n for n in initramfs_names(early + z))
