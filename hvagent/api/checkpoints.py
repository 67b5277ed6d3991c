"""REST v1: checkpoints of a VM (/api/v1/vms/{name}/checkpoints). Create, revert and
delete answer 202 with the job doing the work; clients poll /api/v1/jobs/{id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field

from hvagent.access.privileges import Privilege as P
from hvagent.api.auth import require
from hvagent.api.schemas import CheckpointName, VMName
from hvagent.services.checkpoints import Checkpoint, CheckpointService
from hvagent.services.jobs import Job
from hvagent.spec import Name

router = APIRouter(prefix="/vms", tags=["checkpoints"])


def _checkpoints(request: Request) -> CheckpointService:
    return request.app.state.checkpoints  # type: ignore[no-any-return]


Checkpoints = Annotated[CheckpointService, Depends(_checkpoints)]


class CreateCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    description: str = Field(default="", max_length=1000)


@router.get("/{name}/checkpoints", dependencies=[Depends(require(P.VM_AUDIT, "/vms/{name}"))])
async def list_checkpoints(name: VMName, svc: Checkpoints) -> list[Checkpoint]:
    return svc.checkpoints(name)


@router.get("/{name}/checkpoints/{checkpoint}",
            dependencies=[Depends(require(P.VM_AUDIT, "/vms/{name}"))])
async def show_checkpoint(name: VMName, checkpoint: CheckpointName, svc: Checkpoints) -> Checkpoint:
    return svc.get(name, checkpoint)


@router.post("/{name}/checkpoints", status_code=status.HTTP_202_ACCEPTED,
             dependencies=[Depends(require(P.VM_SNAPSHOT, "/vms/{name}"))])
async def create_checkpoint(name: VMName, svc: Checkpoints,
                            body: CreateCheckpoint | None = None) -> Job:
    body = body or CreateCheckpoint()
    return await svc.create(name, body.name, body.description)


@router.post("/{name}/checkpoints/{checkpoint}/revert", status_code=status.HTTP_202_ACCEPTED,
             dependencies=[Depends(require(P.VM_SNAPSHOT_ROLLBACK, "/vms/{name}"))])
async def revert_checkpoint(name: VMName, checkpoint: CheckpointName, svc: Checkpoints) -> Job:
    return await svc.revert(name, checkpoint)


@router.delete("/{name}/checkpoints/{checkpoint}", status_code=status.HTTP_202_ACCEPTED,
               dependencies=[Depends(require(P.VM_SNAPSHOT, "/vms/{name}"))])
async def delete_checkpoint(name: VMName, checkpoint: CheckpointName, svc: Checkpoints) -> Job:
    return await svc.delete(name, checkpoint)
