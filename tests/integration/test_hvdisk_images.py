"""hvdisk's image commands on real images made by qemu-img: exact VHD sizes, VHD/VHDX
resize, VHD check, conversions that round-trip content, and the corrupt-image corpus
refused with a one-line error and the image left byte-identical."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import disk_images as di  # noqa: E402
from test_hvdisk_edit import hvdisk  # noqa: E402

pytestmark = pytest.mark.integration
ODD_SIZE = 100 * di.MiB + 3 * 512  # not a CHS geometry size


@pytest.fixture(scope="module")
def raw_gpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return di.make_raw(tmp_path_factory.mktemp("img-raw"), "gpt")


def info(path: Path) -> dict[str, object]:
    return json.loads(hvdisk("info", "--json", path).stdout)


@pytest.mark.parametrize("fmt,fixed", [("vhd", False), ("vhd", True), ("vhdx", False),
                                       ("vhdx", True), ("qcow2", False), ("raw", False)])
def test_create_has_the_exact_size(fmt: str, fixed: bool, tmp_path: Path) -> None:
    path = tmp_path / f"new.{fmt}"
    hvdisk("create", "-f", fmt, *(["--fixed"] if fixed else []), path, str(ODD_SIZE))
    data = info(path)
    assert data["format"] == fmt and data["virtual_size"] == ODD_SIZE
    if fmt in ("vhd", "vhdx"):
        assert data["subformat"] == ("fixed" if fixed else "dynamic")
    # qemu itself sees the same size (a fixed VHD must not be taken for raw).
    qfmt = di.QEMU_FMT.get(fmt, fmt)
    q = json.loads(di.run("qemu-img", "info", "--output", "json", "-f", qfmt, path).stdout)
    assert q["virtual-size"] == ODD_SIZE
    hvdisk("check", path)
    hvdisk("create", "-f", fmt, path, "1M", rc=2)  # exists


def test_convert_round_trips_through_every_format(raw_gpt: Path, tmp_path: Path) -> None:
    src = raw_gpt
    for fmt in ("vhd", "vhdx", "qcow2", "raw"):
        for fixed in ((False, True) if fmt in ("vhd", "vhdx") else (False,)):
            out = tmp_path / f"c-{fixed}.{fmt}"
            hvdisk("convert", "-q", "--to", fmt, *(["--fixed"] if fixed else []), src, out)
            assert info(out)["virtual_size"] == di.DISK_SIZE
            hvdisk("compare", "--strict", raw_gpt, out)
            hvdisk("check", out)
            src = out
    # The guest content survived the chain.
    assert hvdisk("cat", src, "/usr/share/blob.bin").stdout == di.FILES["usr/share/blob.bin"]
    # Sparse output: an almost empty disk takes little room as VHDX.
    assert os.stat(tmp_path / "c-False.vhdx").st_blocks * 512 < di.DISK_SIZE // 2


def test_convert_reports_progress_as_lines(raw_gpt: Path, tmp_path: Path) -> None:
    err = hvdisk("convert", "--to", "vhdx", raw_gpt, tmp_path / "p.vhdx").stderr.decode()
    assert "convert disk-gpt.raw: 100%" in err.splitlines()


def test_compare_reports_a_difference(raw_gpt: Path, tmp_path: Path) -> None:
    a = di.convert(raw_gpt, "vhdx", tmp_path / "a.vhdx")
    b = di.convert(raw_gpt, "qcow2", tmp_path / "b.qcow2")
    hvdisk("compare", a, b)
    f = tmp_path / "f"
    f.write_bytes(b"changed")
    hvdisk("put", b, f, "/etc/motd")
    out = hvdisk("compare", a, b, rc=1).stdout.decode()
    assert "mismatch" in out.lower()


@pytest.mark.parametrize("fmt,fixed", [("vhd", False), ("vhd", True), ("vhdx", False),
                                       ("vhdx", True), ("qcow2", False), ("raw", False)])
def test_resize_grows_every_format_keeping_content(fmt: str, fixed: bool, raw_gpt: Path,
                                                   tmp_path: Path) -> None:
    path = tmp_path / f"r.{fmt}"
    hvdisk("convert", "-q", "--to", fmt, *(["--fixed"] if fixed else []), raw_gpt, path)
    hvdisk("resize", "-q", path, "+32M")
    data = info(path)
    assert data["virtual_size"] == di.DISK_SIZE + 32 * di.MiB
    if fmt in ("vhd", "vhdx"):
        assert data["subformat"] == ("fixed" if fixed else "dynamic")
    hvdisk("compare", raw_gpt, path)  # the new tail reads as zeros
    hvdisk("check", path)
    hvdisk("resize", path, str(di.DISK_SIZE), rc=2)  # shrinking needs --shrink
    hvdisk("resize", "-q", "--shrink", path, str(di.DISK_SIZE))
    hvdisk("compare", "--strict", raw_gpt, path)


def test_vhd_check_finds_damage(raw_gpt: Path, tmp_path: Path) -> None:
    dyn = di.convert(raw_gpt, "vhd", tmp_path / "dyn.vhd")
    hvdisk("check", dyn)
    # Flip a byte of the footer's reserved area: checksum mismatch.
    data = bytearray(dyn.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "bad-footer.vhd"
    bad.write_bytes(data)
    out = json.loads(hvdisk("check", "--json", bad, rc=1).stdout)
    assert not out["ok"] and "checksum" in out["errors"][0]
    # A block table entry pointing past the end of the file.
    data = bytearray(dyn.read_bytes())
    table_off = struct.unpack_from(">Q", data, 512 + 16)[0]
    struct.pack_into(">I", data, table_off, 0x7FFFFFF)
    bat = tmp_path / "bad-bat.vhd"
    bat.write_bytes(data)
    out = json.loads(hvdisk("check", "--json", bat, rc=1).stdout)
    assert any("past the data area" in e for e in out["errors"])
    # Truncated: no footer at the end any more.
    trunc = tmp_path / "trunc.vhd"
    trunc.write_bytes(dyn.read_bytes()[: dyn.stat().st_size // 2])
    out = json.loads(hvdisk("check", "--json", trunc, rc=1).stdout)
    assert not out["ok"]


def _corpus(raw: Path, work: Path) -> dict[str, Path]:
    """Damaged images, each a real image with one realistic fault."""
    c: dict[str, Path] = {}
    q = di.convert(raw, "qcow2", work / "src.qcow2")
    x = di.convert(raw, "vhdx", work / "src.vhdx")
    v = di.convert(raw, "vhd", work / "src.vhd")
    (work / "trunc.qcow2").write_bytes(q.read_bytes()[: 200_000])
    c["truncated qcow2"] = work / "trunc.qcow2"
    (work / "trunc.vhdx").write_bytes(x.read_bytes()[: x.stat().st_size // 2])
    c["truncated vhdx"] = work / "trunc.vhdx"
    data = bytearray(q.read_bytes())
    data[4:8] = b"\x00\x00\x00\x63"  # unknown qcow2 version
    (work / "badver.qcow2").write_bytes(data)
    c["qcow2 bad version"] = work / "badver.qcow2"
    data = bytearray(x.read_bytes())
    for off in (64 * 1024, 128 * 1024):  # both VHDX headers
        data[off + 4] ^= 0xFF
    (work / "badhdr.vhdx").write_bytes(data)
    c["vhdx bad headers"] = work / "badhdr.vhdx"
    data = bytearray(v.read_bytes())
    data[-10] ^= 0xFF
    (work / "badfooter.vhd").write_bytes(data)
    c["vhd bad footer"] = work / "badfooter.vhd"
    data = bytearray(raw.read_bytes())
    data[512 + 40] ^= 0xFF  # first usable LBA, inside the GPT header: CRC mismatch
    (work / "badgpt.raw").write_bytes(data)
    c["gpt bad crc"] = work / "badgpt.raw"
    (work / "noise.raw").write_bytes(os.urandom(4 * di.MiB))
    c["no partition table"] = work / "noise.raw"
    data = bytearray(raw.read_bytes())
    data[di.ROOT_START : di.ROOT_START + 4096] = bytes(4096)
    data[di.ESP_START : di.ESP_START + 4096] = bytes(4096)
    (work / "nofs.raw").write_bytes(data)
    c["unknown file systems"] = work / "nofs.raw"
    data = bytearray(raw.read_bytes()[: di.ROOT_START + di.MiB])
    (work / "short.raw").write_bytes(data)
    c["truncated raw (partition past the end)"] = work / "short.raw"
    data = bytearray(raw.read_bytes())
    data[di.ROOT_START + 1024 : di.ROOT_START + 1024 + 40] = bytes(40)  # superblock counts
    data[di.ROOT_START + 1024 + 56 : di.ROOT_START + 1024 + 58] = b"\x53\xef"
    (work / "badsb.raw").write_bytes(data)
    c["corrupt ext superblock"] = work / "badsb.raw"
    for p in (q, x, v):
        p.unlink()
    return c


@pytest.mark.parametrize("no_fuse", [False, True], ids=["fuse", "no-fuse"])
def test_corrupt_images_are_refused_byte_identical(no_fuse: bool, raw_gpt: Path,
                                                   tmp_path: Path) -> None:
    # The FUSE variant must not quietly fall back to a copy.
    env = {**os.environ, **({"HVDISK_NO_FUSE": "1"} if no_fuse else
                            {"HVDISK_NO_FUSE": "0", "HVDISK_REQUIRE_FUSE": "1"})}
    host = tmp_path / "x"
    host.write_bytes(b"x")
    for what, img in _corpus(raw_gpt, tmp_path).items():
        before = di.sha256(img)
        for args in (("put", img, host, "/etc/x"), ("mkdir", img, "/newdir"),
                     ("ls", img, "/"), ("cat", img, "/etc/hostname")):
            proc = hvdisk(*args, rc=2, env=env)
            err = proc.stderr.decode()
            assert err.startswith("hvdisk: error: ") and err.count("\n") == 1, (what, err)
            assert "HVDISK_REQUIRE_FUSE" not in err, (what, err)  # refused on its merits
        assert di.sha256(img) == before, what
