"""Whether a directory survives a power-off, judged against real mounts made here: a
tmpfs, overlays with their upper directory on that tmpfs or on the disk, bind mounts."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvagent.host.persistence import STATE_IN_RAM_WARNING, parse_mountinfo, state_persistence


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def fs_type(path: Path) -> str:
    """The file system type as coreutils sees it (an oracle independent of the code)."""
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points to unmount at the end (last first)."""
    made: list[Path] = []
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(probe)], capture_output=True,
                       timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here: {r.stderr.decode().strip()}")
    sh("umount", str(probe))
    try:
        yield made
    finally:
        for m in reversed(made):
            subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=60)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A directory on the ordinary disk (the test's temporary directory)."""
    if fs_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is itself in RAM: no ordinary disk to compare with")
    d = tmp_path / "disk"
    d.mkdir()
    return d


def tmpfs(at: Path, mounts: list[Path]) -> Path:
    at.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "tmpfs", "tmpfs", str(at))
    mounts.append(at)
    return at


def overlay(at: Path, upper_on: Path, mounts: list[Path]) -> Path:
    lower, upper, work = upper_on / "lower", upper_on / "upper", upper_on / "work"
    for d in (lower, upper, work, at):
        d.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "overlay", "overlay", "-o",
       f"lowerdir={lower},upperdir={upper},workdir={work}", str(at))
    mounts.append(at)
    return at


def bind(src: Path, at: Path, mounts: list[Path]) -> Path:
    at.mkdir(parents=True, exist_ok=True)
    sh("mount", "--bind", str(src), str(at))
    mounts.append(at)
    return at


def test_tmpfs_is_not_persistent_and_says_where(tmp_path: Path, mounts: list[Path]) -> None:
    ram = tmpfs(tmp_path / "ram", mounts)
    state = ram / "hvagent"
    state.mkdir()
    p = state_persistence(state)
    assert not p.persistent
    assert p.reason == f"{state} is on tmpfs ({ram}): state is lost at power-off"
    assert p.warnings == [STATE_IN_RAM_WARNING]


def test_plain_disk_directory_is_persistent(disk: Path, mounts: list[Path]) -> None:
    p = state_persistence(disk)
    assert p.persistent, p.reason
    assert p.reason.startswith(f"{disk} is on {_mountinfo_type(disk)} (")
    assert p.warnings == []


def test_overlay_with_upper_on_tmpfs_is_not_persistent(tmp_path: Path,
                                                       mounts: list[Path]) -> None:
    # The diskless image: root from a read-only lower, writes in an upper on RAM.
    ram = tmpfs(tmp_path / "run" / "corehost" / "ram", mounts)
    root = overlay(tmp_path / "root", ram, mounts)
    p = state_persistence(root / "var" / "lib" / "hvagent")
    assert not p.persistent
    assert p.reason == (f"{root}/var/lib/hvagent is on tmpfs ({ram}), the upper directory "
                        f"of the overlay at {root}: state is lost at power-off")
    assert p.warnings == [STATE_IN_RAM_WARNING]


def test_overlay_with_upper_on_disk_is_persistent(disk: Path, tmp_path: Path,
                                                  mounts: list[Path]) -> None:
    root = overlay(tmp_path / "root", disk, mounts)
    p = state_persistence(root)
    assert p.persistent, p.reason
    assert f"{root} is on overlay ({root}) whose upper directory {disk}/upper is on" \
        in p.reason


def test_bind_mount_is_judged_by_what_it_shows(disk: Path, tmp_path: Path,
                                               mounts: list[Path]) -> None:
    ram = tmpfs(tmp_path / "ram", mounts)
    (ram / "data").mkdir()
    from_ram = bind(ram / "data", tmp_path / "b1", mounts)
    from_disk = bind(disk, tmp_path / "b2", mounts)
    p = state_persistence(from_ram)
    assert not p.persistent and p.reason.startswith(f"{from_ram} is on tmpfs ({from_ram})")
    assert state_persistence(from_disk).persistent


def test_disk_mounted_over_a_ram_directory_is_persistent(disk: Path, tmp_path: Path,
                                                         mounts: list[Path]) -> None:
    # A COREHOST-DATA disk mounted on /var/lib/hvagent of the diskless root.
    ram = tmpfs(tmp_path / "ram", mounts)
    root = overlay(tmp_path / "root", ram, mounts)
    state = root / "var" / "lib" / "hvagent"
    state.mkdir(parents=True)
    assert not state_persistence(state).persistent
    bind(disk, state, mounts)
    assert state_persistence(state).persistent


def test_symlink_is_judged_where_it_leads(tmp_path: Path, mounts: list[Path]) -> None:
    ram = tmpfs(tmp_path / "ram", mounts)
    link = tmp_path / "state"
    link.symlink_to(ram)
    assert not state_persistence(link).persistent


def test_upper_directory_out_of_sight_is_not_persistent() -> None:
    # The initramfs mounted the tmpfs of the upper directory and did not move it into
    # the root: nothing here vouches for it.
    text = ("1 0 0:20 / / rw - overlay overlay rw,lowerdir=/ro,upperdir=/nowhere/seen/up,"
            "workdir=/nowhere/seen/work\n")
    p = state_persistence(Path("/var/lib/hvagent"), text)
    assert not p.persistent
    assert "upper directory /nowhere/seen/up cannot be found" in p.reason
    assert p.warnings == [STATE_IN_RAM_WARNING]


def test_read_only_image_and_kernel_views_are_not_persistent() -> None:
    text = ("1 0 7:0 / / ro - squashfs /dev/loop0 ro\n"
            "2 1 0:5 / /proc rw - proc proc rw\n")
    assert not state_persistence(Path("/var/lib/hvagent"), text).persistent
    assert not state_persistence(Path("/proc/x"), text).persistent


def test_mount_points_with_escaped_characters(tmp_path: Path, mounts: list[Path]) -> None:
    ram = tmpfs(tmp_path / "with space\tand tab", mounts)
    p = state_persistence(ram)
    assert not p.persistent and f"({ram})" in p.reason


def _mountinfo_type(path: Path) -> str:
    # stat -f names ext2/ext3/ext4 all "ext2/ext3"; mountinfo's name is the one shown.
    best = ""
    kind = ""
    for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        p = m.point.rstrip("/") or "/"
        if (p == "/" or str(path) == p or str(path).startswith(p + "/")) and len(p) >= len(best):
            best, kind = p, m.fstype
    return kind
