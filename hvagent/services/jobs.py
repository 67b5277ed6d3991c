"""Long operations as jobs: an id a client polls, a status, a progress and an error.

`Jobs.start(kind, target, work)` records a job and runs `work(job_progress)` in the
background; a client polls GET /api/v1/jobs/{id}. Callers hold whatever per-resource
lock the work needs (see hvagent.services.vms.OperationLocks). On agent start every job
still `running` becomes `failed` ("agent restarted"): its worker died with the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from hvagent.errors import HVError, NotFound
from hvagent.store import Store

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


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
        now = time.time()
        return self.store.execute(
            "UPDATE jobs SET status = ?, error = ?, updated_at = ?, finished_at = ? "
            "WHERE status = ?",
            (JobStatus.FAILED, "agent restarted", now, now, JobStatus.RUNNING),
        )

    def create(self, kind: str, target: str) -> Job:
        now = time.time()
        job_id = uuid.uuid4().hex
        self.store.execute(
            "INSERT INTO jobs (id, kind, target, status, progress, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?)",
            (job_id, kind, target, JobStatus.RUNNING, 0.0, now, now),
        )
        return self.get(job_id)

    def set_progress(self, job_id: str, progress: float) -> None:
        self.store.execute(
            "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND status = ?",
            (max(0.0, min(1.0, progress)), time.time(), job_id, JobStatus.RUNNING),
        )

    def finish(self, job_id: str, error: str | None = None, result: Any = None) -> None:
        now = time.time()
        status = JobStatus.FAILED if error else JobStatus.SUCCEEDED
        self.store.execute(
            # A failed job keeps the progress it reached.
            "UPDATE jobs SET status = ?, error = ?, result = ?, "
            "progress = CASE WHEN ? THEN 1.0 ELSE progress END, "
            "updated_at = ?, finished_at = ? WHERE id = ?",
            (status, error, json.dumps(result), error is None, now, now, job_id),
        )

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
        rows = self.store.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"job {job_id}: no such job")
        return _job(rows[0])

    def list(self, target: str | None = None) -> list[Job]:
        if target is None:
            rows = self.store.query("SELECT * FROM jobs ORDER BY created_at DESC")
        else:
            rows = self.store.query(
                "SELECT * FROM jobs WHERE target = ? ORDER BY created_at DESC", (target,)
            )
        return [_job(r) for r in rows]

    async def wait(self, job_id: str) -> Job:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        return self.get(job_id)


def _job(row: Any) -> Job:
    d = dict(row)
    d["result"] = json.loads(d["result"]) if d.get("result") else None
    return Job.model_validate(d)
