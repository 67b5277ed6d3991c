"""REST v1: jobs (/api/v1/jobs), the long operations clients poll."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from hvagent.api import deps
from hvagent.auth import Privilege as P
from hvagent.auth import require
from hvagent.jobs import Job, Jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobsDep = Annotated[Jobs, Depends(deps.jobs)]


@router.get("", dependencies=[Depends(require(P.SYS_AUDIT, "/jobs"))])
async def list_jobs(jobs: JobsDep, target: str | None = None) -> list[Job]:
    return jobs.list(target)


@router.get("/{job_id}", dependencies=[Depends(require(P.SYS_AUDIT, "/jobs"))])
async def get_job(job_id: str, jobs: JobsDep) -> Job:
    return jobs.get(job_id)
