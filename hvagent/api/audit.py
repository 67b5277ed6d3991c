"""REST v1: the audit log (/api/v1/audit), read-only: entries cannot be changed or removed
through the API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from hvagent.access.audit import AuditEntry
from hvagent.access.privileges import Privilege as P
from hvagent.access.security import Security
from hvagent.api import deps
from hvagent.api.auth import require

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", dependencies=[Depends(require(P.SYS_AUDIT, "/"))])
async def list_audit(
    security: Annotated[Security, Depends(deps.security)],
    since: Annotated[float | None, Query(ge=0, description="unix time")] = None,
    limit: Annotated[int, Query(ge=1, le=100000)] = 1000,
) -> list[AuditEntry]:
    return security.audit.list(since=since, limit=limit)
