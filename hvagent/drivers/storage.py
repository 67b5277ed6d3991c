"""The storage driver: every qemu-img and qemu-storage-daemon command the agent and hvdisk
run, as typed functions over the one process runner (hvagent.host.run).

- qemu-img: info, create (exact VHD sizes: `force_size`), convert (with progress),
  commit, resize, check, compare, internal snapshots. A failure is a one-line DiskError
  naming what was being done, with qemu-img's own last line; QEMU's image lock refusing
  an open is ImageInUse.
- qemu-storage-daemon: `fuse_export` shows any image format (or a byte range of its
  disk) as a raw file at a temporary path, in place, with no kernel mount and no root;
  the daemon dies with us (PR_SET_PDEATHSIG).

Imports are kept to what `hvdisk convert` needs (json, tempfile, ctypes load on use): its
cost is paid on every run, next to qemu-img's own.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

from hvagent.errors import DiskError, ImageInUse
from hvagent.host import run
from hvagent.host.formats import QEMU_IMG, DiskFormat, create_options

QSD = "qemu-storage-daemon"
# Seconds. Metadata work (info, snapshots, a sparse create) is quick; work over every
# byte of a disk (convert, commit, check, a preallocated create) is bounded only so that
# a hung tool ends some day.
QUICK = 300.0
WHOLE_DISK = 24 * 3600.0
NO_FUSE_ENV = "HVDISK_NO_FUSE"  # "1": behave as if /dev/fuse were missing
EXPORT_START_TIMEOUT = 30.0
EXPORT_CLOSE_TIMEOUT = 30.0

Progress = Callable[[float], None]  # the fraction done, 0.0 .. 1.0
SnapshotOp = Literal["create", "apply", "delete"]
_SNAPSHOT_FLAG = {"create": "-c", "apply": "-a", "delete": "-d"}
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def last_line(text: str) -> str:
    """The line of a tool's output that says why, without the tool's name."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else ""
    return re.sub(r"^(qemu-img|qemu-storage-daemon): ", "", msg)


def lock_refused(stderr: str) -> bool:
    """qemu-img or qemu-storage-daemon could not take QEMU's image lock."""
    return "lock" in stderr and ("Failed to get" in stderr or "Is another process" in stderr)


def in_use(path: Path | str) -> ImageInUse:
    return ImageInUse(f"{path}: in use by another process (it holds QEMU's image lock)")


def _qemu_img(args: Sequence[str | os.PathLike[str]], what: str, *,
              path: Path | str | None = None, timeout: float = QUICK,
              ok: tuple[int, ...] = (0,)) -> run.Completed:
    """Run qemu-img; an exit status outside `ok` is a DiskError naming `what` (an
    ImageInUse when it is QEMU's lock refusing `path`)."""
    try:
        done = run.run([QEMU_IMG, *args], timeout=timeout, check=False)
    except run.ProcessFailed as e:
        if "could not be started" in e.message:
            raise DiskError(f"{QEMU_IMG} is not installed (needed to {what})") from None
        raise  # a timeout: the host failed, not the request
    if done.returncode not in ok:
        err = done.err
        if path is not None and lock_refused(err):
            raise in_use(path)
        raise DiskError(f"{what}: {last_line(err) or f'{QEMU_IMG} exited {done.returncode}'}")
    return done


def tool(argv: Sequence[str | os.PathLike[str]], what: str, *, timeout: float = QUICK,
         env: dict[str, str] | None = None, input: bytes | None = None) -> run.Completed:
    """Run one of the offline tools (debugfs, e2fsck, mtools, fsck.fat, a decompressor)
    and hand back what it answered, whatever its exit status: each back end reads its
    own tool's verdict. A missing tool is a DiskError saying so."""
    try:
        return run.run(argv, timeout=timeout, check=False, env=env, input=input)
    except run.ProcessFailed as e:
        if "could not be started" in e.message:
            raise DiskError(f"{Path(str(argv[0])).name} is not installed (needed to "
                            f"{what})") from None
        raise


def copy_sparse(src: Path, dst: Path) -> None:
    """A copy of an image file: a reflink where the file system has them, else sparse."""
    done = tool(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)],
                f"copy {src}", timeout=WHOLE_DISK)
    if done.returncode != 0:
        raise DiskError(f"copy {src}: {last_line(done.err) or f'cp exited {done.returncode}'}")


# -- qemu-img ------------------------------------------------------------------------------
def info(path: Path | str, fmt: DiskFormat | None = None, *, force_share: bool = False,
         what: str | None = None) -> dict[str, Any]:
    """`qemu-img info` of one image, as qemu-img's JSON. Without `fmt` qemu-img probes
    it (which takes a fixed VHD for raw: see hvagent.disk.image.detect_format)."""
    args: list[str | Path] = ["info", "--output", "json"]
    if force_share:
        args.append("-U")  # a running VM may hold it
    if fmt is not None:
        args += ["-f", fmt.qemu]
    done = _qemu_img([*args, str(path)], what or f"read {path}", path=path)
    import json

    data: dict[str, Any] = json.loads(done.stdout)
    return data


