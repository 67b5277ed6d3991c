"""Disk image files: format detection, info, create, convert, resize, check, compare.

Built on qemu-img, plus what it lacks: a fixed VHD is recognised by its footer (qemu-img
probes it as raw, which would read the footer as disk data), VHD sizes are exact
(`force_size`), VHD and VHDX resize through a conversion round-trip, and VHD has a
`check` (hvagent.disk.vhd). Every output is written to a temporary file beside the
target and renamed into place, so a failed or interrupted operation leaves no
half-written image. It also owns "is this image in use" (QEMU's image locks, open
file descriptors of other processes, and hvdisk's own session lock) and the overlay
commit that makes an offline edit all or nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from hvagent.disk.errors import DiskError, ImageInUse
from hvagent.disk.progress import Progress, no_progress

# Imports are kept to what `hvdisk convert` needs: its cost is paid on every run, next
# to qemu-img's own (tempfile, dataclasses and the VHD/VHDX parsers load on use).

QEMU_IMG = "qemu-img"
VHD_COOKIE = b"conectix"  # hvagent.disk.vhd.COOKIE, here so that probing skips that parser


class ImageFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    VHD = "vhd"
    VHDX = "vhdx"

    @property
    def qemu(self) -> str:
        """The driver name qemu uses for this format."""
        return "vpc" if self is ImageFormat.VHD else self.value

    @classmethod
    def from_qemu(cls, driver: str) -> ImageFormat:
        """The format of a qemu driver name ("vpc" is VHD)."""
        return cls.VHD if driver == "vpc" else cls(driver)


class ImageInfo(NamedTuple):
    path: str
    format: ImageFormat
    subformat: str | None  # "fixed"/"dynamic" for VHD and VHDX
    virtual_size: int
    actual_size: int
    backing_file: str | None = None
    snapshots: tuple[str, ...] = ()
    dirty: bool = False

    def to_dict(self) -> dict[str, object]:
        return self._asdict()


class CheckResult(NamedTuple):
    path: str
    format: ImageFormat
    ok: bool
    errors: list[str]
    leaks: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return self._asdict()


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'10G', '512M', '1048576' -> bytes (binary units); must be a multiple of 512."""
    m = _SIZE_RE.match(text)
    if not m:
        raise DiskError(f"size {text!r}: expected a number with an optional K/M/G/T suffix")
    mult = 1024 ** ("KMGTP".index(m.group(2).upper()) + 1) if m.group(2) else 1
    size = int(float(m.group(1)) * mult)
    if size <= 0 or size % 512:
        raise DiskError(f"size {text!r}: must be a positive multiple of 512 bytes")
    return size


def _lock_error(stderr: str) -> bool:
    return "lock" in stderr and ("Failed to get" in stderr or "Is another process" in stderr)


