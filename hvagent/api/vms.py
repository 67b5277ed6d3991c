"""REST v1: VM lifecycle routes (/api/v1/vms). Resource changes (hot-add), checkpoints
and disk operations get their own router modules next to this one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status

from hvagent.access.privileges import Privilege as P
from hvagent.api import deps
from hvagent.api.auth import permitted, require
from hvagent.api.schemas import Console, Deleted, StopRequest, VMName
from hvagent.services.vms import VMInfo, VMService
from hvagent.spec import VMSpec

router = APIRouter(prefix="/vms", tags=["vms"])
Service = Annotated[VMService, Depends(deps.vms)]


@router.get("", dependencies=[Depends(require(P.VM_AUDIT, "/vms"))])
async def list_vms(request: Request, svc: Service) -> list[VMInfo]:
    # Only the VMs the principal may see (a VMCreator: the ones it created).
    return [vm for vm in await svc.list_vms() if permitted(request, P.VM_AUDIT, f"/vms/{vm.name}")]


@router.post("", status_code=status.HTTP_201_CREATED,
             dependencies=[Depends(require(P.VM_ALLOCATE, "/vms"))])
async def create_vm(spec: VMSpec, svc: Service) -> VMInfo:
    return await svc.create(spec)


@router.get("/{name}", dependencies=[Depends(require(P.VM_AUDIT))])
async def show_vm(name: VMName, svc: Service) -> VMInfo:
    return await svc.get(name)


@router.delete("/{name}", dependencies=[Depends(require(P.VM_ALLOCATE))])
async def delete_vm(name: VMName, svc: Service, keep_disks: bool = False) -> Deleted:
    return Deleted(name=name, removed_disks=await svc.delete(name, keep_disks=keep_disks))


@router.post("/{name}/start", dependencies=[Depends(require(P.VM_POWERMGMT))])
async def start_vm(name: VMName, svc: Service) -> VMInfo:
    return await svc.start(name)


@router.post("/{name}/stop", dependencies=[Depends(require(P.VM_POWERMGMT))])
async def stop_vm(name: VMName, svc: Service, body: StopRequest | None = None) -> VMInfo:
    body = body or StopRequest()
    return await svc.stop(name, force=body.force, timeout=body.timeout)


@router.post("/{name}/pause", dependencies=[Depends(require(P.VM_POWERMGMT))])
async def pause_vm(name: VMName, svc: Service) -> VMInfo:
    return await svc.pause(name)


@router.post("/{name}/resume", dependencies=[Depends(require(P.VM_POWERMGMT))])
async def resume_vm(name: VMName, svc: Service) -> VMInfo:
    return await svc.resume(name)


@router.post("/{name}/reset", dependencies=[Depends(require(P.VM_POWERMGMT))])
async def reset_vm(name: VMName, svc: Service) -> VMInfo:
    return await svc.reset(name)


@router.get("/{name}/console", dependencies=[Depends(require(P.VM_CONSOLE))])
async def console(name: VMName, svc: Service,
                  lines: Annotated[int, Query(ge=1, le=100000)] = 50) -> Console:
    return Console(name=name, lines=lines, text=svc.console(name, lines))