def backing_chain(path: Path | str) -> list[dict[str, Any]]:
    """`qemu-img info --backing-chain` (the image first), shared: a VM may run on it."""
    done = _qemu_img(["info", "-U", "--backing-chain", "--output", "json", str(path)],
                     f"read the backing chain of {path}", path=path)
    import json

    chain: list[dict[str, Any]] = json.loads(done.stdout)
    return chain


def create(path: Path | str, fmt: DiskFormat, size: int, *, fixed: bool = False,
           what: str | None = None) -> None:
    """A new empty image of exactly `size` bytes at `path` (which qemu-img overwrites)."""
    _qemu_img(["create", "-q", "-f", fmt.qemu, *create_options(fmt, fixed), str(path),
               str(size)], what or f"create {path}", timeout=WHOLE_DISK if fixed else QUICK)


def create_overlay(overlay: Path | str, backing: Path | str, backing_fmt: DiskFormat, *,
                   what: str | None = None) -> None:
    """A new qcow2 `overlay` that records writes and reads everything else from
    `backing` (named as given: the overlay records that name)."""
    _qemu_img(["create", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_fmt.qemu,
               str(overlay)], what or f"create an overlay of {backing}", path=backing)


def convert(src: Path, src_fmt: DiskFormat, dst: Path, dst_fmt: DiskFormat, *,
            fixed: bool = False, compress: bool = False,
            progress: Progress | None = None) -> None:
    """Write the guest-visible content of `src` into a new image `dst` (created by
    qemu-img); zero areas stay unallocated. `progress` gets qemu-img's -p updates."""
    argv = [QEMU_IMG, "convert", "-f", src_fmt.qemu, "-O", dst_fmt.qemu,
            *create_options(dst_fmt, fixed)]
    if compress:
        argv.append("-c")
    what = f"convert {src}"
    if progress is None:
        _qemu_img([*argv[1:], str(src), str(dst)], what, path=src, timeout=WHOLE_DISK)
        return
    proc = run.spawn([*argv, "-p", str(src), str(dst)], stdout=run.PIPE, stderr=run.PIPE,
                     what=QEMU_IMG)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        buf = b""
        # read1 (not read): what is there, so progress shows as it comes.
        while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            for part in parts:
                m = _PROGRESS_RE.search(part)
                if m:
                    progress(float(m.group(1)) / 100.0)
        err = proc.stderr.read().decode(errors="replace")
        code = proc.wait()
    except BaseException:
        run.stop(proc, grace=5.0)
        raise
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    if code != 0:
        if lock_refused(err):
            raise in_use(src)
        raise DiskError(f"{what}: {last_line(err) or f'{QEMU_IMG} exited {code}'}")
    progress(1.0)


def commit(overlay: Path, base: Path) -> None:
    """Write the clusters `overlay` holds into its backing file `base`. -d keeps the
    overlay intact, so a commit that was cut short can simply be run again."""
    _qemu_img(["commit", "-q", "-d", "-f", "qcow2", str(overlay)],
              f"commit the edit into {base}", path=base, timeout=WHOLE_DISK)


def resize(path: Path, fmt: DiskFormat, size: int, *, shrink: bool = False,
           what: str | None = None) -> None:
    """Change the virtual size (qcow2 and raw only: qemu-img refuses VHD and VHDX)."""
    args = ["resize", "-q", "-f", fmt.qemu] + (["--shrink"] if shrink else [])
    _qemu_img([*args, str(path), str(size)], what or f"resize {path}", path=path)


class CheckOutput(NamedTuple):
    returncode: int
    report: dict[str, Any]  # qemu-img's JSON ({} when it wrote none)
    stderr: str


def check(path: Path, fmt: DiskFormat) -> CheckOutput:
    """`qemu-img check` as it answered (exit 2 and 3 are findings, not failures)."""
    done = run.run([QEMU_IMG, "check", "--output", "json", "-f", fmt.qemu, str(path)],
                   timeout=WHOLE_DISK, check=False)
    if lock_refused(done.err):
        raise in_use(path)
    import json

    try:
        report = json.loads(done.stdout or b"{}")
    except ValueError:
        report = {}
    return CheckOutput(done.returncode, report if isinstance(report, dict) else {}, done.err)


def compare(a: Path, fa: DiskFormat, b: Path, fb: DiskFormat) -> tuple[bool, str]:
    """(identical, why) for the guest-visible content of two images."""
    done = run.run([QEMU_IMG, "compare", "-f", fa.qemu, "-F", fb.qemu, str(a), str(b)],
                   timeout=WHOLE_DISK, check=False)
    out = done.out + done.err
    if done.returncode == 0:
        return True, "images are identical"
    if done.returncode == 1:
        return False, last_line(out)
    if lock_refused(out):
        raise ImageInUse(f"{a} or {b}: in use by another process")
    raise DiskError(f"compare {a} {b}: {last_line(out)}")


