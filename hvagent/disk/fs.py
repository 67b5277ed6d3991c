"""Offline access to the file systems inside a VM's disk image, in any format.

Owns the session around one operation: refuse an image in use, hold hvdisk's session
lock on it for the whole operation (one writer, or readers), find the partition
(MBR/GPT, hvagent.disk.parttable), expose it as raw bytes and hand it to the ext or FAT
back end. Writes go in two phases: the change plan is worked out against a read-only
view (so every refusal, free space included, happens before anything is opened for
writing; even opening a VHDX writable changes its headers), then carried out on a
writable view of just that partition and checked with e2fsck -n / fsck.fat -n.

An edit is all or nothing. With a qemu-storage-daemon FUSE export, the writable view is
a temporary qcow2 overlay backed by the image, committed into the image (qemu-img
commit) only once verified; a commit cut short by a kill is finished by the next
session. Without /dev/fuse (or with HVDISK_NO_FUSE=1) the image is edited as a raw copy
that is converted back and renamed over it, which is refused when it would drop internal
snapshots or a backing chain, unless forced. HVDISK_REQUIRE_FUSE=1 makes a missing FUSE
an error instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hvagent.disk import image as img
from hvagent.disk import vhd
from hvagent.disk.errors import DiskError, ImageInUse
from hvagent.disk.extfs import ExtFS
from hvagent.disk.fatfs import FatFS
from hvagent.disk.parttable import Partition, pick_partition, read_partitions
from hvagent.disk.volume import Plan, Volume
from hvagent.drivers import storage
from hvagent.drivers.storage import fuse_available, fuse_export
from hvagent.host.formats import DiskFormat

T = TypeVar("T")
GuestFS = ExtFS | FatFS
REQUIRE_FUSE_ENV = "HVDISK_REQUIRE_FUSE"  # "1": refuse to work without a FUSE export
PENDING = "commit.qcow2"  # in GuestImage.work: a verified edit being committed


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GuestImage:
    """One image and (optionally) a partition number; see the module docstring.
    `via` says how the last operation reached the disk: "fuse" (a qemu-storage-daemon
    export), "copy" (a raw copy) or "direct" (reading a raw image itself)."""

    def __init__(self, image: Path, partition: int | None = None, *,
                 fuse: bool | None = None, force: bool = False) -> None:
        self.image = image
        self.partition = partition
        self.fmt = img.detect_format(image)
        self.use_fuse = fuse_available() if fuse is None else fuse
        if not self.use_fuse and os.environ.get(REQUIRE_FUSE_ENV, "") not in ("", "0"):
            raise DiskError(f"{image}: {REQUIRE_FUSE_ENV} is set but no FUSE export is "
                            "possible (/dev/fuse, qemu-storage-daemon, or --no-fuse)")
        self.force = force
        self.via: str | None = None
        self._fixed = False  # a fixed VHD/VHDX is converted back as fixed
        # Beside the image: the edit's overlay or raw copy, and a commit in progress (for a
        # block device, whose directory is /dev, in the temporary directory instead).
        if image.is_block_device():
            rdev = image.stat().st_rdev
            self.work = Path(tempfile.gettempdir()) / (
                f".hvdisk-dev-{os.major(rdev)}-{os.minor(rdev)}")
        else:
            self.work = image.parent / f".{image.name}.hvdisk"

    # -- checks before anything is opened ------------------------------------------------
    def _precheck(self, *, write: bool) -> None:
        if write and not os.access(self.image, os.W_OK):
            raise DiskError(f"{self.image}: not writable")
        if self.fmt is DiskFormat.VHD:
            # qemu's VHD driver is lenient; do not edit a VHD whose metadata is broken.
            rep = vhd.check(self.image)
            if not rep.ok:
                raise DiskError(f"{self.image}: corrupt VHD: {rep.errors[0]}")
        elif write and self.fmt in (DiskFormat.QCOW2, DiskFormat.VHDX):
            res = img.check(self.image)
            if not res.ok:
                raise DiskError(f"{self.image}: corrupt {self.fmt.label}: {res.errors[0]}")

    @contextmanager
    def _session(self, *, write: bool) -> Iterator[None]:
        """Every operation runs inside one: other holders refused, then hvdisk's session
        lock for the whole operation (exclusive to write, shared to read), an edit that
        was killed while being committed finished first, then the checks."""
        # Holders first: once locked, a rival refused by the lock may still have the
        # image open for an instant, and must not make the winner give up too.
        img.ensure_not_in_use(self.image)
        with img.session_lock(self.image, exclusive=write) as fd:
            if (self.work / PENDING).exists():
                if not write:
                    img.upgrade_lock(fd, self.image)
                self._recover()
            elif write and self.work.exists():
                # what an edit killed before its commit left
                shutil.rmtree(self.work, ignore_errors=True)
            self._precheck(write=write)
            try:
                yield
            finally:
                if write and not (self.work / PENDING).exists():
                    shutil.rmtree(self.work, ignore_errors=True)

    def _recover(self) -> None:
        """Finish the commit of an edit that was verified but killed while committing."""
        img.commit_overlay(self.work / PENDING, self.image)
        shutil.rmtree(self.work)

    def _volume(self, raw: Path) -> Volume:
        _scheme, parts = disk_layout(raw)
        part = pick_partition(parts, self.partition)
        return Volume(raw, part.start, part)

    @contextmanager
    def _read_view(self) -> Iterator[Path]:
        """A read-only raw view of the whole disk."""
        if self.use_fuse:
            self.via = "fuse"
            with fuse_export(self.image, self.fmt, writable=False) as raw:
                yield raw
        elif self.fmt is DiskFormat.RAW:
            self.via = "direct"
            img.image_info(self.image, self.fmt)  # takes QEMU's lock: refuses a busy image
            yield self.image
        else:
            self.via = "copy"
            img.image_info(self.image, self.fmt)  # takes QEMU's lock: refuses a busy image
            with tempfile.TemporaryDirectory(prefix="hvdisk-") as work:
                raw = Path(work) / "disk.raw"
                img.convert(self.image, raw, DiskFormat.RAW, src_format=self.fmt,
                            check_holders=False)
                yield raw

    @contextmanager
    def _writable(self, part: Partition, raw_copy: Path | None = None) -> Iterator[Volume]:
        """A writable view of `part` whose changes reach the image only when the block
        succeeds, so a failed or killed edit leaves the image as it was. With FUSE: a
        qcow2 overlay on the image, committed into it. Without: a raw copy (made here
        for a raw image, else `raw_copy`), converted back and renamed over the image."""
        self._make_work()
        if self.use_fuse:
            self.via = "fuse"
            overlay = self.work / "edit.qcow2"
            img.create_overlay(self.image, self.fmt, overlay)
            with fuse_export(overlay, DiskFormat.QCOW2, writable=True,
                             window=(part.start, part.size)) as view:
                yield Volume(view, 0, part)
            self._commit(overlay)
            return
        self.via = "copy"
        if not self.image.is_file():
            raise DiskError("editing a block device needs a FUSE export (a copy could not "
                            "be renamed over it)")
        if raw_copy is None:
            raw_copy = self.work / "edit.raw"
            # (a reflink where the host file system has them, else a sparse copy)
            storage.copy_sparse(self.image, raw_copy)
        yield Volume(raw_copy, part.start, part)
        new = raw_copy
        if self.fmt is not DiskFormat.RAW:
            new = self.work / f"new.{self.fmt.label}"
            img.convert(raw_copy, new, self.fmt, src_format=DiskFormat.RAW,
                        fixed=self._fixed, check_holders=False)
        self._replace(new)

    def _make_work(self) -> None:
        try:
            self.work.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DiskError(f"cannot create {self.work} for the edit: {exc.strerror}") from exc

    def _commit(self, overlay: Path) -> None:
        # Renamed first: from here on the edit is done, and a commit cut short by a kill
        # is run again by the next session (_recover) instead of being lost half-way.
        _fsync(overlay)
        pending = self.work / PENDING
        os.replace(overlay, pending)
        _fsync(self.work)
        try:
            img.commit_overlay(pending, self.image)
        except ImageInUse:
            pending.unlink()  # refused before writing anything: the edit is dropped
            raise
        except DiskError as exc:
            raise DiskError(f"{exc}; the next hvdisk command on this image completes "
                            "the edit") from exc
        pending.unlink()

    def _replace(self, new: Path) -> None:
        st = self.image.stat()
        os.chmod(new, st.st_mode & 0o7777)
        try:
            os.chown(new, st.st_uid, st.st_gid)
        except PermissionError:
            pass  # not ours to give away: the image keeps our ownership
        _fsync(new)
        os.replace(new, self.image)
        _fsync(self.image.parent)

    # -- the two kinds of operations ---------------------------------------------------
    def layout(self) -> tuple[str, list[Partition]]:
        return self.read_disk(disk_layout)

    def read_disk(self, fn: Callable[[Path], T]) -> T:
        """Call fn with a read-only raw view of the whole disk (several partitions)."""
        with _named(self.image), self._session(write=False), self._read_view() as raw:
            return fn(raw)

    def read(self, fn: Callable[[GuestFS], T]) -> T:
        return self.read_disk(lambda raw: fn(make_fs(self._volume(raw))))

    def write(self, plan_fn: Callable[[GuestFS, Plan], None]) -> Plan:
        """Plan on a read-only view, then apply and verify. Returns the plan carried out
        (empty: nothing needed changing and the image was not opened for writing)."""
        with _named(self.image), self._session(write=True):
            return self._write(plan_fn)

    def _plan(self, raw: Path, plan_fn: Callable[[GuestFS, Plan], None],
              plan: Plan) -> Partition:
        vol = self._volume(raw)
        fs = make_fs(vol)
        fs.check_clean()
        plan_fn(fs, plan)
        if plan:
            fs.check_space(plan)
        return vol.part

    def _write(self, plan_fn: Callable[[GuestFS, Plan], None]) -> Plan:
        plan = Plan()
        self._fixed = False
        if self.use_fuse:
            self.via = "fuse"
            with fuse_export(self.image, self.fmt, writable=False) as raw:
                part = self._plan(raw, plan_fn, plan)
            raw_copy = None
        elif self.fmt is DiskFormat.RAW:
            self.via = "copy"
            img.image_info(self.image, self.fmt)  # QEMU's lock
            part = self._plan(self.image, plan_fn, plan)
            raw_copy = None
        else:
            self.via = "copy"
            raw_copy = self._raw_copy()
            part = self._plan(raw_copy, plan_fn, plan)
        if not plan:
            return plan
        with self._writable(part, raw_copy) as vol:
            fs = make_fs(vol)
            fs.apply(plan)
            fs.verify()
        return plan

    def repair(self) -> str:
        """Repair the file system (e2fsck -fy / fsck.fat -a): 'clean' or 'repaired';
        committed like an edit, so a repair that fails leaves the image as it was."""
        with _named(self.image), self._session(write=True):
            self._fixed = False
            raw_copy = None
            if self.use_fuse:
                with fuse_export(self.image, self.fmt, writable=False) as raw:
                    part = self._volume(raw).part
            elif self.fmt is DiskFormat.RAW:
                img.image_info(self.image, self.fmt)  # QEMU's lock
                part = self._volume(self.image).part
            else:
                raw_copy = self._raw_copy()
                part = self._volume(raw_copy).part
            with self._writable(part, raw_copy) as vol:
                fs = make_fs(vol)
                result = fs.repair()
                fs.verify()
            return result

    def _raw_copy(self) -> Path:
        """Without FUSE, a non-raw image is edited as a raw copy, converted back after."""
        info = img.image_info(self.image, self.fmt)
        lost = []
        if info.snapshots:
            lost.append(f"{len(info.snapshots)} internal snapshot(s)")
        if info.backing_file:
            lost.append(f"its backing file {info.backing_file} (the chain would be flattened)")
        if lost and not self.force:
            raise DiskError(f"{self.image}: editing without FUSE converts the image and would "
                            f"lose {' and '.join(lost)}; pass --force to accept")
        self._fixed = info.subformat == "fixed"
        self._make_work()
        raw = self.work / "disk.raw"
        img.convert(self.image, raw, DiskFormat.RAW, src_format=self.fmt, check_holders=False)
        return raw


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
        uid: int | None = None, gid: int | None = None, into_dir: bool = True) -> Plan:
    """Copy `src` to `path`; an existing directory there receives it under src's name
    (as cp does), or with into_dir=False is refused."""
    return image.write(lambda fs, plan: fs.plan_put(src, path, plan, mode=mode, uid=uid,
                                                    gid=gid, into_dir=into_dir))


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