def run_tool(cmd: Sequence[str], what: str, *, path: Path | None = None,
             input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run an external tool; a failure becomes a one-line DiskError naming `what`."""
    try:
        proc = subprocess.run(list(cmd), input=input, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise DiskError(f"{cmd[0]} is not installed (needed to {what})") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        if path is not None and _lock_error(err):
            raise ImageInUse(f"{path}: in use by another process (it holds QEMU's image lock)")
        raise DiskError(f"{what}: {last_line(err) or f'{cmd[0]} exited {proc.returncode}'}")
    return proc


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else ""
    return re.sub(r"^(qemu-img|qemu-storage-daemon): ", "", msg)


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
    qemu-img / qemu-storage-daemon open as well (see run_tool)."""
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


def detect_format(path: Path) -> ImageFormat:
    """The format from the file's own magic (never from its name)."""
    if not path.exists():
        raise DiskError(f"{path}: no such file")
    if not path.is_file() and not path.is_block_device():
        raise DiskError(f"{path}: not a regular file or block device")
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[:4] == b"QFI\xfb":
        return ImageFormat.QCOW2
    if head == b"vhdxfile":
        return ImageFormat.VHDX
    if head == VHD_COOKIE:
        return ImageFormat.VHD
    if path.is_file():
        from hvagent.disk import vhd

        if vhd.is_vhd(path) == "fixed":
            return ImageFormat.VHD
    return ImageFormat.RAW


def image_info(path: Path, fmt: ImageFormat | None = None, *, force_share: bool = False
               ) -> ImageInfo:
    fmt = fmt or detect_format(path)
    cmd = [QEMU_IMG, "info", "--output", "json", "-f", fmt.qemu, str(path)]
    if force_share:
        cmd.insert(2, "-U")
    data = json.loads(run_tool(cmd, f"read {path}", path=path).stdout)
    sub = None
    if fmt is ImageFormat.VHD:
        from hvagent.disk import vhd

        sub = vhd.is_vhd(path)
    elif fmt is ImageFormat.VHDX and path.is_file():
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


def _create_opts(fmt: ImageFormat, fixed: bool) -> list[str]:
    if fmt is ImageFormat.VHD:
        # force_size: keep the exact byte size instead of rounding to CHS geometry.
        return ["-o", f"force_size=on,subformat={'fixed' if fixed else 'dynamic'}"]
    if fmt is ImageFormat.VHDX:
        return ["-o", f"subformat={'fixed' if fixed else 'dynamic'}"]
    if fixed:
        return ["-o", "preallocation=falloc" if fmt is ImageFormat.RAW else "preallocation=full"]
    return []


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


def create(path: Path, fmt: ImageFormat, size: int, *, fixed: bool = False,
           overwrite: bool = False) -> ImageInfo:
    if size % 512:
        raise DiskError(f"size {size}: must be a multiple of 512 bytes")
    with staged_output(path, overwrite=overwrite) as tmp:
        run_tool([QEMU_IMG, "create", "-q", "-f", fmt.qemu, *_create_opts(fmt, fixed),
                  str(tmp), str(size)], f"create {path}")
    info = image_info(path, fmt)
    if info.virtual_size != size:
        raise DiskError(f"{path}: created with {info.virtual_size} bytes instead of {size}")
    return info


def _run_with_progress(cmd: list[str], what: str, progress: Progress, path: Path) -> None:
    """Run `qemu-img ... -p`, turning its "(12.34/100%)" updates into progress calls."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    buf = b""
    # read1 (not read): return what is there, so progress shows as it comes.
    while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        for part in parts:
            m = re.search(rb"\((\d+(?:\.\d+)?)/100%\)", part)
            if m:
                progress(float(m.group(1)) / 100.0)
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        if _lock_error(err):
            raise ImageInUse(f"{path}: in use by another process (it holds QEMU's image lock)")
        raise DiskError(f"{what}: {last_line(err) or 'qemu-img failed'}")
    progress(1.0)


def convert(src: Path, dst: Path, to: ImageFormat, *, fixed: bool | None = None,
            src_format: ImageFormat | None = None, overwrite: bool = False,
            progress: Progress = no_progress, compress: bool = False,
            check_holders: bool = True) -> ImageInfo:
    """Convert `src` into a new image `dst`; zero areas stay unallocated (sparse).
    check_holders=False: the caller already checked `src` and holds its session lock
    (a refused rival may still have it open for an instant)."""
    src_fmt = src_format or detect_format(src)
    if check_holders:
        ensure_not_in_use(src)
    if fixed is None:
        fixed = False
    cmd = [QEMU_IMG, "convert", "-p", "-f", src_fmt.qemu, "-O", to.qemu,
           *_create_opts(to, fixed)]
    if compress:
        if to is not ImageFormat.QCOW2:
            raise DiskError("--compress: only qcow2 output can be compressed")
        cmd.append("-c")
    with staged_output(dst, overwrite=overwrite) as tmp:
        # -n would keep mkstemp's empty file; qemu-img creates the file itself.
        tmp.unlink()
        _run_with_progress([*cmd, str(src), str(tmp)], f"convert {src}", progress, src)
    return image_info(dst, to)


def create_overlay(base: Path, fmt: ImageFormat, overlay: Path) -> None:
    """A new qcow2 file that records writes and reads everything else from `base`."""
    run_tool([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(base.resolve()),
              "-F", fmt.qemu, str(overlay)], f"create a copy-on-write overlay of {base}",
             path=base)


def commit_overlay(overlay: Path, base: Path) -> None:
    """Write the clusters `overlay` holds into its backing file `base`. -d keeps the
    overlay intact, so a commit that was cut short can simply be run again."""
    run_tool([QEMU_IMG, "commit", "-q", "-d", "-f", "qcow2", str(overlay)],
             f"commit the edit into {base}", path=base)


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
    if info.format in (ImageFormat.QCOW2, ImageFormat.RAW):
        if info.snapshots and size < info.virtual_size:
            raise DiskError(f"{path}: cannot shrink an image with internal snapshots")
        cmd = [QEMU_IMG, "resize", "-q", "-f", info.format.qemu]
        if shrink:
            cmd.append("--shrink")
        run_tool([*cmd, str(path), str(size)], f"resize {path}", path=path)
        return image_info(path, info.format)
    import tempfile

    fixed = info.subformat == "fixed"
    with tempfile.TemporaryDirectory(prefix=".resize.", dir=path.parent) as work:
        mid = Path(work) / "mid.qcow2"
        convert(path, mid, ImageFormat.QCOW2, src_format=info.format,
                progress=lambda d: progress(d * 0.5))
        cmd = [QEMU_IMG, "resize", "-q", "-f", "qcow2"] + (["--shrink"] if shrink else [])
        run_tool([*cmd, str(mid), str(size)], f"resize {path}")
        convert(mid, path, info.format, fixed=fixed, src_format=ImageFormat.QCOW2,
                overwrite=True, progress=lambda d: progress(0.5 + d * 0.5))
    return image_info(path, info.format)


def check(path: Path) -> CheckResult:
    """Consistency of the image's metadata (not of the file systems inside it)."""
    fmt = detect_format(path)
    if fmt is ImageFormat.RAW:
        return CheckResult(str(path), fmt, True, [], note="raw images carry no metadata")
    if fmt is ImageFormat.VHD:
        from hvagent.disk import vhd

        rep = vhd.check(path)
        return CheckResult(str(path), fmt, rep.ok, rep.errors,
                           note=f"{rep.disk_type}, {rep.allocated_blocks}/{rep.total_blocks} "
                                "blocks allocated" if rep.disk_type != "fixed" else "fixed")
    proc = subprocess.run(
        [QEMU_IMG, "check", "--output", "json", "-f", fmt.qemu, str(path)],
        capture_output=True, check=False,
    )
    err = proc.stderr.decode(errors="replace")
    if _lock_error(err):
        raise ImageInUse(f"{path}: in use by another process (it holds QEMU's image lock)")
    try:
        data = json.loads(proc.stdout or b"{}")
    except ValueError:
        data = {}
    errors: list[str] = []
    if proc.returncode not in (0, 3) or not data:
        errors.append(last_line(err) or f"qemu-img check exited {proc.returncode}")
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
    cmd = [QEMU_IMG, "compare", "-f", fa.qemu, "-F", fb.qemu]
    proc = subprocess.run([*cmd, str(a), str(b)], capture_output=True, check=False)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode == 0:
        return True, "images are identical"
    if proc.returncode == 1:
        return False, last_line(out)
    if _lock_error(out):
        raise ImageInUse(f"{a} or {b}: in use by another process")
    raise DiskError(f"compare {a} {b}: {last_line(out)}")
