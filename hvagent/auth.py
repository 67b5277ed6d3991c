"""Privileges and how routes declare them.

Every route declares the one privilege it needs with `Depends(require(...))`. For now
the agent listens only on a root-only unix socket (0600), so `require` records the
privilege on the request and lets it through; token -> principal -> role checks plug in
here without touching any route. `route_privileges(app)` lists what each route needs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from fastapi import Request


class Privilege(StrEnum):
    VM_ALLOCATE = "VM.Allocate"
    VM_CONFIG_CPU = "VM.Config.CPU"
    VM_CONFIG_MEMORY = "VM.Config.Memory"
    VM_CONFIG_DISK = "VM.Config.Disk"
    VM_CONFIG_NETWORK = "VM.Config.Network"
    VM_CONFIG_OPTIONS = "VM.Config.Options"
    VM_POWERMGMT = "VM.PowerMgmt"
    VM_CONSOLE = "VM.Console"
    VM_SNAPSHOT = "VM.Snapshot"
    VM_SNAPSHOT_ROLLBACK = "VM.Snapshot.Rollback"
    VM_AUDIT = "VM.Audit"
    DISK_READ = "Disk.Read"
    DISK_WRITE = "Disk.Write"
    NETWORK_ALLOCATE = "Network.Allocate"
    SYS_AUDIT = "Sys.Audit"
    SYS_MODIFY = "Sys.Modify"
    PERMISSIONS_MODIFY = "Permissions.Modify"


class Requirement:
    """A route's privilege on an ACL path; path placeholders are filled from the URL."""

    def __init__(self, privilege: Privilege, path: str) -> None:
        self.privilege = privilege
        self.path = path

    def acl_path(self, request: Request) -> str:
        return self.path.format_map(_Default(request.path_params))

    async def __call__(self, request: Request) -> None:
        # The unix socket is root-only: every caller is the local administrator.
        request.state.privilege = self.privilege
        request.state.acl_path = self.acl_path(request)

    def __repr__(self) -> str:
        return f"require({self.privilege}, {self.path!r})"


class _Default(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def require(privilege: Privilege, path: str = "/vms/{name}") -> Requirement:
    return Requirement(privilege, path)


def route_privileges(app: Any) -> dict[tuple[str, str], Requirement]:
    """(method, path) -> Requirement for every route of `app` that declares one."""
    out: dict[tuple[str, str], Requirement] = {}

    def walk(routes: Any, prefix: str) -> None:
        for route in routes:
            original = getattr(route, "original_router", None)
            if original is not None:  # FastAPI >= 0.13x includes routers lazily
                walk(original.routes, prefix + route.include_context.prefix)
                continue
            dependant = getattr(route, "dependant", None)
            if dependant is None:
                continue
            for dep in dependant.dependencies:
                if isinstance(dep.call, Requirement):
                    for method in route.methods:
                        out[(method, prefix + route.path)] = dep.call

    walk(app.routes, "")
    return out
