"""The layer: a new build of the agent, and the late files (builder.late), laid onto a
cached base (builder.base).

The base's raw disk is attached to a loop device, its partitions added with `partx`
(this may run where device-mapper, and so DIB's kpartx, does not), and the root file
system (ext4, DIB's label cloudimg-rootfs) mounted. The corehost distribution the base
carries in /opt/hvagent is removed by its RECORD and the new wheel installed with pypa's
`installer` (scripts point at the image's /opt/hvagent/bin/python); its bytecode is
compiled by the image's own Python in a chroot. Late files are written whole (temporary
file, rename) with their element's permission bits, owned by root. The late steps that
copy the finished tree elsewhere are run again on it: the PXE root squashfs
(elements/pxe's cleanup.d step, the same script DIB ran). Everything is undone (unmount,
partx -d, losetup -d) whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.exceptions import InstallerError
from installer.sources import WheelFile

from builder.paths import elements_dir
from hvagent.host import run

log = logging.getLogger(__name__)

VENV = "opt/hvagent"
ROOT_LABEL = "cloudimg-rootfs"
STEP_TIMEOUT = 1800.0
# Late steps that read the finished tree: (element, script below the element).
LATE_STEPS = {"pxe": "cleanup.d/95-pxe-rootfs"}


class LayerError(Exception):
    pass


def _run(argv: list[str | Path], what: str, env: dict[str, str] | None = None) -> str:
    try:
        done = run.run(argv, timeout=STEP_TIMEOUT, check=False, env=env)
    except run.ProcessFailed as e:
        raise LayerError(f"{what}: {e}") from None
    if done.returncode != 0:
        detail = (done.err or done.out).strip().splitlines()
        raise LayerError(f"{what} failed (exit {done.returncode})"
                         + (f": {detail[-1]}" if detail else ""))
    return done.out


@contextlib.contextmanager
def mounted_root(raw: Path) -> Iterator[Path]:
    """The root file system of the disk image `raw`, mounted read-write."""
    loop = _run(["losetup", "--find", "--show", raw], f"attaching {raw.name}").strip()
    mnt = Path(tempfile.mkdtemp(prefix="corehost-layer-"))
    mounted = False
    try:
        _run(["partx", "-a", loop], f"adding the partitions of {raw.name}")
        parts = sorted(p for p in Path("/dev").glob(f"{Path(loop).name}p*"))
        root = None
        for part in parts:
            label = run.run(["blkid", "-o", "value", "-s", "LABEL", part], timeout=60,
                            check=False).out.strip()
            if label == ROOT_LABEL:
                root = part
        if root is None:
            raise LayerError(f"{raw.name}: no partition labelled {ROOT_LABEL} "
                             f"(found {', '.join(p.name for p in parts) or 'none'})")
        _run(["mount", "-t", "ext4", root, mnt], f"mounting {root}")
        mounted = True
        yield mnt
    finally:
        if mounted:
            run.run(["umount", mnt], timeout=300, check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()
        run.run(["partx", "-d", loop], timeout=60, check=False)
        run.run(["losetup", "-d", loop], timeout=60, check=False)


def site_packages(root: Path) -> Path:
    found = sorted((root / VENV / "lib").glob("python3*/site-packages"))
    if len(found) != 1:
        raise LayerError(f"the base has {len(found)} Python site-packages in /{VENV}, not one")
    return found[0]


def remove_distribution(site: Path, name: str) -> list[str]:
    """Remove an installed distribution by its RECORD (files, then its now-empty package
    directories); returns what RECORD listed. Nothing outside the venv is touched."""
    venv = site.parents[2]
    infos = sorted(site.glob(f"{name}-*.dist-info"))
    if len(infos) != 1:
        raise LayerError(f"the base has {len(infos)} {name} installations in /{VENV}")
    listed = [line.split(",")[0] for line in (infos[0] / "RECORD").read_text().splitlines()
              if line.strip()]
    dirs: set[Path] = set()
    for rel in listed:
        path = Path(os.path.normpath(site / rel))
        if not path.is_relative_to(venv):
            raise LayerError(f"{infos[0].name}/RECORD names {rel}, outside /{VENV}")
        if path.is_file() or path.is_symlink():
            path.unlink()
        dirs.update(p for p in path.parents if p.is_relative_to(site) and p != site)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        shutil.rmtree(d / "__pycache__", ignore_errors=True)
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty
    shutil.rmtree(infos[0], ignore_errors=True)
    return listed


def install_wheel(root: Path, wheel: Path) -> list[str]:
    """Install `wheel` into the image's /opt/hvagent, as pip would have; returns the
    top-level packages it installed."""
    site = site_packages(root)
    venv = root / VENV
    scheme = {"purelib": str(site), "platlib": str(site), "scripts": str(venv / "bin"),
              "headers": str(venv / "include"), "data": str(venv)}
    dest = SchemeDictionaryDestination(scheme, interpreter=f"/{VENV}/bin/python",
                                       script_kind="posix", bytecode_optimization_levels=())
    try:
        with WheelFile.open(wheel) as source:
            install(source, dest, additional_metadata={"INSTALLER": b"corehost layer\n"})
    except (InstallerError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise LayerError(f"installing {wheel.name} into /{VENV}: {e}") from None
    with zipfile.ZipFile(wheel) as z:
        tops = sorted({name.split("/")[0] for name in z.namelist()
                       if not name.split("/")[0].endswith((".dist-info", ".data"))})
    python = f"/{VENV}/bin/python"
    rel = [f"/{(site / t).relative_to(root)}" for t in tops if (site / t).is_dir()]
    _run(["chroot", root, python, "-m", "compileall", "-q", *rel],
         "compiling the agent's bytecode in the image")
    return tops


def write_late_files(root: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Write each late file (builder.late) whole into the image: a temporary file beside
    it, then a rename; owned by root as install-static leaves them."""
    for rel, (data, mode) in sorted(files.items()):
        dest = root / rel
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            raise LayerError(f"late file /{rel}: the base has something else there")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.corehost-late")
        try:
            tmp.write_bytes(data)
            os.chown(tmp, 0, 0)
            tmp.chmod(mode)
            tmp.replace(dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise LayerError(f"late file /{rel}: {e.strerror or e}") from None


def apply(dib_base: Path, wheel: Path | None, late: dict[str, tuple[bytes, int]],
          elements: list[str], note: Callable[[str], None]) -> dict[str, object]:
    """Lay `wheel` (when given) and the late files onto the base at dib_base (its .raw,
    and the late steps' outputs). Returns what was done, for the manifest."""
    steps: list[str] = []
    started = time.monotonic()
    raw = Path(f"{dib_base}.raw")
    with mounted_root(raw) as root:
        if wheel is not None:
            removed = remove_distribution(site_packages(root), "corehost")
            tops = install_wheel(root, wheel)
            steps.append(f"agent: {wheel.name} into /{VENV} ({', '.join(tops)}; "
                         f"{len(removed)} files of the base's build replaced)")
            note(f"layer: {steps[-1]}")
        if late:
            write_late_files(root, late)
            steps.append(f"late files: {', '.join('/' + p for p in sorted(late))}")
            note(f"layer: {steps[-1]}")
        for element, script in LATE_STEPS.items():
            if element not in elements:
                continue
            path = elements_dir() / element / script
            env = {**os.environ, "TARGET_ROOT": str(root), "IMAGE_NAME": str(dib_base)}
            _run([path], f"{element}/{script} on the layered tree", env=env)
            steps.append(f"{element}: {script} again")
            note(f"layer: {steps[-1]}")
    return {"steps": steps, "duration_s": round(time.monotonic() - started, 1)}
