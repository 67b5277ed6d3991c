"""`corehost write-usb`: a built usb image onto a whole-disk block device, read back and
compared, with an optional host config placed on the disk's COREHOST-CFG partition.

Every check runs before the device is opened for writing (`refusal`): a refused write
has written nothing. The checks read only /proc and /sys, so a test can ask whether a
device would be refused without any risk to it. The device is then held open with
O_EXCL from the first byte written to the last byte verified, so nothing can mount it
(or a partition of it) in between.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvagent.errors import InvalidRequest
from hvagent.host import run as runner
from hvagent.host.formats import QEMU_IMG
from hvagent.host.hostconfig import CONFIG_FILE, CONFIG_PARTITION, HostConfigError, load_file

log = logging.getLogger(__name__)

CHUNK = 4 << 20
# Flush to the stick this often, so progress shows what the stick has taken, not what the
# page cache has, and the last fsync is not a long silent wait.
SYNC_EVERY = 16 * CHUNK
SECTOR = 512
TOOL_TIMEOUT = 60.0

MOUNTINFO = Path("/proc/self/mountinfo")
SWAPS = Path("/proc/swaps")
SYS_DEV_BLOCK = Path("/sys/dev/block")


class WriteRefused(InvalidRequest):
    """The image, the device or the config cannot be used; nothing was written."""


class WriteFailed(Exception):
    """The write or its verification failed; the device holds an unknown mix."""


class Interrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP arrived; `signum` says which, the message what the device
    holds now."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int  # bytes from the start of the disk
    size: int


@dataclass(frozen=True)
class Written:
    device: str
    size: int
    sha256: str
    config_partition: Partition | None


# ---------------------------------------------------------------- block devices via /sys


def _devno(value: str) -> tuple[int, int] | None:
    major, _, minor = value.strip().partition(":")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def _sys(dev: tuple[int, int]) -> Path:
    """The device's directory in /sys/class/block (resolved: a partition's lies inside
    its disk's)."""
    return (SYS_DEV_BLOCK / f"{dev[0]}:{dev[1]}").resolve()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _is_partition(sysdir: Path) -> bool:
    return (sysdir / "partition").exists()


def _partitions(sysdir: Path) -> list[Path]:
    return sorted(p for p in sysdir.iterdir() if p.is_dir() and _is_partition(p))


def _devno_of(sysdir: Path) -> tuple[int, int] | None:
    return _devno(_read(sysdir / "dev"))


def _whole_disks(dev: tuple[int, int], depth: int = 0) -> set[tuple[int, int]]:
    """The whole disks under a block device: a partition's disk; for a device-mapper or
    md device, the disks of what it is made of (slaves/)."""
    sysdir = _sys(dev)
    if not sysdir.exists() or depth > 8:
        return set()
    if _is_partition(sysdir):
        parent = _devno_of(sysdir.parent)
        return {parent} if parent else set()
    slaves = sorted((sysdir / "slaves").glob("*")) if (sysdir / "slaves").is_dir() else []
    disks: set[tuple[int, int]] = set()
    for s in slaves:
        sub = _devno_of(s.resolve())
        if sub:
            disks |= _whole_disks(sub, depth + 1)
    return disks or {dev}


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts() -> Iterator[tuple[tuple[int, int] | None, str, str]]:
    """(device number, source, mount point) of every mount in this namespace. The device
    number is stat()ed from the source too: btrfs reports an anonymous 0:N."""
    for line in _read(MOUNTINFO).splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            point, source = _unescape(fields[4]), _unescape(fields[sep + 2])
        except (ValueError, IndexError):
            continue
        yield _devno(fields[2]), source, point
        if source.startswith("/"):
            rdev = _rdev(source)
            if rdev:
                yield rdev, source, point


