"""Offline access to the file systems inside a VM's disk image, in any format.

Owns the session around one operation: refuse an image in use, find the partition
(MBR/GPT, hvagent.disk.parttable), expose it as raw bytes and hand it to the ext or FAT
back end. Writes go in two phases: the change plan is worked out against a read-only
view (so every refusal happens before anything is opened for writing; even opening a
VHDX writable changes its headers), then carried out on a writable view of just that
partition and checked with e2fsck -n / fsck.fat -n.

Views come from a qemu-storage-daemon FUSE export (in place). Without /dev/fuse (or
with HVDISK_NO_FUSE=1) a non-raw image is converted to a raw copy, edited and converted
back, which is refused when it would drop internal snapshots or a backing chain, unless
forced.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hvagent.disk import image as img
from hvagent.disk import vhd
from hvagent.disk.errors import DiskError
from hvagent.disk.export import fuse_available, fuse_export
from hvagent.disk.extfs import ExtFS
from hvagent.disk.fatfs import FatFS
from hvagent.disk.image import ImageFormat
from hvagent.disk.parttable import Partition, pick_partition, read_partitions
from hvagent.disk.volume import Plan, Volume

T = TypeVar("T")
GuestFS = ExtFS | FatFS


def parse_target(spec: str) -> tuple[Path, int | None]:
    """'disk.vhdx@2' -> (disk.vhdx, 2); 'disk.vhdx' -> (disk.vhdx, None)."""
    base, sep, num = spec.rpartition("@")
    if sep and num.isdigit() and base:
        return Path(base), int(num)
    return Path(spec), None


def make_fs(vol: Volume) -> GuestFS:
    if vol.fs.startswith("ext"):
        return ExtFS(vol)
    if vol.fs == "vfat":
        return FatFS(vol)
    raise DiskError(f"partition {vol.part.number}: unsupported file system {vol.fs}")


def _reader(path: Path) -> Callable[[int, int], bytes]:
    fh = path.open("rb")

    def read(offset: int, length: int) -> bytes:
        try:
            fh.seek(offset)
            return fh.read(length)
        except OSError as exc:
            raise DiskError(f"read error at byte {offset}: {exc.strerror} "
                            "(truncated or corrupt image)") from exc

    return read


def disk_layout(raw: Path) -> tuple[str, list[Partition]]:
    size = raw.stat().st_size if raw.is_file() else os.stat(raw).st_size
    return read_partitions(_reader(raw), size)


@contextmanager
def _named(image: Path) -> Iterator[None]:
    """Errors about what is inside the image name the image."""
    try:
        yield
    except DiskError as exc:
        if str(exc).startswith(str(image)):
            raise
        raise type(exc)(f"{image}: {exc}") from exc


class GuestImage:
    """One image and (optionally) a partition number; see the module docstring."""

    def __init__(self, image: Path, partition: int | None = None, *,
                 fuse: bool | None = None, force: bool = False) -> None:
        self.image = image
        self.partition = partition
        self.fmt = img.detect_format(image)
        self.use_fuse = fuse_available() if fuse is None else fuse
        self.force = force

    # -- checks before anything is opened ------------------------------------------------
    def _precheck(self, *, write: bool) -> None:
        img.ensure_not_in_use(self.image)
        if write and not os.access(self.image, os.W_OK):
            raise DiskError(f"{self.image}: not writable")
        if self.fmt is ImageFormat.VHD:
            # qemu's VHD driver is lenient; do not edit a VHD whose metadata is broken.
            rep = vhd.check(self.image)
            if not rep.ok:
                raise DiskError(f"{self.image}: corrupt VHD: {rep.errors[0]}")
        elif write and self.fmt in (ImageFormat.QCOW2, ImageFormat.VHDX):
            res = img.check(self.image)
            if not res.ok:
                raise DiskError(f"{self.image}: corrupt {self.fmt.value}: {res.errors[0]}")

    def _volume(self, raw: Path) -> Volume:
        _scheme, parts = disk_layout(raw)
        part = pick_partition(parts, self.partition)
        return Volume(raw, part.start, part)

    @contextmanager
    def _read_view(self) -> Iterator[Path]:
        """A read-only raw view of the whole disk."""
        if self.use_fuse:
            with fuse_export(self.image, self.fmt, writable=False) as raw:
                yield raw
        elif self.fmt is ImageFormat.RAW:
            yield self.image
        else:
            img.image_info(self.image, self.fmt)  # takes QEMU's lock: refuses a busy image
            with tempfile.TemporaryDirectory(prefix="hvdisk-") as work:
                raw = Path(work) / "disk.raw"
                img.convert(self.image, raw, ImageFormat.RAW, src_format=self.fmt)
                yield raw

    # -- the two kinds of operations ---------------------------------------------------
    def layout(self) -> tuple[str, list[Partition]]:
        return self.read_disk(disk_layout)

    def read_disk(self, fn: Callable[[Path], T]) -> T:
        """Call fn with a read-only raw view of the whole disk (several partitions)."""
        with _named(self.image):
            self._precheck(write=False)
            with self._read_view() as raw:
                return fn(raw)

    def read(self, fn: Callable[[GuestFS], T]) -> T:
        return self.read_disk(lambda raw: fn(make_fs(self._volume(raw))))

    def write(self, plan_fn: Callable[[GuestFS, Plan], None]) -> Plan:
        """Plan on a read-only view, then apply and verify. Returns the plan carried out
        (empty: nothing needed changing and the image was not opened for writing)."""
        with _named(self.image):
            return self._write(plan_fn)

    def _write(self, plan_fn: Callable[[GuestFS, Plan], None]) -> Plan:
        self._precheck(write=True)
        plan = Plan()
        if self.use_fuse:
            with fuse_export(self.image, self.fmt, writable=False) as raw:
                vol = self._volume(raw)
                fs = make_fs(vol)
                fs.check_clean()
                plan_fn(fs, plan)
            if not plan:
                return plan
            window = (vol.part.start, vol.part.size)
            with fuse_export(self.image, self.fmt, writable=True, window=window) as part:
                fs = make_fs(Volume(part, 0, vol.part))
                fs.execute(plan)
                fs.verify()
            return plan
        if self.fmt is ImageFormat.RAW:
            img.image_info(self.image, self.fmt)  # QEMU's lock
            fs = make_fs(self._volume(self.image))
            fs.check_clean()
            plan_fn(fs, plan)
            if plan:
                fs.execute(plan)
                fs.verify()
            return plan
        return self._write_via_raw_copy(plan_fn, plan)

    def repair(self) -> str:
        """Repair the file system in place (e2fsck -fy / fsck.fat -a): 'clean' or
        'repaired'. Needs the FUSE export or a raw image."""
        with _named(self.image):
            self._precheck(write=True)
            if self.fmt is ImageFormat.RAW and not self.use_fuse:
                img.image_info(self.image, self.fmt)  # QEMU's lock
                return make_fs(self._volume(self.image)).repair()
            if not self.use_fuse:
                raise DiskError("repair needs /dev/fuse for a non-raw image")
            with fuse_export(self.image, self.fmt, writable=False) as raw:
                part = self._volume(raw).part
            with fuse_export(self.image, self.fmt, writable=True,
                             window=(part.start, part.size)) as view:
                fs = make_fs(Volume(view, 0, part))
                result = fs.repair()
                fs.verify()
            return result

    def _write_via_raw_copy(self, plan_fn: Callable[[GuestFS, Plan], None],
                            plan: Plan) -> Plan:
        info = img.image_info(self.image, self.fmt)
        lost = []
        if info.snapshots:
            lost.append(f"{len(info.snapshots)} internal snapshot(s)")
        if info.backing_file:
            lost.append(f"its backing file {info.backing_file} (the chain would be flattened)")
        if lost and not self.force:
            raise DiskError(f"{self.image}: editing without FUSE converts the image and would "
                            f"lose {' and '.join(lost)}; pass --force to accept")
        with tempfile.TemporaryDirectory(prefix=".hvdisk-", dir=self.image.parent) as work:
            raw = Path(work) / "disk.raw"
            img.convert(self.image, raw, ImageFormat.RAW, src_format=self.fmt)
            fs = make_fs(self._volume(raw))
            fs.check_clean()
            plan_fn(fs, plan)
            if not plan:
                return plan
            fs.execute(plan)
            fs.verify()
            img.convert(raw, self.image, self.fmt, src_format=ImageFormat.RAW,
                        fixed=info.subformat == "fixed", overwrite=True)
        return plan


# -- the operations, as the CLI and the agent call them -----------------------------------
def ls(image: GuestImage, path: str) -> list[dict[str, object]]:
    return image.read(lambda fs: fs.ls(path))


def stat(image: GuestImage, path: str, *, follow: bool = False) -> dict[str, object]:
    return image.read(lambda fs: fs.stat(path, follow))


def cat(image: GuestImage, path: str) -> bytes:
    return image.read(lambda fs: fs.cat(path))


def get(image: GuestImage, path: str, dest: Path) -> None:
    image.read(lambda fs: fs.get(path, dest))


def put(image: GuestImage, src: Path, path: str, *, mode: int | None = None,
        uid: int | None = None, gid: int | None = None) -> Plan:
    return image.write(lambda fs, plan: fs.plan_put(src, path, plan, mode=mode, uid=uid,
                                                    gid=gid))


def rm(image: GuestImage, path: str, *, recursive: bool = False) -> Plan:
    return image.write(lambda fs, plan: fs.plan_rm(path, plan, recursive=recursive))


def mkdir(image: GuestImage, path: str, *, parents: bool = False, mode: int = 0o755,
          uid: int = 0, gid: int = 0) -> Plan:
    def plan_fn(fs: GuestFS, plan: Plan) -> None:
        fs.plan_mkdir(path, plan, parents=parents, mode=mode, uid=uid, gid=gid)
    return image.write(plan_fn)


def chmod(image: GuestImage, path: str, mode: int) -> Plan:
    return image.write(lambda fs, plan: fs.plan_chmod(path, mode, plan))


def chown(image: GuestImage, path: str, uid: int | None, gid: int | None) -> Plan:
    return image.write(lambda fs, plan: fs.plan_chown(path, uid, gid, plan))


def apply_tree(image: GuestImage, tree: Path, dest: str = "/", *,
               owner: tuple[int, int] | None = (0, 0)) -> Plan:
    """Copy the host directory `tree` into the guest under `dest`: directories are
    created or reused (following guest symlinks such as /lib -> usr/lib), files are
    replaced, symlinks recreated. Modes come from the host; owners are `owner`, or the
    host's when owner is None."""
    if not tree.is_dir():
        raise DiskError(f"--tree {tree}: not a directory")

    def plan_fn(fs: GuestFS, plan: Plan) -> None:
        base = fs.resolve(dest)
        if base.entry is None or base.entry.kind != "dir":
            raise DiskError(f"{dest}: not an existing directory in the guest")
        for root, dirs, files in os.walk(tree):
            dirs.sort()
            rel = Path(root).relative_to(tree)
            gdir = base.path if rel == Path(".") else f"{base.path.rstrip('/')}/{rel}"
            for name in [*dirs]:
                host = Path(root) / name
                hst = host.lstat()
                uid, gid = owner if owner else (hst.st_uid, hst.st_gid)
                gpath = f"{gdir.rstrip('/')}/{name}"
                if host.is_symlink():
                    fs.plan_symlink(os.readlink(host), gpath, plan, uid=uid, gid=gid)
                    dirs.remove(name)  # never descend through a host symlink
                    continue
                r = fs.resolve(gpath)
                if r.entry is None:
                    fs.plan_mkdir(gpath, plan, mode=hst.st_mode & 0o7777, uid=uid, gid=gid)
                elif r.entry.kind != "dir":
                    raise DiskError(f"{gpath}: exists in the guest and is not a directory")
            for name in sorted(files):
                host = Path(root) / name
                hst = host.lstat()
                uid, gid = owner if owner else (hst.st_uid, hst.st_gid)
                gpath = f"{gdir.rstrip('/')}/{name}"
                if host.is_symlink():
                    fs.plan_symlink(os.readlink(host), gpath, plan, uid=uid, gid=gid)
                elif host.is_file():
                    fs.plan_put(host, gpath, plan, mode=hst.st_mode & 0o7777,
                                uid=uid if fs.kind == "ext" else None,
                                gid=gid if fs.kind == "ext" else None)
                else:
                    raise DiskError(f"{host}: only files, directories and symlinks are copied")

    return image.write(plan_fn)
