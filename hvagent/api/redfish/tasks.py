"""Redfish TaskService: the agent's jobs as Tasks (TaskState from the job's status,
PercentComplete from its progress), and task monitors: a long Redfish operation answers
202 with `Location: .../TaskMonitors/ID`; the monitor answers 202 while the job runs and
the finished Task (200) after. Who may read a job may read its task (hvagent.api.jobs).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from hvagent.access.privileges import Privilege as P
from hvagent.api import deps
from hvagent.api.auth import require
from hvagent.api.jobs import READ_JOB, SEE_ALL, job_acl_path
from hvagent.api.redfish.messages import message
from hvagent.api.redfish.odata import ROOT, RedfishError, answer, collection, resource
from hvagent.errors import NotFound
from hvagent.services.jobs import Job, Jobs
from hvagent.store.jobs import JobStatus

router = APIRouter(prefix=f"{ROOT}/TaskService", tags=["redfish"])
JobsDep = Annotated[Jobs, Depends(deps.jobs)]
TaskId = Annotated[str, Path(max_length=64)]

STATE = {JobStatus.RUNNING: "Running", JobStatus.SUCCEEDED: "Completed",
         JobStatus.FAILED: "Exception"}


def task_path(job_id: str) -> str:
    return f"{ROOT}/TaskService/Tasks/{job_id}"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


def render_task(job: Job) -> dict[str, Any]:
    body = resource(task_path(job.id), "Task", job.id, f"{job.kind} of {job.target}",
                    TaskState=STATE[job.status],
                    TaskStatus="Critical" if job.status is JobStatus.FAILED else "OK",
                    PercentComplete=round(job.progress * 100),
                    StartTime=_iso(job.created_at),
                    TaskMonitor=f"{ROOT}/TaskService/TaskMonitors/{job.id}",
                    Messages=[message("GeneralError", resolution=job.error)]
                    if job.error else [])
    if job.finished_at is not None:
        body["EndTime"] = _iso(job.finished_at)
    return body


def _job(jobs: Jobs, job_id: str) -> Job:
    try:
        return jobs.get(job_id)
    except NotFound:
        raise RedfishError(404, f"{job_id}: no such task", "ResourceNotFound", "Task",
                           job_id) from None


@router.get("", dependencies=[Depends(SEE_ALL)])
async def task_service() -> Response:
    return answer(resource(
        f"{ROOT}/TaskService", "TaskService", "TaskService", "Task service",
        ServiceEnabled=True, CompletedTaskOverWritePolicy="Oldest",
        LifeCycleEventOnTaskStateChange=False, DateTime=_iso(time.time()),
        Tasks={"@odata.id": f"{ROOT}/TaskService/Tasks"},
        Status={"State": "Enabled", "Health": "OK"}))


@router.get("/Tasks", dependencies=[Depends(require(P.VM_AUDIT, "/vms", or_else=SEE_ALL))])
async def tasks(request: Request, jobs: JobsDep) -> Response:
    found = jobs.list()
    if not SEE_ALL.permits(request, SEE_ALL.path):
        found = [j for j in found if READ_JOB.permits(request, job_acl_path(j))]
    return answer(collection(f"{ROOT}/TaskService/Tasks", "TaskCollection", "Tasks",
                             [task_path(j.id) for j in found]))


@router.get("/Tasks/{job_id}", dependencies=[Depends(READ_JOB)])
async def task(job_id: TaskId, jobs: JobsDep) -> Response:
    return answer(render_task(_job(jobs, job_id)))


@router.get("/TaskMonitors/{job_id}", dependencies=[Depends(READ_JOB)])
async def task_monitor(job_id: TaskId, jobs: JobsDep) -> Response:
    job = _job(jobs, job_id)
    if job.status is JobStatus.RUNNING:
        return answer(render_task(job), 202,
                      {"Location": f"{ROOT}/TaskService/TaskMonitors/{job.id}",
                       "Retry-After": "1"})
    return answer(render_task(job))
