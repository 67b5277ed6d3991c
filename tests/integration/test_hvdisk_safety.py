"""hvdisk edits are all-or-nothing and one at a time, in every format and both ways of
reaching the disk (FUSE export, raw copy): concurrent writers are refused with "in use"
instead of losing updates or corrupting the file system, an edit that cannot fit leaves
the image byte-identical, and an edit killed while it commits is completed by the next
command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import disk_images as di  # noqa: E402
from test_hvdisk_edit import HVDISK, hvdisk  # noqa: E402

pytestmark = pytest.mark.integration
PATHS = {"fuse": {"HVDISK_REQUIRE_FUSE": "1", "HVDISK_NO_FUSE": "0"},
         "copy": {"HVDISK_NO_FUSE": "1"}}
VIA = {"fuse": "via a FUSE export", "copy": "via a raw copy"}


@pytest.fixture(scope="module")
def raw_gpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return di.make_raw(tmp_path_factory.mktemp("safety"), "gpt")


def env_for(way: str) -> dict[str, str]:
    return {**os.environ, **PATHS[way]}


def assert_via(proc: subprocess.CompletedProcess[bytes], way: str) -> None:
    assert VIA[way] in proc.stderr.decode(), proc.stderr.decode()


@pytest.mark.parametrize("way", list(PATHS))
@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vhdx"])
def test_concurrent_writers_one_wins_the_others_are_in_use(fmt: str, way: str,
                                                           raw_gpt: Path,
                                                           tmp_path: Path) -> None:
    d = di.TestDisk(di.convert(raw_gpt, fmt, tmp_path / f"d.{fmt}"), fmt, "gpt")
    env = env_for(way)
    srcs = []
    for i in range(3):
        src = tmp_path / f"src{i}"
        src.write_bytes(bytes([65 + i]) * (4 << 20))  # big enough for the edits to overlap
        srcs.append(src)
    contended = False
    for attempt in range(4):  # the unlocked race is narrow: give it several chances
        procs = [subprocess.Popen([*HVDISK, "put", str(d.path), str(src),
                                   f"/etc/w{attempt}-{i}"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i, src in enumerate(srcs)]
        results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
        for p in procs:
            p.stdout.close()  # type: ignore[union-attr]
            p.stderr.close()  # type: ignore[union-attr]
        winners = [i for i, (rc, _err) in enumerate(results) if rc == 0]
        losers = [i for i, (rc, _err) in enumerate(results) if rc != 0]
        assert winners, results
        for i in losers:
            rc, err = results[i]
            assert rc == 2 and "in use" in err and err.count("\n") == 1, err
        # Every edit that said it succeeded is there (no lost update); no other is.
        names = set(hvdisk("ls", d.path, "/etc").stdout.decode().split())
        for i in range(3):
            present = f"w{attempt}-{i}" in names
            assert present == (i in winners), (i, results)
        for i in winners:
            assert hvdisk("cat", d.path, f"/etc/w{attempt}-{i}").stdout == \
                srcs[i].read_bytes()
        assert di.ext_clean(d.path, fmt, tmp_path).returncode == 0
        contended = contended or bool(losers)
    assert contended, "the writers never overlapped"
    assert di.qemu_img_check_ok(d.path, fmt)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("way", list(PATHS))
@pytest.mark.parametrize("fmt", di.FORMATS)
def test_an_edit_that_does_not_fit_leaves_the_image_byte_identical(fmt: str, way: str,
                                                                   raw_gpt: Path,
                                                                   tmp_path: Path) -> None:
    d = di.TestDisk(di.convert(raw_gpt, fmt, tmp_path / f"d.{fmt}"), fmt, "gpt")
    env = env_for(way)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(di.ROOT_SIZE + (4 << 20)))  # more than the root fs holds
    tree = tmp_path / "tree"
    (tree / "opt").mkdir(parents=True)
    for i in range(3):  # each fits, together they do not
        (tree / "opt" / f"part{i}").write_bytes(os.urandom(di.ROOT_SIZE // 3))
    before = d.sha256()
    for args in (("put", d.path, big, "/big.bin"),
                 ("put", d.path, big, "/etc/hostname"),  # a replacement
                 ("put", f"{d.path}@1", big, "/big.bin"),  # the FAT ESP
                 ("apply", d.path, "--tree", tree)):
        err = hvdisk(*args, rc=2, env=env).stderr.decode()
        assert err.startswith("hvdisk: error: ") and err.count("\n") == 1, err
        assert d.sha256() == before, args
    # The image still takes an edit, through the path asked for.
    small = tmp_path / "small"
    small.write_bytes(b"fits\n")
    out = hvdisk("put", "-v", "--json", d.path, small, "/etc/small", env=env)
    assert json.loads(out.stdout)["via"] == way
    assert_via(out, way)
    assert hvdisk("cat", d.path, "/etc/small").stdout == b"fits\n"
    assert di.ext_clean(d.path, fmt, tmp_path).returncode == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx", "raw"])
def test_a_failed_write_is_rolled_back_not_just_prechecked(fmt: str, raw_gpt: Path,
                                                           tmp_path: Path) -> None:
    """Past the free-space check: a FAT partition filled by the edit itself (mtools
    fails part-way through a tree) is left as it was."""
    d = di.TestDisk(di.convert(raw_gpt, fmt, tmp_path / f"d.{fmt}"), fmt, "gpt")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(4):
        (tree / f"F{i}.BIN").write_bytes(os.urandom(di.ESP_SIZE // 3))
    before = d.sha256()
    for way in PATHS:
        proc = hvdisk("apply", f"{d.path}@1", "--tree", tree, rc=2, env=env_for(way))
        assert proc.stderr.decode().count("\n") == 1, proc.stderr.decode()
        assert d.sha256() == before, way


def _children_running(pid: int, needle: bytes) -> bool:
    """Whether a child of `pid` has `needle` in its command line."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return False
    for kid in kids:
        try:
            if needle in Path(f"/proc/{kid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_an_edit_killed_while_committing_is_completed_next_time(raw_gpt: Path,
                                                                 tmp_path: Path) -> None:
    d = di.TestDisk(di.convert(raw_gpt, "qcow2", tmp_path / "d.qcow2"), "qcow2", "gpt")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 << 20))  # the test disk's file system has room for it
    before = d.sha256()
    proc = subprocess.Popen([*HVDISK, "put", str(d.path), str(big), "/big.bin"],
                            env=env_for("fuse"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    # Watched through /proc (no pgrep per round): the commit must not slip between looks.
    while time.monotonic() < deadline and proc.poll() is None:
        if _children_running(proc.pid, b"qemu-img\0commit"):
            break
    assert proc.poll() is None, "the edit finished before it could be interrupted"
    os.killpg(proc.pid, 9)
    proc.wait(timeout=30)
    pending = d.path.parent / f".{d.path.name}.hvdisk" / "commit.qcow2"
    assert pending.exists()
    assert di.qemu_img_check_ok(d.path, "qcow2")
    # The next command, even a read, finishes the commit first: the edit is all there.
    assert hvdisk("cat", d.path, "/big.bin").stdout == big.read_bytes()
    assert not pending.parent.exists()
    assert d.sha256() != before
    assert di.qemu_img_check_ok(d.path, "qcow2")
    assert di.ext_clean(d.path, "qcow2", tmp_path).returncode == 0
