"""Disk image files: format detection, info, create, convert, resize, check, compare.

Built on qemu-img (run by hvagent.drivers.storage), plus what it lacks: a fixed VHD is
recognised by its footer (qemu-img probes it as raw, which would read the footer as disk
data), VHD sizes are exact (`force_size`), VHD and VHDX resize through a conversion
round-trip, and VHD has a `check` (hvagent.disk.vhd). Every output is written to a
temporary file beside the target and renamed into place, so a failed or interrupted
operation leaves no half-written image. It also owns "is this image in use" (QEMU's
image locks, open file descriptors of other processes, and hvdisk's own session lock)
and the overlay commit that makes an offline edit all or nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from hvagent.disk.errors import DiskError, ImageInUse
from hvagent.disk.progress import Progress, no_progress
from hvagent.drivers import storage
from hvagent.host import formats
from hvagent.host.formats import DiskFormat

# Imports are kept to what `hvdisk convert` needs: its cost is paid on every run, next
# to qemu-img's own (tempfile, dataclasses and the VHD/VHDX parsers load on use).

VHD_COOKIE = b"conectix"  # hvagent.disk.vhd.COOKIE, here so that probing skips that parser


class ImageInfo(NamedTuple):
    path: str
    format: DiskFormat
    subformat: str | None  # "fixed"/"dynamic" for VHD and VHDX
    virtual_size: int
    actual_size: int
    backing_file: str | None = None
    snapshots: tuple[str, ...] = ()
    dirty: bool = False

    def to_dict(self) -> dict[str, object]:
        return {**self._asdict(), "format": self.format.label}


class CheckResult(NamedTuple):
    path: str
    format: DiskFormat
    ok: bool
    errors: list[str]
    leaks: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {**self._asdict(), "format": self.format.label}


def parse_size(text: str) -> int:
    """'10G', '1.5M', '1048576' -> bytes (hvagent.host.formats.parse_size: binary units,
    a positive multiple of 512, as an image's size must be)."""
    try:
        return formats.parse_size(text, sectors=True)
    except ValueError as e:
        raise DiskError(str(e)) from None


def holders(path: Path) -> list[tuple[int, str]]:
    """Other processes with `path` open: (pid, command name). Covers tools that take no
    QEMU lock (dd, a hand-started qemu-nbd with locking off, ...)."""
    try:
        target = path.resolve()
        st = target.stat()
    except OSError:
        return []
    found: list[tuple[int, str]] = []
    me = str(os.getpid())
    want = str(target)
    # Plain strings and os calls: this runs before every conversion, over every fd.
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != want:
                    continue
                fst = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                try:
                    with open(f"/proc/{pid}/comm") as fh:
                        comm = fh.read().strip()
                except OSError:
                    comm = "?"
                found.append((int(pid), comm))
                break
    return found


def ensure_not_in_use(path: Path) -> None:
    """Refuse an image another process has open. QEMU's own lock is checked by every
    qemu-img / qemu-storage-daemon open as well (hvagent.drivers.storage)."""
    procs = holders(path)
    if procs:
        who = ", ".join(f"{comm}[{pid}]" for pid, comm in procs[:3])
        raise ImageInUse(f"{path}: in use by {who}")


EDIT_LOCK_NOTE = "an hvdisk or agent disk edit holds its lock"


@contextmanager
def session_lock(path: Path, *, exclusive: bool) -> Iterator[int]:
    """hvdisk's own lock on the image for a whole session: exclusive for an edit, shared
    for reading. A flock on the image file itself (so every name and link of the image
    shares it); QEMU's OFD byte-range locks on the same file are independent of it, so
    the QEMU processes a session starts are not refused by it. Refuses at once, never
    waits. Yields the locked descriptor (see upgrade_lock)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DiskError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImageInUse(f"{path}: in use by another process ({EDIT_LOCK_NOTE})") from None
        yield fd
    finally:
        os.close(fd)


def upgrade_lock(fd: int, path: Path) -> None:
    """Turn a shared session lock exclusive, or refuse as in use."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ImageInUse(f"{path}: in use by another process ({EDIT_LOCK_NOTE})") from None


def detect_format(path: Path) -> DiskFormat:
    """The format from the file's own magic (never from its name)."""
    if not path.exists():
        raise DiskError(f"{path}: no such file")
    if not path.is_file() and not path.is_block_device():
        raise DiskError(f"{path}: not a regular file or block device")
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[:4] == b"QFI\xfb":
        return DiskFormat.QCOW2
    if head == b"vhdxfile":
        return DiskFormat.VHDX
    if head == VHD_COOKIE:
        return DiskFormat.VHD
    if path.is_file():
        from hvagent.disk import vhd

        if vhd.is_vhd(path) == "fixed":
            return DiskFormat.VHD
    return DiskFormat.RAW


def image_info(path: Path, fmt: DiskFormat | None = None, *, force_share: bool = False
               ) -> ImageInfo:
    fmt = fmt or detect_format(path)
    data = storage.info(path, fmt, force_share=force_share)
    sub = None
    if fmt is DiskFormat.VHD:
        from hvagent.disk import vhd

        sub = vhd.is_vhd(path)
    elif fmt is DiskFormat.VHDX and path.is_file():
        from hvagent.disk import vhdx

        sub = vhdx.subformat(path)
    return ImageInfo(
        path=str(path),
        format=fmt,
        subformat=sub,
        virtual_size=int(data["virtual-size"]),
        actual_size=int(data.get("actual-size", 0)),
        backing_file=data.get("full-backing-filename") or data.get("backing-filename"),
        snapshots=tuple(s.get("name", "") for s in data.get("snapshots", [])),
        dirty=bool(data.get("dirty-flag", False)),
    )


@contextmanager
def staged_output(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it only when the block succeeds."""
    if target.exists() and not overwrite:
        raise DiskError(f"{target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    # (what tempfile.mkstemp does, without importing tempfile)
    for attempt in range(100):
        tmp = target.parent / f".{target.name}.{os.getpid()}.{attempt}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            continue
    else:
        raise DiskError(f"{target}: cannot create a temporary file beside it")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def create(path: Path, fmt: DiskFormat, size: int, *, fixed: bool = False,
           overwrite: bool = False) -> ImageInfo:
    if size % 512:
        raise DiskError(f"size {size}: must be a multiple of 512 bytes")
    with staged_output(path, overwrite=overwrite) as tmp:
        storage.create(tmp, fmt, size, fixed=fixed, what=f"create {path}")
    info = image_info(path, fmt)
    if info.virtual_size != size:
        raise DiskError(f"{path}: created with {info.virtual_size} bytes instead of {size}")
    return info


def convert(src: Path, dst: Path, to: DiskFormat, *, fixed: bool | None = None,
            src_format: DiskFormat | None = None, overwrite: bool = False,
            progress: Progress = no_progress, compress: bool = False,
            check_holders: bool = True) -> ImageInfo:
    """Convert `src` into a new image `dst`; zero areas stay unallocated (sparse).
    check_holders=False: the caller already checked `src` and holds its session lock
    (a refused rival may still have it open for an instant)."""
    src_fmt = src_format or detect_format(src)
    if check_holders:
        ensure_not_in_use(src)
    if compress and to is not DiskFormat.QCOW2:
        raise DiskError("--compress: only qcow2 output can be compressed")
    with staged_output(dst, overwrite=overwrite) as tmp:
        # -n would keep mkstemp's empty file; qemu-img creates the file itself.
        tmp.unlink()
        storage.convert(src, src_fmt, tmp, to, fixed=bool(fixed), compress=compress,
                        progress=None if progress is no_progress else progress)
    return _converted(dst, to, bool(fixed))


def _converted(path: Path, fmt: DiskFormat, fixed: bool) -> ImageInfo:
    """What `convert` wrote, from the file's own header: a second qemu-img run (info)
    would cost about as much as converting a small image. A new file has no backing
    file, snapshot or dirty flag; qemu-img's actual size is the allocated blocks."""
    size: int | None = None
    try:
        st = path.stat()
        if fmt is DiskFormat.RAW:
            size = st.st_size
        elif fmt is DiskFormat.VHDX:
            from hvagent.disk import vhdx

            size = vhdx.virtual_size(path)
        else:
            import struct

            with path.open("rb") as fh:
                if fmt is DiskFormat.QCOW2:
                    head = fh.read(32)
                    if head[:4] == b"QFI\xfb":
                        size = struct.unpack(">Q", head[24:32])[0]
                else:  # VHD: the footer at the end, current size at byte 48
                    fh.seek(-512, os.SEEK_END)
                    foot = fh.read(512)
                    if foot[:8] == VHD_COOKIE:
                        size = struct.unpack(">Q", foot[48:56])[0]
    except OSError:
        size = None
    if size is None:
        return image_info(path, fmt)
    sub = ("fixed" if fixed else "dynamic") if fmt in (DiskFormat.VPC, DiskFormat.VHDX) else None
    return ImageInfo(path=str(path), format=fmt, subformat=sub, virtual_size=size,
                     actual_size=st.st_blocks * 512)


def create_overlay(base: Path, fmt: DiskFormat, overlay: Path) -> None:
    """A new qcow2 file that records writes and reads everything else from `base`."""
    storage.create_overlay(overlay, base.resolve(), fmt,
                           what=f"create a copy-on-write overlay of {base}")


commit_overlay = storage.commit


def resize(path: Path, size: int, *, shrink: bool = False,
           progress: Progress = no_progress) -> ImageInfo:
    """Grow (or with shrink=True, shrink) the virtual disk. qemu-img resize refuses VHD
    and VHDX, so those go through qcow2 and back, keeping their subformat."""
    info = image_info(path)
    ensure_not_in_use(path)
    if size % 512:
        raise DiskError(f"size {size}: must be a multiple of 512 bytes")
    if size < info.virtual_size and not shrink:
        raise DiskError(
            f"{path}: {size} bytes is smaller than the current {info.virtual_size}; "
            "pass --shrink to cut the end of the disk"
        )
    if size == info.virtual_size:
        return info
    if info.format in (DiskFormat.QCOW2, DiskFormat.RAW):
        if info.snapshots and size < info.virtual_size:
            raise DiskError(f"{path}: cannot shrink an image with internal snapshots")
        storage.resize(path, info.format, size, shrink=shrink)
        return image_info(path, info.format)
    import tempfile

    fixed = info.subformat == "fixed"
    with tempfile.TemporaryDirectory(prefix=".resize.", dir=path.parent) as work:
        mid = Path(work) / "mid.qcow2"
        convert(path, mid, DiskFormat.QCOW2, src_format=info.format,
                progress=lambda d: progress(d * 0.5))
        storage.resize(mid, DiskFormat.QCOW2, size, shrink=shrink, what=f"resize {path}")
        convert(mid, path, info.format, fixed=fixed, src_format=DiskFormat.QCOW2,
                overwrite=True, progress=lambda d: progress(0.5 + d * 0.5))
    return image_info(path, info.format)


def check(path: Path) -> CheckResult:
    """Consistency of the image's metadata (not of the file systems inside it)."""
    fmt = detect_format(path)
    if fmt is DiskFormat.RAW:
        return CheckResult(str(path), fmt, True, [], note="raw images carry no metadata")
    if fmt is DiskFormat.VHD:
        from hvagent.disk import vhd

        rep = vhd.check(path)
        return CheckResult(str(path), fmt, rep.ok, rep.errors,
                           note=f"{rep.disk_type}, {rep.allocated_blocks}/{rep.total_blocks} "
                                "blocks allocated" if rep.disk_type != "fixed" else "fixed")
    returncode, data, err = storage.check(path, fmt)
    errors: list[str] = []
    if returncode not in (0, 3) or not data:
        errors.append(storage.last_line(err) or f"qemu-img check exited {returncode}")
    if data.get("corruptions"):
        errors.append(f"{data['corruptions']} corruptions")
    if data.get("check-errors"):
        errors.append(f"{data['check-errors']} errors while checking")
    leaks = int(data.get("leaks", 0))
    return CheckResult(str(path), fmt, not errors, errors, leaks=leaks,
                       note=f"{leaks} leaked clusters (harmless, reclaimable)" if leaks else "")


def compare(a: Path, b: Path, *, strict: bool = False) -> tuple[bool, str]:
    """(identical, why) for the guest-visible content of two images of any formats;
    strict also requires equal virtual sizes."""
    fa, fb = detect_format(a), detect_format(b)
    if strict:
        # (qemu-img compare -s also compares allocation, which differs between formats)
        sa, sb = image_info(a, fa).virtual_size, image_info(b, fb).virtual_size
        if sa != sb:
            return False, f"sizes differ: {sa} != {sb} bytes"
    return storage.compare(a, fa, b, fb)
