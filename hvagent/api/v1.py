"""REST API v1: mounts one router per area under /api/v1. A new area (devices,
checkpoints, disks, networks, access control) adds its router module and one line here."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from hvagent.access.privileges import Privilege as P
from hvagent.api import checkpoints, devices, disks, jobs, media, networks, policy, vms
from hvagent.api.auth import require
from hvagent.api.deps import vms as vms_dep
from hvagent.api.schemas import AgentInfo, CpuInfo, MemoryInfo, StorageInfo
from hvagent.config import agent_version
from hvagent.errors import InvalidRequest
from hvagent.services.hostinfo import host_facts
from hvagent.services.vms import VMService

router = APIRouter(prefix="/api/v1")
router.include_router(vms.router)
router.include_router(jobs.router)
router.include_router(devices.router)
router.include_router(checkpoints.router)
router.include_router(disks.router)
router.include_router(policy.router)
router.include_router(networks.router)
router.include_router(media.router)


@router.get("/agent", tags=["agent"], dependencies=[Depends(require(P.SYS_AUDIT, "/"))])
async def agent_info(request: Request,
                     svc: Annotated[VMService, Depends(vms_dep)]) -> AgentInfo:
    try:
        choice = await svc.accel()
        accel, accel_reason = str(choice.accel), choice.reason
    except InvalidRequest as e:  # the configured accelerator does not work here
        accel, accel_reason = "unavailable", str(e)
    persistence = request.app.state.persistence
    h = await host_facts(svc)
    return AgentInfo(version=agent_version(), accel=accel, accel_reason=accel_reason,
                     vms=svc.count(), state_dir=str(svc.config.state_dir),
                     persistent=persistence.persistent, persistence=persistence.reason,
                     warnings=persistence.warnings,
                     cpu=CpuInfo(count=h.cpu_count, model=h.cpu_model),
                     memory=MemoryInfo(total_bytes=h.memory_total_bytes,
                                       free_bytes=h.memory_free_bytes,
                                       committed_bytes=h.memory_committed_bytes),
                     storage=StorageInfo(dir=h.storage_dir, total_bytes=h.storage_total_bytes,
                                         free_bytes=h.storage_free_bytes),
                     vm_states=h.vm_states)
