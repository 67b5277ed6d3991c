"""DMTF Redfish: a second face of the agent's services under /redfish (no second
implementation), behind the same tokens, sessions and RBAC. One module per area:
service (root, $metadata, Managers, Chassis), systems (VMs and the host), accounts
(SessionService, AccountService), tasks (the agent's jobs)."""

from __future__ import annotations

from fastapi import APIRouter

from hvagent.api.redfish import accounts, service, systems, tasks
from hvagent.api.redfish.odata import ROOT

router = APIRouter()
router.include_router(service.router)
router.include_router(systems.router, prefix=ROOT)
router.include_router(accounts.router)
router.include_router(tasks.router)
