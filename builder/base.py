"""The base cache: DIB's output kept by the hash of what produced it.

A build's slow part is disk-image-create (debootstrap, every element's packages and
hooks). What it writes (the raw disk, the kernel and initramfs, the PXE root squashfs,
the dpkg manifest and its log) is kept in `$XDG_CACHE_HOME/corehost/base/<key>/`, keyed
by `inputs.base_hash`: the resolved profile, every element used, the builder's own
source, the package list (pyproject.toml) the agent's wheels come from, the DIB command
(paths normalised) and DIB's version. The agent's own source (hvagent/) is not part of
the key: a build whose base key is cached copies the base and lays the agent on it
(builder.layer) instead of running DIB. Entries are written to a temp dir and renamed
into place, read and written under a per-key lock, and the oldest beyond BASE_KEEP go.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvagent.host import run

log = logging.getLogger(__name__)

BASE_KEEP = 4
BASE_VERSION = 1
META = "base.json"
# What DIB leaves at <dib_base><suffix>; `.raw` is required, the others when made.
SUFFIXES = (".raw", ".vmlinuz", ".initrd", ".rootfs.squashfs")
MANIFESTS = ".d/dib-manifests"
COPY_TIMEOUT = 1800.0


class BaseCacheError(Exception):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "corehost" / "base"


@dataclass(frozen=True)
class Base:
    key: str
    path: Path
    meta: dict[str, Any]


@contextlib.contextmanager
def locked(key: str) -> Iterator[None]:
    """Held while an entry is looked up and copied out, or written."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key[:16]}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def lookup(key: str) -> Base | None:
    """The cached base for key, if it is complete (call under `locked`)."""
    path = cache_dir() / key[:16]
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key \
            or meta.get("version") != BASE_VERSION:
        return None
    for suffix in meta.get("files", []):
        if not (path / f"image{suffix}").is_file():
            return None
    os.utime(path)  # recently used: pruned last
    return Base(key, path, meta)


def _copy(src: Path, dst: Path) -> None:
    try:
        run.run(["cp", "--sparse=always", "--reflink=auto", "-a", "--", src, dst],
                timeout=COPY_TIMEOUT)
    except run.ProcessFailed as e:
        raise BaseCacheError(f"copying {src.name}: {e}") from None


def store(key: str, dib_base: Path, log_file: Path, meta: dict[str, Any]) -> Base:
    """Copy DIB's output at dib_base (and its log) into the cache under key (call under
    `locked`). The entry appears whole or not at all."""
    root = cache_dir()
    files = [s for s in SUFFIXES if Path(f"{dib_base}{s}").is_file()]
    if ".raw" not in files:
        raise BaseCacheError(f"DIB wrote no raw disk at {dib_base}.raw")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key[:16]}.new-"))
    try:
        for suffix in files:
            _copy(Path(f"{dib_base}{suffix}"), tmp / f"image{suffix}")
        manifests = Path(f"{dib_base}{MANIFESTS}")
        if manifests.is_dir():
            (tmp / "image.d").mkdir()
            _copy(manifests, tmp / "image.d" / "dib-manifests")
        shutil.copy2(log_file, tmp / "dib.log")
        full = {**meta, "key": key, "version": BASE_VERSION, "files": files,
                "stored": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / META).write_text(json.dumps(full, indent=2) + "\n")
        final = root / key[:16]
        if final.exists():
            old = root / f".{key[:16]}.old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(keep=BASE_KEEP)
    return Base(key, final, full)


def materialise(base: Base, dib_base: Path) -> None:
    """Copy a cached base to where DIB would have written it (dib_base + suffixes)."""
    dib_base.parent.mkdir(parents=True, exist_ok=True)
    for suffix in base.meta["files"]:
        _copy(base.path / f"image{suffix}", Path(f"{dib_base}{suffix}"))
    manifests = base.path / "image.d" / "dib-manifests"
    if manifests.is_dir():
        Path(f"{dib_base}.d").mkdir(exist_ok=True)
        _copy(manifests, Path(f"{dib_base}{MANIFESTS}"))


def prune(keep: int) -> None:
    """Drop all but the `keep` most recently used entries."""
    root = cache_dir()
    entries = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: d.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        log.debug("base cache: dropping %s", old)
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".*.new-*"):  # a store killed midway
        if time.time() - stale.stat().st_mtime > 24 * 3600:
            shutil.rmtree(stale, ignore_errors=True)
