"""Disk formats and sizes stated once (hvagent.host.formats), and the storage driver's
one-line errors and cheap description of a conversion's result (real qemu-img, tiny
images)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hvagent.disk import image
from hvagent.disk.errors import DiskError
from hvagent.drivers import storage
from hvagent.errors import Conflict, InvalidRequest
from hvagent.host.formats import DISK_FORMAT_LABELS, DiskFormat, parse_size
from hvagent.spec import DiskSpec

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")


def test_one_format_enum_two_names() -> None:
    assert DiskFormat("vhd") is DiskFormat.VPC is DiskFormat.VHD
    assert [f.label for f in DiskFormat] == list(DISK_FORMAT_LABELS) == [
        "qcow2", "raw", "vhd", "vhdx"]
    assert DiskFormat.VPC.qemu == "vpc" and DiskFormat.VPC.label == "vhd"
    assert DiskSpec(size="1M", format="vhd").format is DiskFormat.VPC


def test_one_size_grammar_with_an_explicit_sector_rule() -> None:
    assert parse_size("1.5M") == 3 << 19 and parse_size("2GiB") == 2 << 30
    assert parse_size("1P") == 1 << 50 and parse_size(4096) == 4096
    assert parse_size("100") == 100  # a spec size need not be whole sectors
    with pytest.raises(ValueError, match="positive multiple of 512"):
        parse_size("100", sectors=True)
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size("1.1K")
    with pytest.raises(ValueError, match="not a size"):
        parse_size("10X")


@pytest.mark.parametrize("bad", ["9" * 5000, "\u0661\u0662G", "1\x00G", "1.5 5G", ""])
def test_a_size_that_is_no_size_is_one_short_line(bad: str) -> None:
    # Overlong digit strings, non-ASCII digits, NUL bytes: "not a size", never an
    # interpreter limit, and the message stays one short line.
    with pytest.raises(ValueError, match="^not a size: ") as err:
        parse_size(bad)
    assert len(str(err.value)) < 120 and "\n" not in str(err.value)


def test_disk_errors_are_agent_errors() -> None:
    assert issubclass(DiskError, InvalidRequest)
    in_use = storage.in_use("/x.qcow2")
    assert isinstance(in_use, Conflict) and in_use.kind == "conflict"
    assert str(in_use) == "/x.qcow2: in use by another process (it holds QEMU's image lock)"


@needs_qemu_img
def test_qemu_img_failure_is_one_line_naming_the_work(tmp_path: Path) -> None:
    bogus = tmp_path / "not-an-image.qcow2"
    bogus.write_bytes(b"nothing")
    with pytest.raises(DiskError) as err:
        storage.info(bogus, DiskFormat.QCOW2)
    assert str(err.value).startswith(f"read {bogus}: ") and "\n" not in str(err.value)


@needs_qemu_img
@pytest.mark.parametrize("fmt,fixed", [("qcow2", False), ("raw", False), ("vhd", False),
                                       ("vhd", True), ("vhdx", False), ("vhdx", True)])
def test_conversion_result_read_from_the_header(tmp_path: Path, fmt: str, fixed: bool) -> None:
    src = tmp_path / "src.qcow2"
    image.create(src, DiskFormat.QCOW2, 3 << 20)
    out = tmp_path / f"out.{fmt}"
    got = image.convert(src, out, DiskFormat(fmt), fixed=fixed)
    assert got == image.image_info(out, DiskFormat(fmt))
    assert got.virtual_size == 3 << 20 and got.to_dict()["format"] == fmt
