"""`corehost write-usb` against real loop devices: a verified write of every byte, the host
config on the COREHOST-CFG partition, every refusal leaving the target as it was, and an
interrupted write saying so.

Needs root and loop devices. The disk this machine runs from is only ever given to the
pure check first; the command sees it only once that check has refused it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder import usb
from hvagent.host import run as runner

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0
MiB = 1 << 20

# One worker runs this file in order under `pytest -n` (its fixtures are shared).
pytestmark = [pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists(),
    reason="needs root and loop devices"), pytest.mark.xdist_group("write_usb")]

# The usb output's layout, small: BIOS boot, ESP, COREHOST-CFG (16 MiB FAT), root last.
CFG_START = 20480  # sector of partition 3, as sgdisk places it below
CFG_SECTORS = 32768
LAYOUT = ["-n1:2048:+1M", "-t1:EF02", "-c1:bios", "-n2:0:+8M", "-t2:EF00", "-c2:ESP",
          "-n3:0:+16M", "-t3:0700", f"-c3:{usb.CONFIG_PARTITION}", "-n4:0:0", "-t4:8300",
          "-c4:cloudimg-rootfs"]
VALID_CONFIG = "version: 1\nhostname: kvm-07\ntime: {servers: [ntp.example.org]}\n"


def sh(*argv: str | Path) -> runner.Completed:
    return runner.run(argv, timeout=TIMEOUT)


def corehost(*args: str | Path) -> runner.Completed:
    return runner.run([sys.executable, "-m", "builder.cli", *args], timeout=TIMEOUT,
                      check=False, cwd=REPO)


def sha256(path: str | Path, length: int, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 4 * MiB))
            assert chunk, f"{path} ended {left} bytes early"
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
        f.write(os.urandom(size % (4 * MiB)))
    return path


def make_image(path: Path, size: int) -> Path:
    """A raw GPT disk like the usb output, with random data here and there and holes
    (all zeros, never written) in between."""
    with path.open("wb") as f:
        f.truncate(size)
    sh("sgdisk", *LAYOUT, path)
    sh("mformat", "-i", f"{path}@@{CFG_START * 512}", "-T", str(CFG_SECTORS), "-h", "64",
       "-s", "32", "-v", "COREHOSTCFG", "::")
    with path.open("r+b") as f:
        for at in (1 * MiB, 3 * MiB, 30 * MiB, size - 10 * MiB):  # bios, ESP, root, root
            f.seek(at)
            f.write(os.urandom(MiB))
    return path


def mkfs(dev: str, tmp_path: Path) -> None:
    """An ext4 with a directory sub/, mounted read-only by the tests: a read-write ext4
    writes to its device in the background (lazy init, journal), so hashes would move."""
    content = tmp_path / "fs-content"
    (content / "sub").mkdir(parents=True, exist_ok=True)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", content,
       dev)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("image") / "ci.usb.img", 64 * MiB)


class Loops:
    """Loop devices and mounts made by a test, undone in reverse order."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack

    def attach(self, backing: Path) -> str:
        dev = sh("losetup", "-f", "--show", backing).out.strip()
        self.stack.callback(sh, "losetup", "-d", dev)
        return dev

    def partitions(self, dev: str) -> None:
        sh("partx", "-a", dev)  # creates /dev/loopNpM on this kernel (losetup -P does not)
        self.stack.callback(sh, "partx", "-d", dev)

    def mount(self, source: str | Path, target: Path, *options: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        sh("mount", *options, source, target)
        self.stack.callback(self.umount, target)

    def umount(self, target: Path) -> None:
        if os.path.ismount(target):
            sh("umount", target)


@pytest.fixture()
def loops() -> Iterator[Loops]:
    with contextlib.ExitStack() as stack:
        yield Loops(stack)


@pytest.fixture()
def target(tmp_path: Path, loops: Loops) -> Callable[..., str]:
    """A loop device over a file of old, random data, larger than the image by default."""

    def make(size: int = 96 * MiB, name: str = "stick") -> str:
        return loops.attach(random_file(tmp_path / name, size))

    return make


def assert_refused(proc: runner.Completed, *expected: str) -> str:
    lines = proc.err.strip().splitlines()
    assert proc.returncode == 2, proc.err
    assert len(lines) == 1, proc.err
    for text in expected:
        assert text in lines[0]
    assert proc.out == ""
    return lines[0]


# ---------------------------------------------------------------- writing


def test_every_byte_is_written_and_read_back(image: Path, target: Callable[..., str]) -> None:
    dev = target()
    size = image.stat().st_size
    tail_before = sha256(dev, 32 * MiB, offset=size)

    proc = corehost("write-usb", image, dev)

    assert proc.returncode == 0, proc.err
    want = sha256(image, size)
    # The holes too: the stick held random data where the image has zeros.
    assert sha256(dev, size) == want
    assert sha256(dev, 32 * MiB, offset=size) == tail_before  # nothing past the image
    assert f"sha256 {want}" in proc.out.splitlines()
    assert "verified" in proc.out
    # Not a terminal: plain progress lines, up to 100 %, for the write and the read-back.
    assert re.search(rf"write {dev}: 10% ", proc.err), proc.err
    assert re.search(rf"write {dev}: 100% ", proc.err), proc.err
    assert re.search(rf"verify {dev}: 100% ", proc.err), proc.err


def test_config_lands_on_the_cfg_partition(image: Path, target: Callable[..., str],
                                           tmp_path: Path) -> None:
    dev = target()
    config = tmp_path / "site.yaml"
    config.write_text(VALID_CONFIG)
    size = image.stat().st_size

    proc = corehost("write-usb", image, dev, "--config", config)

    assert proc.returncode == 0, proc.err
    back = sh("mtype", "-i", f"{dev}@@{CFG_START * 512}", f"::{usb.CONFIG_FILE}").out
    assert back == VALID_CONFIG
    # Outside its partition the stick is the image.
    cfg_start, cfg_end = CFG_START * 512, (CFG_START + CFG_SECTORS) * 512
    assert sha256(dev, cfg_start) == sha256(image, cfg_start)
    assert sha256(dev, size - cfg_end, cfg_end) == sha256(image, size - cfg_end, cfg_end)
    assert "config:" in proc.out


# ---------------------------------------------------------------- refusals


def test_a_mounted_device_is_refused(image: Path, target: Callable[..., str],
                                     loops: Loops, tmp_path: Path) -> None:
    dev = target()
    mkfs(dev, tmp_path)
    loops.mount(dev, tmp_path / "mnt", "-o", "ro")
    before = sha256(dev, 96 * MiB)

    line = assert_refused(corehost("write-usb", image, dev), "is mounted on", "unmount")

    assert str(tmp_path / "mnt") in line
    assert sha256(dev, 96 * MiB) == before


@pytest.mark.parametrize("how", ["symlink", "bind mount only", "device node gone"])
def test_a_mounted_device_is_found_by_its_number(how: str, image: Path,
                                                 target: Callable[..., str], loops: Loops,
                                                 tmp_path: Path) -> None:
    dev = target()
    mkfs(dev, tmp_path)
    given = dev
    if how == "symlink":  # like /dev/disk/by-id/usb-...
        loops.mount(dev, tmp_path / "mnt", "-o", "ro")
        given = str(tmp_path / "usb-Stick_0123")
        os.symlink(dev, given)
    elif how == "bind mount only":
        loops.mount(dev, tmp_path / "mnt", "-o", "ro")
        loops.mount(tmp_path / "mnt" / "sub", tmp_path / "bound", "--bind")
        sh("umount", tmp_path / "mnt")
    else:  # mountinfo's source names a node that no longer exists; only 7:N is left
        st = os.stat(dev)
        node = tmp_path / "node"
        os.mknod(node, 0o600 | 0o060000, st.st_rdev)
        loops.mount(node, tmp_path / "mnt", "-o", "ro")
        node.unlink()
    before = sha256(dev, 96 * MiB)

    assert_refused(corehost("write-usb", image, given), "is mounted on")

    assert sha256(dev, 96 * MiB) == before


@pytest.fixture()
def partitioned(tmp_path: Path, loops: Loops) -> str:
    """A loop device with a GPT and /dev/loopNp1 holding an ext4."""
    backing = random_file(tmp_path / "disk", 96 * MiB)
    sh("sgdisk", "-n1:2048:+32M", "-t1:8300", backing)
    dev = loops.attach(backing)
    loops.partitions(dev)
    mkfs(f"{dev}p1", tmp_path)
    return dev


def test_a_disk_with_a_mounted_partition_is_refused(image: Path, partitioned: str,
                                                    loops: Loops, tmp_path: Path) -> None:
    loops.mount(f"{partitioned}p1", tmp_path / "mnt", "-o", "ro")
    before = sha256(partitioned, 96 * MiB)

    assert_refused(corehost("write-usb", image, partitioned),
                   f"{partitioned}p1 is mounted on {tmp_path / 'mnt'}")

    assert sha256(partitioned, 96 * MiB) == before


def test_a_partition_is_refused(image: Path, partitioned: str) -> None:
    before = sha256(partitioned, 96 * MiB)

    assert_refused(corehost("write-usb", image, f"{partitioned}p1"),
                   f"is a partition of {partitioned}", "whole disk")

    assert sha256(partitioned, 96 * MiB) == before


def test_a_device_in_use_is_refused(image: Path, target: Callable[..., str]) -> None:
    dev = target()
    before = sha256(dev, 96 * MiB)
    held = os.open(dev, os.O_RDONLY | os.O_EXCL)  # as a mount or another writer holds it
    try:
        assert_refused(corehost("write-usb", image, dev), "in use")
    finally:
        os.close(held)
    assert sha256(dev, 96 * MiB) == before


def test_a_device_used_as_swap_is_refused(image: Path, target: Callable[..., str],
                                          loops: Loops) -> None:
    dev = target()
    sh("mkswap", "-q", dev)
    if runner.run(["swapon", dev], timeout=TIMEOUT, check=False).returncode != 0:
        pytest.skip("swapon is not allowed here")
    loops.stack.callback(sh, "swapoff", dev)

    assert_refused(corehost("write-usb", image, dev), "is used as swap", "swapoff")


def test_a_too_small_device_is_refused(image: Path, target: Callable[..., str]) -> None:
    dev = target(size=image.stat().st_size - MiB)
    before = sha256(dev, image.stat().st_size - MiB)

    assert_refused(corehost("write-usb", image, dev), "smaller than the image")

    assert sha256(dev, image.stat().st_size - MiB) == before


def _root_disk() -> str | None:
    """The disk under /, found here independently of the code under test."""
    st = os.stat("/")
    sysdir = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    if not sysdir.exists():
        return None
    if (sysdir / "partition").exists():
        sysdir = sysdir.parent
    node = f"/dev/{sysdir.name}"
    return node if os.path.exists(node) else None


def test_the_disk_this_system_runs_from_is_refused(image: Path) -> None:
    root = _root_disk()
    if root is None:
        pytest.skip("/ is not on a block device here")
    # SAFETY: the pure check first; the command only sees the disk once it refuses it.
    reason = usb.refusal(Path(root), image)
    assert reason is not None and "is the disk this system runs from" in reason, reason

    assert_refused(corehost("write-usb", image, root), "is the disk this system runs from")


def test_a_regular_file_is_refused(image: Path, tmp_path: Path) -> None:
    file = random_file(tmp_path / "not-a-disk", 96 * MiB)
    before = sha256(file, 96 * MiB)

    assert_refused(corehost("write-usb", image, file), "not a block device", "regular file")

    assert sha256(file, 96 * MiB) == before


def test_a_missing_device_or_image_is_refused(image: Path, target: Callable[..., str],
                                              tmp_path: Path) -> None:
    assert_refused(corehost("write-usb", image, "/dev/corehost-no-such-disk"),
                   "/dev/corehost-no-such-disk: no such device")
    dev = target()
    before = sha256(dev, 96 * MiB)
    assert_refused(corehost("write-usb", tmp_path / "nope.img", dev), "no such image")
    assert sha256(dev, 96 * MiB) == before


@pytest.mark.parametrize(("fmt", "options", "label"), [
    ("qcow2", [], "qcow2"), ("vpc", [], "vhd"), ("vpc", ["-o", "subformat=fixed"], "vhd"),
    ("vhdx", [], "vhdx")])
def test_an_image_that_is_not_raw_is_refused(fmt: str, options: list[str], label: str,
                                             image: Path, target: Callable[..., str],
                                             tmp_path: Path) -> None:
    converted = tmp_path / f"ci.{label}"
    sh("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, image, converted)
    dev = target()
    before = sha256(dev, 96 * MiB)

    assert_refused(corehost("write-usb", converted, dev), f"is a {label} image", "usb output")

    assert sha256(dev, 96 * MiB) == before


@pytest.mark.parametrize(("text", "expected"), [
    ("version: 2\n", "version"),
    ("version: 1\nhostname: -bad-\n", "hostname"),
    ("version: 1\nusers: [{name: root, ssh_authorized_keys: [not-a-key]}]\n",
     "ssh_authorized_keys"),
    ("version: 1\nnetwork: {dhcp: true}\n", "network"),
    ("- version: 1\n", "mapping"),
    ("version: [1\n", "YAML"),
    (None, "no such file"),
])
def test_a_bad_or_missing_config_is_refused_before_writing(
        text: str | None, expected: str, image: Path, target: Callable[..., str],
        tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    if text is not None:
        config.write_text(text)
    dev = target()
    before = sha256(dev, 96 * MiB)

    line = assert_refused(corehost("write-usb", image, dev, "--config", config), expected)

    assert str(config) in line
    assert sha256(dev, 96 * MiB) == before


def test_a_config_for_an_image_without_a_cfg_partition_is_refused(
        target: Callable[..., str], tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    with plain.open("wb") as f:
        f.truncate(32 * MiB)
    sh("sgdisk", "-n1:2048:0", "-t1:8300", plain)
    config = tmp_path / "site.yaml"
    config.write_text(VALID_CONFIG)
    dev = target()
    before = sha256(dev, 96 * MiB)

    assert_refused(corehost("write-usb", plain, dev, "--config", config),
                   f"no partition named {usb.CONFIG_PARTITION}")

    assert sha256(dev, 96 * MiB) == before


def test_a_config_for_an_image_whose_cfg_partition_has_no_fat_is_refused(
        target: Callable[..., str], tmp_path: Path) -> None:
    unformatted = tmp_path / "unformatted.img"
    with unformatted.open("wb") as f:
        f.truncate(64 * MiB)
    sh("sgdisk", *LAYOUT, unformatted)
    config = tmp_path / "site.yaml"
    config.write_text(VALID_CONFIG)
    dev = target()
    before = sha256(dev, 96 * MiB)

    assert_refused(corehost("write-usb", unformatted, dev, "--config", config),
                   f"({usb.CONFIG_PARTITION}) holds no FAT file system")

    assert sha256(dev, 96 * MiB) == before


# ---------------------------------------------------------------- interrupted


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Large enough that the write is far from done when its first progress line shows.
    return make_image(tmp_path_factory.mktemp("big") / "big.usb.img", 768 * MiB)


def _default_sigint() -> None:
    # A background job's children inherit SIGINT ignored; Ctrl-C must reach this one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_write_says_the_device_is_partially_written(
        sig: signal.Signals, big_image: Path, loops: Loops, tmp_path: Path) -> None:
    size = big_image.stat().st_size
    backing = tmp_path / "stick"
    with backing.open("wb") as f:
        f.truncate(size + 16 * MiB)
        f.seek(size - 64 * MiB)  # old data near the end, which an early stop leaves there
        f.write(os.urandom(MiB))
    dev = loops.attach(backing)
    proc = runner.spawn([sys.executable, "-m", "builder.cli", "write-usb", big_image, dev],
                        stdout=runner.PIPE, stderr=runner.PIPE, cwd=REPO,
                        preexec_fn=_default_sigint)
    try:
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + TIMEOUT
        while not re.search(rb"write \S+: \d+% ", seen):
            ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
            chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""
            assert chunk, f"no progress line before the write ended: {seen!r}"
            seen += chunk
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        runner.stop(proc)
    err_text = (seen + err).decode()

    assert proc.returncode == 128 + sig, err_text
    assert err_text.strip().splitlines()[-1] == \
        f"corehost: interrupted: {dev} is partially written"
    assert b"verified" not in out
    assert sha256(dev, size) != sha256(big_image, size)


def test_a_stick_that_does_not_hold_the_image_fails_verification(
        image: Path, target: Callable[..., str]) -> None:
    # A stick that lost a write: the image with one byte changed at a known place.
    dev = target()
    size = image.stat().st_size
    flipped = 30 * MiB + 12345
    with image.open("rb") as src, open(dev, "r+b") as stick:
        stick.write(src.read())
        stick.seek(flipped)
        src.seek(flipped)
        stick.write(bytes([src.read(1)[0] ^ 0xFF]))
        stick.flush()
        os.fsync(stick.fileno())
        progress = usb.ByteProgress("verify", size, terminal=False)
        with pytest.raises(usb.WriteFailed, match=rf"^verify failed at byte {flipped} "):
            usb._verify(image, dev, stick.fileno(), size, sha256(image, size), 512, progress)