def snapshot(path: Path | str, op: SnapshotOp, tag: str) -> None:
    """Create, apply (revert the image to) or delete the internal snapshot `tag` of a
    qcow2 image no QEMU has open."""
    _qemu_img(["snapshot", _SNAPSHOT_FLAG[op], tag, str(path)],
              f"{op} snapshot {tag} of {path}", path=path)


def snapshot_tags(path: Path | str) -> set[str]:
    """The internal snapshots of an image (shared: a VM may run on it)."""
    return {str(s.get("name", "")) for s in info(path, force_share=True).get("snapshots", [])}


# -- qemu-storage-daemon -------------------------------------------------------------------
def fuse_available() -> bool:
    import shutil

    if os.environ.get(NO_FUSE_ENV, "") not in ("", "0"):
        return False
    return os.access("/dev/fuse", os.R_OK | os.W_OK) and shutil.which(QSD) is not None


def _die_with_parent() -> None:
    import ctypes
    import signal

    # SIGTERM (not KILL) so the daemon still flushes image metadata if we are killed.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _mounted(mp: Path, parent_dev: int) -> bool:
    try:
        return os.stat(mp).st_dev != parent_dev
    except OSError:
        return False


def _unmount_lazily(mountpoint: str) -> None:
    run.run(["fusermount3", "-uz", mountpoint], timeout=QUICK, check=False)


def reap_stale_exports() -> None:
    """Unmount exports whose daemon was killed outright (SIGKILL leaves a dead FUSE
    mount behind: "transport endpoint is not connected") and drop their directories."""
    import errno
    import shutil
    import tempfile

    prefix = os.path.join(tempfile.gettempdir(), "hvdisk-")
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    for line in mounts:
        fields = line.split()
        if len(fields) < 3 or not fields[2].startswith("fuse") or not fields[1].startswith(
                prefix):
            continue
        try:
            os.stat(fields[1])
            continue  # alive: another session's export
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                continue
        _unmount_lazily(fields[1])
        shutil.rmtree(os.path.dirname(fields[1]), ignore_errors=True)


@contextmanager
def fuse_export(image: Path, fmt: DiskFormat, *, writable: bool,
                window: tuple[int, int] | None = None) -> Iterator[Path]:
    """A raw view of `image` (or of the byte range `window` = (offset, size) of its
    guest-visible disk) at a temporary path, for as long as the block runs. A failed
    final flush of a writable export is a DiskError once the block has succeeded."""
    import json
    import shutil
    import tempfile

    reap_stale_exports()
    work = Path(tempfile.mkdtemp(prefix="hvdisk-"))
    mp = work / "disk.raw"
    mp.touch()
    ro = not writable
    devs: list[dict[str, Any]] = [
        {"driver": "file", "filename": str(image.resolve()), "node-name": "file0",
         "read-only": ro},
        {"driver": fmt.qemu, "file": "file0", "node-name": "disk0", "read-only": ro},
    ]
    node = "disk0"
    if window is not None:
        devs.append({"driver": "raw", "file": "disk0", "node-name": "part0", "read-only": ro,
                     "offset": window[0], "size": window[1]})
        node = "part0"
    argv = [QSD]
    for d in devs:
        argv += ["--blockdev", json.dumps(d)]
    argv += ["--export", json.dumps({
        "type": "fuse", "id": "exp0", "node-name": node, "mountpoint": str(mp),
        "writable": writable, "growable": False,
    })]
    try:
        proc = run.spawn(argv, stderr=run.PIPE, preexec_fn=_die_with_parent)
    except run.ProcessFailed as e:
        shutil.rmtree(work, ignore_errors=True)
        raise DiskError(f"{image}: {e.message}") from None
    closing_err = b""
    try:
        parent_dev = os.stat(work).st_dev
        deadline = time.monotonic() + EXPORT_START_TIMEOUT
        while not _mounted(mp, parent_dev):
            if proc.poll() is not None:
                assert proc.stderr is not None
                err = proc.stderr.read().decode(errors="replace")
                if "lock" in err:
                    raise in_use(image)
                raise DiskError(f"{image}: cannot open as {fmt.label}: {last_line(err)}")
            if time.monotonic() > deadline:
                raise DiskError(f"{image}: {QSD} did not export the image in time")
            time.sleep(0.005)
        yield mp
    finally:
        if proc.poll() is None:
            proc.terminate()  # it flushes and unmounts, then exits 0
            try:
                _out, closing_err = proc.communicate(timeout=EXPORT_CLOSE_TIMEOUT)
            except run.TimeoutExpired:
                run.stop(proc, grace=EXPORT_CLOSE_TIMEOUT)
        if proc.stderr and not proc.stderr.closed:
            proc.stderr.close()
        if _mounted(mp, os.stat(work).st_dev):
            # The daemon died without unmounting: drop the dead mount lazily.
            _unmount_lazily(str(mp))
        shutil.rmtree(work, ignore_errors=True)
    # Reached only when the block succeeded: a failed final flush must not pass silently.
    if writable and proc.returncode != 0:
        why = last_line((closing_err or b"").decode(errors="replace")) or proc.returncode
        raise DiskError(f"{image}: {QSD} failed while closing the image: {why}")
