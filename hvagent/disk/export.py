"""Exposing any image format as a plain raw file, in place, without the host kernel
mounting anything: qemu-storage-daemon's FUSE export. Owns the daemon's lifetime (it
dies with us, via PR_SET_PDEATHSIG) and translates its lock failures into ImageInUse.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hvagent.disk.errors import DiskError, ImageInUse
from hvagent.disk.image import ImageFormat, last_line

QSD = "qemu-storage-daemon"
NO_FUSE_ENV = "HVDISK_NO_FUSE"  # "1": behave as if /dev/fuse were missing
START_TIMEOUT = 30.0


def fuse_available() -> bool:
    if os.environ.get(NO_FUSE_ENV, "") not in ("", "0"):
        return False
    return os.access("/dev/fuse", os.R_OK | os.W_OK) and shutil.which(QSD) is not None


def _die_with_parent() -> None:
    # SIGTERM (not KILL) so the daemon still flushes image metadata if we are killed.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _mounted(mp: Path, parent_dev: int) -> bool:
    try:
        return os.stat(mp).st_dev != parent_dev
    except OSError:
        return False


def reap_stale_exports() -> None:
    """Unmount exports whose daemon was killed outright (SIGKILL leaves a dead FUSE
    mount behind: "transport endpoint is not connected") and drop their directories."""
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
        subprocess.run(["fusermount3", "-uz", fields[1]], capture_output=True, check=False)
        shutil.rmtree(os.path.dirname(fields[1]), ignore_errors=True)


@contextmanager
def fuse_export(image: Path, fmt: ImageFormat, *, writable: bool,
                window: tuple[int, int] | None = None) -> Iterator[Path]:
    """A raw view of `image` (or of the byte range `window` = (offset, size) of its
    guest-visible disk) at a temporary path, for as long as the block runs."""
    reap_stale_exports()
    work = Path(tempfile.mkdtemp(prefix="hvdisk-"))
    mp = work / "disk.raw"
    mp.touch()
    ro = not writable
    devs = [
        {"driver": "file", "filename": str(image.resolve()), "node-name": "file0",
         "read-only": ro},
        {"driver": fmt.qemu, "file": "file0", "node-name": "disk0", "read-only": ro},
    ]
    node = "disk0"
    if window is not None:
        devs.append({"driver": "raw", "file": "disk0", "node-name": "part0", "read-only": ro,
                     "offset": window[0], "size": window[1]})
        node = "part0"
    cmd = [QSD]
    for d in devs:
        cmd += ["--blockdev", json.dumps(d)]
    cmd += ["--export", json.dumps({
        "type": "fuse", "id": "exp0", "node-name": node, "mountpoint": str(mp),
        "writable": writable, "growable": False,
    })]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    try:
        parent_dev = os.stat(work).st_dev
        deadline = time.monotonic() + START_TIMEOUT
        while not _mounted(mp, parent_dev):
            if proc.poll() is not None:
                assert proc.stderr is not None
                err = proc.stderr.read().decode(errors="replace")
                if "lock" in err:
                    raise ImageInUse(
                        f"{image}: in use by another process (it holds QEMU's image lock)")
                raise DiskError(f"{image}: cannot open as {fmt.value}: {last_line(err)}")
            if time.monotonic() > deadline:
                raise DiskError(f"{image}: {QSD} did not export the image in time")
            time.sleep(0.005)
        yield mp
    finally:
        closing_err: bytes = b""
        if proc.poll() is None:
            proc.terminate()  # it flushes and unmounts, then exits 0
            try:
                _out, closing_err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr and not proc.stderr.closed:
            proc.stderr.close()
        if _mounted(mp, os.stat(work).st_dev):
            # The daemon died without unmounting: drop the dead mount lazily.
            subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    # Reached only when the block succeeded: a failed final flush must not pass silently.
    if writable and proc.returncode != 0:
        raise DiskError(f"{image}: {QSD} failed while closing the image: "
                        f"{last_line(closing_err.decode(errors='replace')) or proc.returncode}")
