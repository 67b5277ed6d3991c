"""Long operations as jobs: an id a client polls, a status, a progress and an error.

`Jobs.start(kind, target, work)` records a job and runs `work(job_progress)` in the
background; a client polls GET /api/v1/jobs/{id}. Callers hold whatever per-resource
lock the work needs (see hvagent.services.vms.OperationLocks). On agent start every job
still `running` becomes `failed` ("agent restarted"): its worker died with the agent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from hvagent.errors import HVError, NotFound
from hvagent.store import Store
from hvagent.store.jobs import JobRow, JobStatus

__all__ = ["Job", "JobStatus", "Jobs", "Progress", "Work"]

log = logging.getLogger(__name__)


class Job(BaseModel):
    id: str
    kind: str
    target: str
    status: JobStatus
    progress: float  # 0.0 .. 1.0
    error: str | None = None
    result: Any = None
    created_at: float
    updated_at: float
    finished_at: float | None = None


Progress = Callable[[float], None]
Work = Callable[[Progress], Awaitable[Any]]


class Jobs:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def recover(self) -> int:
        """Fail the jobs a previous agent process left running; returns how many."""
        return self.store.jobs.fail_running("agent restarted")

    def create(self, kind: str, target: str) -> Job:
        return _job(self.store.jobs.add(uuid.uuid4().hex, kind, target))

    def set_progress(self, job_id: str, progress: float) -> None:
        self.store.jobs.set_progress(job_id, max(0.0, min(1.0, progress)))

    def finish(self, job_id: str, error: str | None = None, result: Any = None) -> None:
        self.store.jobs.finish(job_id, error, result)

    def start(self, kind: str, target: str, work: Work,
              on_done: Callable[[], None] | None = None) -> Job:
        """Record a job and run `work` in the background. `on_done` runs after it
        finishes either way (e.g. to release a lock)."""
        job = self.create(kind, target)

        async def run() -> None:
            try:
                result = await work(lambda p: self.set_progress(job.id, p))
            except HVError as e:
                self.finish(job.id, error=e.message)
            except Exception as e:  # a job must end failed, never stay running
                log.exception("job %s (%s %s) failed", job.id, kind, target)
                self.finish(job.id, error=f"{type(e).__name__}: {e}")
            else:
                self.finish(job.id, result=result)
            finally:
                self._tasks.pop(job.id, None)
                if on_done is not None:
                    on_done()

        self._tasks[job.id] = asyncio.get_running_loop().create_task(run())
        return job

    def get(self, job_id: str) -> Job:
        row = self.store.jobs.get(job_id)
        if row is None:
            raise NotFound(f"job {job_id}: no such job")
        return _job(row)

    def list(self, target: str | None = None) -> list[Job]:
        return [_job(r) for r in self.store.jobs.list(target)]

    async def wait(self, job_id: str) -> Job:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        return self.get(job_id)


def _job(row: JobRow) -> Job:
    return Job.model_validate(dataclasses.asdict(row))
