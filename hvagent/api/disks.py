"""REST v1: offline access to a stopped VM's disks (read and write are separate
privileges, Disk.Read and Disk.Write) and P2V import (define a VM from a disk image,
firmware chosen from what the disk holds). The HTTP face of hvagent.services.disks,
which refuses while the VM runs; its image lock check catches any other holder too."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel, Field

from hvagent.access.privileges import Privilege as P
from hvagent.api.auth import require
from hvagent.services.disks import DiskService
from hvagent.services.vms import VMInfo
from hvagent.spec import MAX_MEMORY_MIB, MAX_VCPUS, HostPath, Name


def _disks(request: Request) -> DiskService:
    return request.app.state.disks  # type: ignore[no-any-return]


router = APIRouter(tags=["disks"])
Service = Annotated[DiskService, Depends(_disks)]
# No NUL, and no U+FFFD: the query string is decoded with replacement, so a path that
# was not UTF-8 arrives with U+FFFD in it and would name some other file.
GuestPath = Annotated[str, Query(min_length=1, max_length=4096, pattern="^[^\x00\ufffd]+$",
                                 description="path inside the guest (UTF-8, no NUL)")]
Partition = Annotated[int | None, Query(ge=0, description="default: the root file system")]
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


@router.get(f"{FILES}/partitions", dependencies=READ)
async def partitions(name: str, index: int, svc: Service) -> dict[str, Any]:
    return await svc.partitions(name, index)


@router.get(f"{FILES}/ls", dependencies=READ)
async def list_dir(name: str, index: int, svc: Service, path: GuestPath = "/",
                   partition: Partition = None) -> list[dict[str, object]]:
    return await svc.ls(name, index, path, partition)


@router.get(f"{FILES}/stat", dependencies=READ)
async def stat_file(name: str, index: int, svc: Service, path: GuestPath,
                    partition: Partition = None, follow: bool = False) -> dict[str, object]:
    return await svc.stat(name, index, path, partition, follow=follow)


@router.get(f"{FILES}/files", dependencies=READ, response_class=Response)
async def read_file(name: str, index: int, svc: Service, path: GuestPath,
                    partition: Partition = None) -> Response:
    data = await svc.read(name, index, path, partition)
    return Response(data, media_type="application/octet-stream")


@router.put(f"{FILES}/files", dependencies=WRITE)
async def write_file(name: str, index: int, request: Request, svc: Service,
                     path: GuestPath, partition: Partition = None,
                     mode: Annotated[str | None, Query(pattern=r"^[0-7]{3,4}$")] = None,
                     uid: Annotated[int | None, Query(ge=0)] = None,
                     gid: Annotated[int | None, Query(ge=0)] = None) -> Changes:
    """The request body becomes the file's content."""
    changes = await svc.write(name, index, path, await request.body(), partition,
                              mode=int(mode, 8) if mode else None, uid=uid, gid=gid)
    return Changes(changes=changes)


@router.delete(f"{FILES}/files", dependencies=WRITE)
async def remove_file(name: str, index: int, svc: Service, path: GuestPath,
                      partition: Partition = None, recursive: bool = False) -> Changes:
    return Changes(changes=await svc.remove(name, index, path, partition,
                                            recursive=recursive))


@router.post(f"{FILES}/dirs", dependencies=WRITE)
async def make_dir(name: str, index: int, svc: Service, path: GuestPath,
                   partition: Partition = None, parents: bool = False) -> Changes:
    return Changes(changes=await svc.make_dir(name, index, path, partition, parents=parents))


@router.post("/vms/import", status_code=status.HTTP_201_CREATED,
             dependencies=[Depends(require(P.VM_ALLOCATE, "/vms"))])
async def import_vm(req: ImportRequest, svc: Service) -> ImportResult:
    """Define a VM from an imported disk (e.g. `hvdisk p2v` output): UEFI when the disk
    has an EFI system partition with a loader, else BIOS; a virtio disk when the guest
    has virtio drivers, else an emulated SATA disk on the AHCI controller."""
    done = await svc.import_vm(req.name, req.image, vcpus=req.vcpus,
                               memory_mib=req.memory_mib)
    return ImportResult(vm=done.vm, firmware=done.firmware, disk_bus=done.disk_bus,
                        warnings=done.warnings)
