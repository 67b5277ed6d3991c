"""REST v1: jobs (/api/v1/jobs), the long operations clients poll.

Access follows the job's target, as Proxmox does for tasks: reading a job needs VM.Audit
on the VM it acts on (a VMCreator polls the jobs of its own VMs, nobody else's), and the
list holds only the jobs the principal may read. Sys.Audit on /jobs (or /) reads all.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from hvagent.access.privileges import Privilege as P
from hvagent.api import deps
from hvagent.api.auth import require
from hvagent.api.schemas import JobId, TargetQuery
from hvagent.errors import NotFound
from hvagent.services.jobs import Job, Jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobsDep = Annotated[Jobs, Depends(deps.jobs)]

SEE_ALL = require(P.SYS_AUDIT, "/jobs")


def job_acl_path(job: Job) -> str:
    """The ACL path a job is read under. Every job today acts on a VM and its target is
    the VM's name; a job on something else (a network, a host disk) maps here."""
    return f"/vms/{job.target}"


def _resolve(request: Request) -> str | None:
    try:
        return job_acl_path(deps.jobs(request).get(request.path_params["job_id"]))
    except NotFound:
        return None


READ_JOB = require(P.VM_AUDIT, "/vms/<target of job {job_id}>", resolve=_resolve,
                   or_else=SEE_ALL)


# The list itself needs what a VMCreator holds on the collection; its items are filtered.
@router.get("", dependencies=[Depends(require(P.VM_AUDIT, "/vms", or_else=SEE_ALL))])
async def list_jobs(request: Request, jobs: JobsDep,
                    target: TargetQuery = None) -> list[Job]:
    found = jobs.list(target)
    if SEE_ALL.permits(request, SEE_ALL.path):
        return found
    return [j for j in found if READ_JOB.permits(request, job_acl_path(j))]


@router.get("/{job_id}", dependencies=[Depends(READ_JOB)])
async def get_job(job_id: JobId, jobs: JobsDep) -> Job:
    return jobs.get(job_id)
