"""The audit log: every mutating request and every denial, once, in the store
(hvagent.store.audit) and as a log line (journald keeps the agent's stderr). Entries are
only ever appended; no API changes or removes them."""

from __future__ import annotations

import dataclasses
import logging
import time

from pydantic import BaseModel

from hvagent.store import Store

log = logging.getLogger("hvagent.access.audit")


class AuditEntry(BaseModel):
    id: int
    time: float
    principal: str
    action: str  # "POST /api/v1/vms/a/start"
    privilege: str | None  # what the route needs (None: the request never reached one)
    target: str  # ACL path, e.g. /vms/a
    result: str  # ok | denied | failed
    status: int  # HTTP status answered
    detail: str


class AuditLog:
    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, *, principal: str, action: str, privilege: str | None, target: str,
               result: str, status: int, detail: str = "") -> None:
        self.store.audit.append(time=time.time(), principal=principal, action=action,
                                privilege=privilege, target=target, result=result,
                                status=status, detail=detail)
        log.info("principal=%s action=%r privilege=%s target=%s result=%s status=%d%s",
                 principal, action, privilege or "-", target, result, status,
                 f" detail={detail!r}" if detail else "")

    def list(self, since: float | None = None, limit: int = 1000) -> list[AuditEntry]:
        """Entries at or after `since` (unix time), oldest first, at most `limit` (the
        newest ones when there are more)."""
        return [AuditEntry(**dataclasses.asdict(r))
                for r in self.store.audit.list(since or 0.0, limit)]
