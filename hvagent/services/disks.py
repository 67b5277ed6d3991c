"""The disks service: every disk image a request names or the agent makes.

- resolve: a disk of a spec (an existing image the request names, or a new one) becomes
  a confined, ownership-checked host path with its real format (the file rules are
  hvagent.services.files); a new disk is created in the storage directory, exactly
  `size` bytes, written beside its name and renamed into place. VM create and disk
  attach both go through `resolve`.
- files on a stopped VM's disk: partitions, ls, stat, read, write, remove, mkdir
  (hvagent.disk.fs), holding the VM's operation lock so that it cannot start meanwhile.
- import: define a VM from an image (e.g. `hvdisk p2v` output) with the firmware and
  disk bus its content needs (hvagent.disk.p2v.detect_boot).

Disk errors are agent errors (hvagent.disk.errors): a refusal is InvalidRequest, an
image another process holds is Conflict.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar

from hvagent.disk import image
from hvagent.disk.errors import DiskError
from hvagent.errors import Conflict, HVError, InvalidRequest, NotFound, OperationFailed
from hvagent.services import files
from hvagent.spec import ACTIVE_STATES, DiskFormat, DiskSpec, Firmware, VMSpec

if TYPE_CHECKING:
    from types import ModuleType

    from hvagent.disk.fs import GuestImage
    from hvagent.disk.p2v import BootDetection


# The guest file-system tools load on first use (~2.4 MiB of the agent's RSS that only the
# disk-file routes and VM import need).
def _fs() -> ModuleType:
    from hvagent.disk import fs

    return fs


def _detect_boot(path: Path) -> BootDetection:
    from hvagent.disk.p2v import detect_boot

    return detect_boot(path)


T = TypeVar("T")
Use = files.Use


class VMs(files.Host, Protocol):
    """What the service uses of hvagent.services.vms.VMService (named, not imported: the
    VM service calls this one)."""

    locks: Any  # OperationLocks: hold(vm, operation) while the disk is used offline

    async def get(self, name: str) -> Any: ...  # VMInfo

    async def create(self, spec: VMSpec) -> Any: ...  # VMInfo


class Imported(NamedTuple):
    vm: Any  # VMInfo of the new VM
    firmware: str
    disk_bus: Literal["virtio", "sata"]
    warnings: list[str]


class DiskService:
    def __init__(self, vms: VMs) -> None:
        self.vms = vms

    @property
    def storage_dir(self) -> Path:
        return self.vms.storage_dir

    # resolution and creation

    def allowed_file(self, value: str, field: str, use: Use, target: str) -> Path:
        """The host file `value` names, if the request's principal may use it as `use`
        for VM `target` (hvagent.services.files.resolve)."""
        return files.resolve(self.vms, value, field, use, target)

    async def capacity(self, path: str, fmt: DiskFormat | None) -> int | None:
        """The disk's virtual size in bytes (what the guest sees), None when unreadable."""
        try:
            info = await asyncio.to_thread(image.image_info, Path(path), fmt,
                                           force_share=True)
        except (HVError, OSError):
            return None
        return info.virtual_size

    def own_disk_path(self, value: str) -> str:
        """`value` spelt as a spec records a disk path (to match a VM's own disks)."""
        return str(files.normalize(self.storage_dir, value))

    async def resolve(self, vm: str, disk: DiskSpec, where: str, created: list[Path], *,
                      number: int, next_free: bool = False) -> DiskSpec:
        """`disk` as the spec records it: an existing image the caller may use, with its
        real format, or a new image created in the storage directory as
        `<vm>-disk<number>.<ext>` (with `next_free`, the first free number from there on;
        else a file already there is a Conflict). A created file is appended to
        `created` as soon as it exists, so the caller can remove it on failure."""
        if disk.path is not None:
            path = self.allowed_file(disk.path, f"{where}.path", "disk", vm)
            found = await self.format_of(path, f"{where}.path")
            if disk.format is not None and found != disk.format:
                raise InvalidRequest(f"{where}.format: {disk.path} is {found}, not {disk.format}")
            return DiskSpec(path=str(path), format=found, bus=disk.bus)
        assert disk.size is not None
        fmt = disk.format or DiskFormat.QCOW2
        path = self._new_path(vm, number, fmt)
        while next_free and path.exists():
            number += 1
            path = self._new_path(vm, number, fmt)
        if path.exists():
            raise Conflict(f"{where}: {path} already exists")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        created.append(path)
        await self.create(path, fmt, disk.size, where)
        return DiskSpec(path=str(path), format=fmt, size=disk.size, created=True, bus=disk.bus)

    def _new_path(self, vm: str, number: int, fmt: DiskFormat) -> Path:
        return self.storage_dir / f"{vm}-disk{number}.{fmt.label}"

    async def format_of(self, path: Path, where: str) -> DiskFormat:
        """The format of an existing image (from its own magic, so a fixed VHD is not
        taken for raw), checked readable by qemu-img; shared, as a running VM may hold it."""
        try:
            info = await asyncio.to_thread(image.image_info, path, force_share=True)
        except DiskError as e:
            raise InvalidRequest(f"{where}: {path}: not a readable disk image: {e}") from e
        return info.format

    async def create(self, path: Path, fmt: DiskFormat, size: int, where: str) -> None:
        """A new empty image of exactly `size` bytes (VHD too), written to a temporary
        file and renamed into place."""
        if size % 512:
            raise InvalidRequest(f"{where}.size: {size} bytes is not a multiple of 512")
        try:
            await asyncio.to_thread(image.create, path, fmt, size)
        except DiskError as e:
            if "No space left on device" in str(e):  # a host limit, not a host failure
                raise InvalidRequest(f"{where}: no space left on device for {path} "
                                     f"({size} bytes): {e}") from e
            raise OperationFailed(f"{where}: cannot create {path}: {e}") from e

    # files on a stopped VM's disk

    async def _on_stopped_disk(self, name: str, index: int, op: str,
                               fn: Callable[[GuestImage], T],
                               partition: int | None) -> T:
        """Run fn on disk `index` of VM `name` while holding the VM's operation lock, so
        that the VM cannot start in the middle."""
        info = await self.vms.get(name)
        if info.state in ACTIVE_STATES:
            raise Conflict(f"{name}: is {info.state}; stop it before using its disks offline")
        if not 0 <= index < len(info.spec.disks):
            raise NotFound(f"{name}: has no disk {index}")
        path = info.spec.disks[index].path
        assert path is not None
        with self.vms.locks.hold(name, op):
            return await asyncio.to_thread(
                lambda: fn(_fs().GuestImage(Path(path), partition)))

    async def partitions(self, name: str, index: int) -> dict[str, Any]:
        def layout(gi: GuestImage) -> dict[str, Any]:
            scheme, parts = gi.layout()
            return {"scheme": scheme, "partitions": [p.to_dict() for p in parts]}
        return await self._on_stopped_disk(name, index, "disk-read", layout, None)

    async def ls(self, name: str, index: int, path: str,
                 partition: int | None) -> list[dict[str, object]]:
        return await self._on_stopped_disk(name, index, "disk-read",
                                           lambda gi: _fs().ls(gi, path), partition)

    async def stat(self, name: str, index: int, path: str, partition: int | None, *,
                   follow: bool = False) -> dict[str, object]:
        return await self._on_stopped_disk(
            name, index, "disk-read", lambda gi: _fs().stat(gi, path, follow=follow),
            partition)

    async def read(self, name: str, index: int, path: str, partition: int | None) -> bytes:
        return await self._on_stopped_disk(name, index, "disk-read",
                                           lambda gi: _fs().cat(gi, path), partition)

    async def write(self, name: str, index: int, path: str, content: bytes,
                    partition: int | None, *, mode: int | None = None,
                    uid: int | None = None, gid: int | None = None) -> list[str]:
        """Write `content` as the guest file `path`; the changes made, for a human."""
        # A fixed name in a private directory: nothing on the host is named after the guest
        # path, and a path naming a guest directory is refused rather than written into.
        with tempfile.TemporaryDirectory(prefix="hvagent-put-") as work:
            src = Path(work) / "content"
            src.write_bytes(content)
            plan = await self._on_stopped_disk(
                name, index, "disk-write",
                lambda gi: _fs().put(gi, src, path, mode=mode, uid=uid, gid=gid,
                                       into_dir=False), partition)
        return plan.changes

    async def remove(self, name: str, index: int, path: str, partition: int | None, *,
                     recursive: bool = False) -> list[str]:
        plan = await self._on_stopped_disk(
            name, index, "disk-write", lambda gi: _fs().rm(gi, path, recursive=recursive),
            partition)
        return plan.changes

    async def make_dir(self, name: str, index: int, path: str, partition: int | None, *,
                       parents: bool = False) -> list[str]:
        plan = await self._on_stopped_disk(
            name, index, "disk-write", lambda gi: _fs().mkdir(gi, path, parents=parents),
            partition)
        return plan.changes

    # import

    async def import_vm(self, name: str, image_path: str, *, vcpus: int,
                        memory_mib: int) -> Imported:
        """Define VM `name` on the image `image_path`: UEFI when the disk has an EFI
        system partition with a loader, else BIOS; a virtio disk when the guest has
        virtio drivers, else an emulated SATA disk on the AHCI controller."""
        # Before the image is read at all: what it holds would tell a caller about a file
        # it may not use. create() asks again (as disks[0].path) for the spec it records.
        path = self.allowed_file(image_path, "image", "disk", name)
        det = await asyncio.to_thread(_detect_boot, path)
        bus: Literal["virtio", "sata"] = "virtio" if det.disk_bus == "virtio" else "sata"
        spec = VMSpec(name=name, vcpus=vcpus, memory_mib=memory_mib,
                      firmware=Firmware(det.firmware),
                      disks=[DiskSpec(path=str(path), bus=bus)])
        vm = await self.vms.create(spec)
        return Imported(vm=vm, firmware=det.firmware, disk_bus=bus,
                        warnings=list(det.warnings))