def _rdev(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISBLK(st.st_mode) else None


def root_disks() -> set[tuple[int, int]]:
    """The disks the running system is on: those under the device of / and under the
    source of the / mount."""
    disks: set[tuple[int, int]] = set()
    st = os.stat("/")
    candidates = {(os.major(st.st_dev), os.minor(st.st_dev))}
    for dev, _source, point in _mounts():
        if point == "/" and dev:
            candidates.add(dev)
    for dev in candidates:
        if dev[0] != 0:  # 0:N is an anonymous device (overlay, tmpfs), no disk
            disks |= _whole_disks(dev)
    return disks


def _logical_block(device: str) -> int:
    """The device's logical block size: what O_DIRECT reads must be multiples of."""
    dev = _rdev(device)
    value = _read(_sys(dev) / "queue" / "logical_block_size") if dev else ""
    return int(value) if value.isdigit() and int(value) > 0 else SECTOR


def _name(sysdir: Path) -> str:
    return f"/dev/{sysdir.name}"


# ---------------------------------------------------------------- the checks


def image_refusal(image: Path) -> str | None:
    """Why `image` cannot be written to a stick, or None: it must be a raw disk image."""
    try:
        st = image.stat()
    except FileNotFoundError:
        return f"{image}: no such image"
    except OSError as e:
        return f"{image}: cannot read: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return f"{image}: not a regular file"
    if st.st_size == 0 or st.st_size % SECTOR:
        return (f"{image}: {st.st_size} bytes is not a whole number of {SECTOR}-byte sectors: "
                "not a disk image (truncated?)")
    try:
        with image.open("rb") as f:
            f.seek(-SECTOR, os.SEEK_END)
            footer = f.read(8)
    except OSError as e:
        return f"{image}: cannot read: {e.strerror or e}"
    try:
        info = json.loads(runner.run([QEMU_IMG, "info", "--output=json", "--", str(image)],
                                     timeout=TOOL_TIMEOUT).out)
        fmt = str(info.get("format", "unknown"))
    except runner.ProcessFailed as e:
        return f"{image}: {e}"
    except ValueError:
        return f"{image}: qemu-img info gave no JSON"
    if fmt == "raw" and footer == b"conectix":
        fmt = "vpc"  # a fixed VHD: raw data with a footer qemu-img does not probe for
    if fmt != "raw":
        label = {"vpc": "vhd"}.get(fmt, fmt)
        return (f"{image} is a {label} image; write-usb writes a raw disk: use the build's "
                "usb output (out/<profile>/<profile>.usb.img)")
    return None


def config_partition(disk: Path | str) -> Partition | None:
    """The partition whose GPT name is COREHOST-CFG on a disk or disk image, or None.
    WriteRefused when it has no readable partition table."""
    try:
        out = runner.run(["sfdisk", "--json", str(disk)], timeout=TOOL_TIMEOUT).out
        table = json.loads(out)["partitiontable"]
    except runner.ProcessFailed as e:
        raise WriteRefused(f"{disk}: no partition table sfdisk can read ({e})") from None
    except (ValueError, KeyError, TypeError):
        raise WriteRefused(f"{disk}: sfdisk --json gave no partition table") from None
    sector = int(table.get("sectorsize", SECTOR))
    found = [p for p in table.get("partitions", []) if p.get("name") == CONFIG_PARTITION]
    if len(found) > 1:
        raise WriteRefused(f"{disk}: {len(found)} partitions are named {CONFIG_PARTITION}")
    if not found:
        return None
    p = found[0]
    node = str(p.get("node", ""))
    digits = len(node) - len(node.rstrip("0123456789"))
    number = int(node[-digits:]) if digits else 0
    return Partition(number=number, offset=int(p["start"]) * sector,
                     size=int(p["size"]) * sector)


def config_refusal(config: Path, image: Path) -> str | None:
    """Why `config` cannot go onto a stick written with `image`, or None: it must be a
    valid host config and the image must have a COREHOST-CFG partition holding a FAT."""
    if not config.is_file():
        return f"--config {config}: no such file"
    try:
        load_file(config)
    except HostConfigError as e:
        return f"--config {e}"
    try:
        part = config_partition(image)
    except WriteRefused as e:
        return str(e)
    if part is None:
        return (f"{image}: no partition named {CONFIG_PARTITION}, so --config has nowhere "
                "to go (is it an image of this version's usb output?)")
    try:
        runner.run(["minfo", "-i", f"{image}@@{part.offset}", "::"], timeout=TOOL_TIMEOUT,
                   env=_mtools_env())
    except runner.ProcessFailed as e:
        if e.returncode is None:  # mtools missing or hung: not the image's fault
            return f"--config needs mtools: {e}"
        return f"{image}: partition {part.number} ({CONFIG_PARTITION}) holds no FAT file system"
    return None


def _holder(sysdir: Path) -> str | None:
    holders = sysdir / "holders"
    names = sorted(h.name for h in holders.iterdir()) if holders.is_dir() else []
    return f"/dev/{names[0]}" if names else None


def device_refusal(device: Path, image_size: int | None = None) -> str | None:
    """Why `device` must not be written, or None. Reads /proc and /sys only (and opens
    the device read-only with O_EXCL to see whether someone else holds it)."""
    shown = str(device)
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return f"{device}: no such device"
    except OSError as e:
        return f"{device}: {e.strerror or e}"
    if not stat.S_ISBLK(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else \
            "a directory" if stat.S_ISDIR(st.st_mode) else "not a disk"
        return f"{device} is not a block device ({kind}); give a whole disk such as /dev/sdb"
    dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    sysdir = _sys(dev)
    if not sysdir.exists():
        return f"{device}: block device {dev[0]}:{dev[1]} is not in {SYS_DEV_BLOCK}"
    real = _name(sysdir)
    if real != os.path.realpath(device):
        shown = f"{device} ({real})"
    disk = sysdir.parent if _is_partition(sysdir) else sysdir
    disk_dev = _devno_of(disk)
    if disk_dev in root_disks():
        what = shown if disk == sysdir else f"{shown}, a partition of {_name(disk)},"
        return f"{what} is the disk this system runs from"
    if disk != sysdir:
        return f"{shown} is a partition of {_name(disk)}; give the whole disk"
    parts = [sysdir, *_partitions(sysdir)]
    numbers = {d: p for p in parts if (d := _devno_of(p))}
    for mdev, _source, point in _mounts():
        if mdev in numbers:
            part = numbers[mdev]
            who = shown if part == sysdir else f"{shown}: {_name(part)}"
            return f"{who} is mounted on {point}; unmount it first"
    for line in _read(SWAPS).splitlines()[1:]:
        name = line.split()[0] if line.split() else ""
        sdev = _rdev(_unescape(name))
        if sdev in numbers:
            part = numbers[sdev]
            who = shown if part == sysdir else f"{shown}: {_name(part)}"
            return f"{who} is used as swap; swapoff it first"
    for part in parts:
        holder = _holder(part)
        if holder:
            who = shown if part == sysdir else f"{shown}: {_name(part)}"
            return f"{who} is held by {holder} (LVM, md or dm-crypt); release it first"
    if _read(sysdir / "ro") == "1":
        return f"{shown} is read-only (a write-protect switch?)"
    size = int(_read(sysdir / "size") or 0) * SECTOR
    if image_size is not None and size < image_size:
        return (f"{shown} is smaller than the image ({_mib(size)} < {_mib(image_size)})")
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        return _open_refusal(shown, e)
    os.close(fd)
    return None


def _open_refusal(shown: str, e: OSError) -> str:
    if e.errno == errno.EBUSY:
        return f"{shown} is in use (it cannot be opened exclusively)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{shown}: permission denied (writing a disk needs root)"
    return f"{shown}: cannot open: {e.strerror or e}"


def refusal(device: Path, image: Path, config: Path | None = None) -> str | None:
    """Why writing `image` (and `config`) onto `device` is refused, or None. Writes
    nothing, anywhere."""
    reason = image_refusal(image)
    if reason is None and config is not None:
        reason = config_refusal(config, image)
    if reason is None:
        reason = device_refusal(device, image.stat().st_size)
    return reason


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 << 20 else f"{n / 2**20:.0f} MiB"


def _mtools_env() -> dict[str, str]:
    # A stick's FAT may come from any formatter; mtools' geometry checks are for floppies.
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


# ---------------------------------------------------------------- progress


class ByteProgress:
    """Bytes done of a total: a rich bar (bytes, rate, time left) on a terminal, else a
    plain line at every further 10 %, like builder.progress for builds."""

    def __init__(self, title: str, total: int, terminal: bool | None = None) -> None:
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.title = title
        self.total = max(total, 1)
        self.done = 0
        self.started = time.monotonic()
        self._next_tenth = 1
        self._progress: Any = None  # rich.progress.Progress, imported only on a terminal
        self._task: Any = None

    def __enter__(self) -> ByteProgress:
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                DownloadColumn(binary_units=True), TransferSpeedColumn(),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
            return
        while self._next_tenth <= 10 and self.done * 10 >= self._next_tenth * self.total:
            took = time.monotonic() - self.started
            rate = self.done / took / 2**20 if took > 0 else 0.0
            # One write per line: print() writes the newline separately, and a Ctrl-C
            # between the two would glue the next message onto this line.
            sys.stderr.write(f"[{took:6.1f}s] {self.title}: {self._next_tenth * 10}% "
                             f"({_mib(self.done)} of {_mib(self.total)}, {rate:.0f} MiB/s)\n")
            sys.stderr.flush()
            self._next_tenth += 1


# ---------------------------------------------------------------- writing


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _copy(image: Path, fd: int, size: int, progress: ByteProgress) -> str:
    """Every byte of `image` (holes too: the stick may hold old data) onto `fd`; its
    sha256."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = unsynced = 0
    with image.open("rb", buffering=0) as src:
        while done < size:
            n = src.readinto(buf)
            if not n:
                raise WriteFailed(f"{image} ended at byte {done} while being written "
                                  f"(expected {size} bytes)")
            n = min(n, size - done)
            digest.update(view[:n])
            _write_all(fd, view[:n])
            done += n
            unsynced += n
            if unsynced >= SYNC_EVERY:
                os.fdatasync(fd)
                unsynced = 0
            progress.advance(n)
    os.fsync(fd)
    return digest.hexdigest()


def _first_difference(a: bytes | memoryview, b: bytes | memoryview) -> int:
    a, b = memoryview(a), memoryview(b)
    lo, hi = 0, min(len(a), len(b))
    # Halve towards the first differing byte (slices compare in C).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def _open_direct(device: str) -> tuple[int, bool]:
    try:
        return os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return os.open(device, os.O_RDONLY | os.O_CLOEXEC), False


def _verify(image: Path, device: str, write_fd: int, size: int, expected: str,
            block: int, progress: ByteProgress) -> str:
    """Reads `size` bytes back from the stick itself, not the page cache, and compares
    them with the image; the stick's sha256."""
    # Dirty pages are on the stick after the fsync; dropping the clean ones makes even a
    # buffered read (no O_DIRECT) go to the device.
    os.posix_fadvise(write_fd, 0, 0, os.POSIX_FADV_DONTNEED)
    fd, direct = _open_direct(device)
    digest = hashlib.sha256()
    aligned = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    try:
        with image.open("rb") as src:
            done = 0
            while done < size:
                want = min(CHUNK, size - done)
                ask = -(-want // block) * block if direct else want
                got = os.preadv(fd, [memoryview(aligned)[:ask]], done)
                theirs = src.read(want)
                ours = aligned[:min(got, want)]
                if ours != theirs:
                    at = done + _first_difference(ours, theirs)
                    if got < want and ours == theirs[:len(ours)]:
                        raise WriteFailed(f"verify failed at byte {at}: {device} ended early")
                    raise WriteFailed(f"verify failed at byte {at} (sector {at // SECTOR}): "
                                      f"{device} does not hold what was written")
                digest.update(ours)
                done += want
                progress.advance(want)
    finally:
        aligned.close()
        os.close(fd)
    got_sha = digest.hexdigest()
    if got_sha != expected:
        raise WriteFailed(f"verify failed at the end: {device} reads back sha256 {got_sha}, "
                          f"the image was {expected} as written ({image} changed meanwhile?)")
    return got_sha


def _place_config(config: Path, device: str, fd: int) -> Partition:
    """`config` as corehost.yaml on the device's COREHOST-CFG partition, read back."""
    try:
        part = config_partition(device)
    except WriteRefused as e:
        raise WriteFailed(f"after the write, {e}") from None
    if part is None:
        raise WriteFailed(f"after the write, {device} shows no {CONFIG_PARTITION} partition")
    target = f"{device}@@{part.offset}"
    try:
        runner.run(["mcopy", "-o", "-i", target, str(config), f"::{CONFIG_FILE}"],
                   timeout=TOOL_TIMEOUT, env=_mtools_env())
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        back = runner.run(["mtype", "-i", target, f"::{CONFIG_FILE}"], timeout=TOOL_TIMEOUT,
                          env=_mtools_env()).stdout
    except runner.ProcessFailed as e:
        raise WriteFailed(f"placing {config} on {device} partition {part.number}: {e}") from None
    if back != config.read_bytes():
        raise WriteFailed(f"{CONFIG_FILE} on {device} partition {part.number} reads back "
                          f"different from {config}")
    return part


def _reread_partitions(fd: int) -> None:
    """Best effort: the kernel's view of the new partition table (BLKRRPART), so
    /dev/sdb1... match what was written. Loop devices without partscan refuse it."""
    import fcntl

    blkrrpart = 0x125F
    try:
        fcntl.ioctl(fd, blkrrpart)
    except OSError as e:
        log.debug("BLKRRPART: %s", e.strerror or e)


def write(image: Path, device: Path, *, config: Path | None = None,
          terminal: bool | None = None) -> Written:
    """Writes `image` onto `device`, verifies it, then places `config`. WriteRefused
    (nothing written), WriteFailed, or Interrupted (saying what the device holds)."""
    phase = "nothing was written"
    try:
        reason = refusal(device, image, config)
        if reason is not None:
            raise WriteRefused(reason)
        size = image.stat().st_size
        path = os.path.realpath(device)
        block = _logical_block(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            raise WriteRefused(_open_refusal(str(device), e)) from None
        try:
            phase = f"{device} is partially written"
            with ByteProgress(f"write {device}", size, terminal) as progress:
                image_sha = _copy(image, fd, size, progress)
            phase = f"{device} is fully written but not verified"
            with ByteProgress(f"verify {device}", size, terminal) as progress:
                sha = _verify(image, path, fd, size, image_sha, block, progress)
            part = None
            if config is not None:
                phase = f"{device} is written and verified, its {CONFIG_FILE} partially"
                part = _place_config(config, path, fd)
            _reread_partitions(fd)
        except OSError as e:
            raise WriteFailed(f"writing {image} to {device}: {e.strerror or e} ({phase})") \
                from None
        finally:
            os.close(fd)
    except KeyboardInterrupt as e:
        raise Interrupted(f"interrupted: {phase}",
                          int(getattr(e, "signum", signal.SIGINT))) from None
    return Written(device=str(device), size=size, sha256=sha, config_partition=part)
