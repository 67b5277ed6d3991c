"""The `jobs` table: one row per long operation (hvagent.services.jobs runs them).

`result` is stored as JSON and read back as the value it encodes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvagent.store import Store


class JobStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class JobRow:
    id: str
    kind: str
    target: str
    status: JobStatus
    progress: float
    error: str | None
    result: Any  # the decoded JSON value (None when the job has none)
    created_at: float
    updated_at: float
    finished_at: float | None


class JobTable:
    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, job_id: str, kind: str, target: str) -> JobRow:
        """A new running job with progress 0."""
        now = time.time()
        self._store.execute(
            "INSERT INTO jobs (id, kind, target, status, progress, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?)", (job_id, kind, target, JobStatus.RUNNING, 0.0, now, now))
        return JobRow(job_id, kind, target, JobStatus.RUNNING, 0.0, None, None, now, now, None)

    def get(self, job_id: str) -> JobRow | None:
        rows = self._store.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _row(rows[0]) if rows else None

    def list(self, target: str | None = None) -> list[JobRow]:
        """Newest first; only the jobs acting on `target` when given."""
        if target is None:
            rows = self._store.query("SELECT * FROM jobs ORDER BY created_at DESC")
        else:
            rows = self._store.query(
                "SELECT * FROM jobs WHERE target = ? ORDER BY created_at DESC", (target,))
        return [_row(r) for r in rows]

    def set_progress(self, job_id: str, progress: float) -> None:
        """Only a running job moves (a late report after the end changes nothing)."""
        self._store.execute(
            "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND status = ?",
            (progress, time.time(), job_id, JobStatus.RUNNING))

    def finish(self, job_id: str, error: str | None = None, result: Any = None) -> None:
        """Failed when `error` is given, else succeeded with `result` and progress 1."""
        now = time.time()
        status = JobStatus.FAILED if error else JobStatus.SUCCEEDED
        self._store.execute(
            # A failed job keeps the progress it reached.
            "UPDATE jobs SET status = ?, error = ?, result = ?, "
            "progress = CASE WHEN ? THEN 1.0 ELSE progress END, "
            "updated_at = ?, finished_at = ? WHERE id = ?",
            (status, error, json.dumps(result), error is None, now, now, job_id))

    def fail_running(self, error: str) -> int:
        """Fail every job still running with `error`; returns how many."""
        now = time.time()
        return self._store.execute(
            "UPDATE jobs SET status = ?, error = ?, updated_at = ?, finished_at = ? "
            "WHERE status = ?", (JobStatus.FAILED, error, now, now, JobStatus.RUNNING))


def _row(r: Any) -> JobRow:
    d = dict(r)
    d["result"] = json.loads(d["result"]) if d.get("result") else None
    d["status"] = JobStatus(d["status"])
    return JobRow(**d)
