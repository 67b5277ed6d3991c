"""REST v1: offline access to a stopped VM's disks (read and write are separate
privileges, Disk.Read and Disk.Write) and P2V import (define a VM from a disk image,
firmware chosen from what the disk holds). Refused while the VM runs; the image lock
check in hvagent.disk catches any other holder too."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel, Field

from hvagent.access.privileges import Privilege as P
from hvagent.api import deps
from hvagent.api.auth import require
from hvagent.disk import fs as guestfs
from hvagent.disk.errors import DiskError, ImageInUse
from hvagent.disk.p2v import detect_boot
from hvagent.errors import Conflict, InvalidRequest, NotFound
from hvagent.services.files import resolve as resolve_file
from hvagent.services.vms import ACTIVE, VMInfo, VMService
from hvagent.spec import MAX_MEMORY_MIB, MAX_VCPUS, DiskSpec, Firmware, HostPath, Name, VMSpec

router = APIRouter(tags=["disks"])
Service = Annotated[VMService, Depends(deps.vms)]
# No NUL, and no U+FFFD: the query string is decoded with replacement, so a path that
# was not UTF-8 arrives with U+FFFD in it and would name some other file.
GuestPath = Annotated[str, Query(min_length=1, max_length=4096, pattern="^[^\x00\ufffd]+$",
                                 description="path inside the guest (UTF-8, no NUL)")]
Partition = Annotated[int | None, Query(ge=0, description="default: the root file system")]
T = TypeVar("T")
READ = [Depends(require(P.DISK_READ))]
WRITE = [Depends(require(P.DISK_WRITE))]
FILES = "/vms/{name}/disks/{index}"


class Changes(BaseModel):
    changes: list[str]


class ImportRequest(BaseModel):
    name: Name
    image: HostPath = Field(description="disk image in the agent's storage directory")
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_mib: int = Field(default=1024, ge=16, le=MAX_MEMORY_MIB)


class ImportResult(BaseModel):
    vm: VMInfo
    firmware: str
    disk_bus: str
    warnings: list[str]


@contextmanager
def _disk_errors() -> Iterator[None]:
    try:
        yield
    except ImageInUse as exc:
        raise Conflict(str(exc)) from exc
    except DiskError as exc:
        raise InvalidRequest(str(exc)) from exc


async def _on_stopped_disk(svc: VMService, name: str, index: int, op: str,
                           fn: Callable[[guestfs.GuestImage], T],
                           partition: int | None) -> T:
    """Run fn on disk `index` of VM `name` while holding the VM's operation lock, so
    that the VM cannot start in the middle."""
    info = await svc.get(name)
    if info.state in ACTIVE:
        raise Conflict(f"{name}: is {info.state}; stop it before using its disks offline")
    if not 0 <= index < len(info.spec.disks):
        raise NotFound(f"{name}: has no disk {index}")
    path = info.spec.disks[index].path
    assert path is not None
    with svc.locks.hold(name, op), _disk_errors():
        gi = guestfs.GuestImage(Path(path), partition)
        return await asyncio.to_thread(fn, gi)


@router.get(f"{FILES}/partitions", dependencies=READ)
async def partitions(name: str, index: int, svc: Service) -> dict[str, Any]:
    def layout(gi: guestfs.GuestImage) -> dict[str, Any]:
        scheme, parts = gi.layout()
        return {"scheme": scheme, "partitions": [p.to_dict() for p in parts]}
    return await _on_stopped_disk(svc, name, index, "disk-read", layout, None)


@router.get(f"{FILES}/ls", dependencies=READ)
async def list_dir(name: str, index: int, svc: Service, path: GuestPath = "/",
                   partition: Partition = None) -> list[dict[str, object]]:
    return await _on_stopped_disk(svc, name, index, "disk-read",
                                  lambda gi: guestfs.ls(gi, path), partition)


@router.get(f"{FILES}/stat", dependencies=READ)
async def stat_file(name: str, index: int, svc: Service, path: GuestPath,
                    partition: Partition = None, follow: bool = False) -> dict[str, object]:
    return await _on_stopped_disk(svc, name, index, "disk-read",
                                  lambda gi: guestfs.stat(gi, path, follow=follow), partition)


@router.get(f"{FILES}/files", dependencies=READ, response_class=Response)
async def read_file(name: str, index: int, svc: Service, path: GuestPath,
                    partition: Partition = None) -> Response:
    data = await _on_stopped_disk(svc, name, index, "disk-read",
                                  lambda gi: guestfs.cat(gi, path), partition)
    return Response(data, media_type="application/octet-stream")


@router.put(f"{FILES}/files", dependencies=WRITE)
async def write_file(name: str, index: int, request: Request, svc: Service,
                     path: GuestPath, partition: Partition = None,
                     mode: Annotated[str | None, Query(pattern=r"^[0-7]{3,4}$")] = None,
                     uid: Annotated[int | None, Query(ge=0)] = None,
                     gid: Annotated[int | None, Query(ge=0)] = None) -> Changes:
    """The request body becomes the file's content."""
    body = await request.body()
    # A fixed name in a private directory: nothing on the host is named after the guest
    # path, and a path naming a guest directory is refused rather than written into.
    with tempfile.TemporaryDirectory(prefix="hvagent-put-") as work:
        src = Path(work) / "content"
        src.write_bytes(body)
        plan = await _on_stopped_disk(
            svc, name, index, "disk-write",
            lambda gi: guestfs.put(gi, src, path, mode=int(mode, 8) if mode else None,
                                   uid=uid, gid=gid, into_dir=False), partition)
    return Changes(changes=plan.changes)


@router.delete(f"{FILES}/files", dependencies=WRITE)
async def remove_file(name: str, index: int, svc: Service, path: GuestPath,
                      partition: Partition = None, recursive: bool = False) -> Changes:
    plan = await _on_stopped_disk(svc, name, index, "disk-write",
                                  lambda gi: guestfs.rm(gi, path, recursive=recursive),
                                  partition)
    return Changes(changes=plan.changes)


@router.post(f"{FILES}/dirs", dependencies=WRITE)
async def make_dir(name: str, index: int, svc: Service, path: GuestPath,
                   partition: Partition = None, parents: bool = False) -> Changes:
    plan = await _on_stopped_disk(svc, name, index, "disk-write",
                                  lambda gi: guestfs.mkdir(gi, path, parents=parents),
                                  partition)
    return Changes(changes=plan.changes)


@router.post("/vms/import", status_code=status.HTTP_201_CREATED,
             dependencies=[Depends(require(P.VM_ALLOCATE, "/vms"))])
async def import_vm(req: ImportRequest, svc: Service) -> ImportResult:
    """Define a VM from an imported disk (e.g. `hvdisk p2v` output): UEFI when the disk
    has an EFI system partition with a loader, else BIOS; a virtio disk when the guest
    has virtio drivers, else an emulated SATA disk on the AHCI controller."""
    # Before the image is read at all: what it holds would tell a caller about a file it
    # may not use. create() asks again (as disks[0].path) for the spec it records.
    path = resolve_file(svc, req.image, "image", "disk", req.name)
    with _disk_errors():
        det = await asyncio.to_thread(detect_boot, path)
    bus: Literal["virtio", "sata"] = "virtio" if det.disk_bus == "virtio" else "sata"
    spec = VMSpec(name=req.name, vcpus=req.vcpus, memory_mib=req.memory_mib,
                  firmware=Firmware(det.firmware), disks=[DiskSpec(path=str(path), bus=bus)])
    vm = await svc.create(spec)
    return ImportResult(vm=vm, firmware=det.firmware, disk_bus=bus,
                        warnings=list(det.warnings))
