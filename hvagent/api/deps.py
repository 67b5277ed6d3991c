"""FastAPI dependencies that hand routes the service objects of the running agent."""

from __future__ import annotations

from fastapi import Request

from hvagent.access.security import Security
from hvagent.services.jobs import Jobs
from hvagent.services.vms import VMService


def vms(request: Request) -> VMService:
    return request.app.state.vms  # type: ignore[no-any-return]


def jobs(request: Request) -> Jobs:
    return request.app.state.jobs  # type: ignore[no-any-return]


def security(request: Request) -> Security:
    return request.app.state.security  # type: ignore[no-any-return]
