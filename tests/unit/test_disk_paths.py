"""Pure parsing pieces of hvdisk: guest PATH syntax, sizes, image targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvagent.disk.errors import DiskError
from hvagent.disk.fs import parse_target
from hvagent.disk.guestpath import split_user_path
from hvagent.disk.image import parse_size


@pytest.mark.parametrize("path,parts", [
    ("/etc/hosts", ["etc", "hosts"]),
    ("etc//./hosts/", ["etc", "hosts"]),
    ("/usr/lib/../share", ["usr", "share"]),
    ("/", []),
])
def test_user_paths_normalise(path: str, parts: list[str]) -> None:
    assert split_user_path(path) == parts


@pytest.mark.parametrize("path", ["/../etc", "..", "/etc/../../x", "", "/a\0b"])
def test_user_paths_that_escape_or_are_malformed_are_refused(path: str) -> None:
    with pytest.raises(DiskError):
        split_user_path(path)


def test_sizes() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("1.5M") == 3 << 19
    assert parse_size("4096") == 4096
    for bad in ("12", "ten", "-1M", "0"):
        with pytest.raises(DiskError):
            parse_size(bad)


def test_targets() -> None:
    assert parse_target("disk.vhdx@2") == (Path("disk.vhdx"), 2)
    assert parse_target("disk.vhdx") == (Path("disk.vhdx"), None)
    assert parse_target("dir@x/disk.qcow2") == (Path("dir@x/disk.qcow2"), None)
