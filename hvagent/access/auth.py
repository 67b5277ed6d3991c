"""Authentication and authorization of every API request, and how routes declare what
they need.

Every route declares the one privilege it needs, on an ACL path, with
`Depends(require(Privilege.X, "/vms/{name}"))`; `route_privileges(app)` lists them and
`check_routes(app)` refuses to build an app with a route that declares none. Where the
ACL path depends on a stored object (a job acts on the VM it targets), a `resolve`
function computes it from the request; `or_else` names a second requirement that also
suffices (Proxmox's `['or', ...]` checks). Routes that return lists filter them with
`permitted(request, privilege, path)`, the same decision per item.

One request: `SecurityMiddleware` finds the principal (a bearer token, else a uid-0 peer on
the unix socket is `root`) and answers 401 when there is none; the route's `Requirement`
checks the principal's roles on the ACL path (hvagent.access.policy) and answers 403; the
middleware then writes the audit entry of every mutating request and every denial, once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from hvagent.access.audit import AuditLog
from hvagent.access.policy import (
    ROOT,
    AccessControl,
    Admission,
    HostPolicy,
    PolicyDenied,
    Principal,
    Usage,
    current_principal,
    vm_of,
)
from hvagent.access.tokens import Tokens, TokenStatus
from hvagent.spec import VMSpec
from hvagent.store import Store

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Routes anyone may read: the API description and the CA certificate clients pin.
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/ca.pem"})
PROBLEM = "application/problem+json"


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


class Security:
    """The running agent's access control: tokens, ACLs, VM owners, audit log."""

    def __init__(self, store: Store, policy: HostPolicy, enforce: bool = True) -> None:
        self.store = store
        self.policy = policy
        self.tokens = Tokens(store)
        self.audit = AuditLog(store)
        # enforce=False exists for bench/auth.py only (the same app without the checks).
        self.enforce = enforce

    def admission(self) -> Admission:
        """The host-policy hook the VM service calls on create and resource changes."""
        return Admission(self.policy, self.access, usage=self.usage,
                         record_owner=self.tokens.set_owner, owner=self.tokens.owner)

    def access(self) -> AccessControl:
        # Stored grants are read on every decision: `hvagent token create --role` on the
        # host takes effect at once.
        return AccessControl(self.policy, self.tokens.grants())

    def authenticate(self, scope: MutableMapping[str, Any]) -> tuple[Principal | None, str,
                                                                       str]:
        """(principal, why-not, who-to-blame-in-the-audit-log)."""
        if not self.enforce:
            return Principal(ROOT), "", ROOT
        header = None
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        if header is not None:
            scheme, _, cred = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not cred.strip():
                return None, "malformed Authorization header (expected: Bearer TOKEN)", "-"
            info = self.tokens.lookup(cred.strip())
            if info is None:
                return None, "invalid token", "-"
            status = info.status()
            if status is not TokenStatus.VALID:
                return None, f"token {info.id} is {status}", info.principal
            return Principal(info.principal, info.id), "", info.principal
        uid = (scope.get("state") or {}).get("peer_uid")
        if uid == 0:
            return Principal(ROOT), "", ROOT
        who = f"uid:{uid}" if uid is not None else "-"
        return None, "authentication required (Authorization: Bearer TOKEN)", who

    def allowed(self, principal: Principal, privilege: str, path: str) -> bool:
        if principal.is_root:
            return True
        vm = vm_of(path)
        owner = self.tokens.owner(vm) if vm is not None else None
        return self.access().allowed(principal, privilege, path, owner)

    def usage(self, principal: str | None, exclude: str) -> Usage:
        """vCPUs and memory (ceilings) of the host's VMs, or of those `principal` owns,
        leaving out the VM `exclude` (the one being created or changed)."""
        vcpus = mem = count = 0
        for row in self.store.list_vms(owned_by=principal):
            if row.name == exclude:
                continue
            spec = VMSpec.model_validate_json(row.spec)
            vcpus += max(spec.vcpus, spec.max_vcpus or 0)
            mem += max(spec.memory_mib, spec.max_memory_mib or 0)
            count += 1
        return Usage(vcpus, mem, count)


# route declarations


PathResolver = Callable[[Request], str | None]


class Requirement:
    """A route's privilege on an ACL path. The path's placeholders are filled from the
    URL, or `resolve(request)` computes the path (None: the object it would be computed
    from does not exist). `or_else`, when set, is a requirement that suffices instead."""

    def __init__(self, privilege: Privilege, path: str, resolve: PathResolver | None = None,
                 or_else: Requirement | None = None) -> None:
        self.privilege = privilege
        self.path = path
        self.resolve = resolve
        self.or_else = or_else

    def shown_path(self, request: Request) -> str:
        """The declared path with the URL's values: what a denial may tell the client
        (a resolved path could name a VM the principal may not know about)."""
        return self.path.format_map(_Default(request.path_params))

    def acl_path(self, request: Request) -> str | None:
        return self.shown_path(request) if self.resolve is None else self.resolve(request)

    def permits(self, request: Request, path: str | None) -> bool:
        """Whether the request's principal meets this requirement on `path` (None: on
        nothing) or meets `or_else`. Routes that list items ask it once per item."""
        if path is not None and permitted(request, self.privilege, path):
            return True
        alt = self.or_else
        return alt is not None and alt.permits(request, alt.acl_path(request))

    async def __call__(self, request: Request) -> None:
        request.state.privilege = str(self.privilege)
        security: Security | None = getattr(request.app.state, "security", None)
        if security is None:
            raise HTTPException(503, "the agent is starting")
        if not security.enforce:
            return
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:  # the middleware answers 401 first; never reached
            raise HTTPException(401, "authentication required")
        path = self.acl_path(request)
        shown = self.shown_path(request)
        # A missing object: the audit log gets the declared path. Who may not pass
        # `or_else` gets the same 403 as for an object it may not read, so it cannot
        # tell the two apart; the route answers 404 to the others.
        request.state.acl_path = path if path is not None else shown
        if not self.permits(request, path):
            msg = f"{principal.name} lacks {self.privilege} on {shown}"
            request.state.denial = msg
            raise HTTPException(403, msg)

    def __repr__(self) -> str:
        alt = f" or {self.or_else!r}" if self.or_else is not None else ""
        how = ", resolved" if self.resolve is not None else ""
        return f"require({self.privilege}, {self.path!r}{how}){alt}"


class _Default(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def require(privilege: Privilege, path: str = "/vms/{name}", *,
            resolve: PathResolver | None = None,
            or_else: Requirement | None = None) -> Requirement:
    return Requirement(privilege, path, resolve, or_else)


def permitted(request: Request, privilege: Privilege, path: str) -> bool:
    """Whether the request's principal holds `privilege` on `path`: for routes that
    return only the items of a list the principal may see."""
    security: Security | None = getattr(request.app.state, "security", None)
    if security is None or not security.enforce:
        return security is not None
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal is not None and security.allowed(principal, privilege, path)


def _routes(app: Any) -> Iterator[tuple[str, Any, Requirement | None]]:
    """(full path, route, its Requirement or None) for every route of `app`."""

    def walk(routes: Any, prefix: str) -> Iterator[tuple[str, Any, Requirement | None]]:
        for route in routes:
            original = getattr(route, "original_router", None)
            if original is not None:  # FastAPI >= 0.13x includes routers lazily
                yield from walk(original.routes, prefix + route.include_context.prefix)
                continue
            dependant = getattr(route, "dependant", None)
            req = None
            if dependant is not None:
                for dep in dependant.dependencies:
                    if isinstance(dep.call, Requirement):
                        req = dep.call
            yield prefix + getattr(route, "path", ""), route, req

    yield from walk(app.routes, "")


def route_privileges(app: Any) -> dict[tuple[str, str], Requirement]:
    """(method, path) -> Requirement for every route of `app` that declares one."""
    out: dict[tuple[str, str], Requirement] = {}
    for path, route, req in _routes(app):
        if req is not None:
            for method in route.methods:
                out[(method, path)] = req
    return out


def undeclared_routes(app: Any) -> list[str]:
    """Routes that are neither public nor declare a privilege."""
    return sorted(f"{','.join(sorted(getattr(route, 'methods', None) or ['*']))} {path}"
                  for path, route, req in _routes(app)
                  if req is None and path not in PUBLIC_PATHS)


def check_routes(app: Any) -> None:
    missing = undeclared_routes(app)
    if missing:
        raise RuntimeError("routes without a declared privilege (add "
                           "Depends(require(Privilege.X, PATH))): " + "; ".join(missing))


# the middleware


Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class SecurityMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): authentication, 401s, the audit entries."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        security: Security | None = getattr(scope["app"].state, "security", None)
        state = scope.setdefault("state", {})
        method, path = scope["method"], scope["path"]
        action = f"{method} {path}"
        if security is None:
            await _problem(send, 503, "the agent is starting")
            return
        principal, why, who = security.authenticate(scope)
        if principal is None and path not in PUBLIC_PATHS:
            await _problem(send, 401, why, {"www-authenticate": "Bearer"})
            security.audit.record(principal=who, action=action, privilege=None,
                                  target=path, result="denied", status=401, detail=why)
            return
        state["principal"] = principal
        status = [500]

        async def send_status(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        reset = current_principal.set(principal)
        try:
            await self.app(scope, receive, send_status)
        finally:
            current_principal.reset(reset)
            code = status[0]
            if method in MUTATING or code in (401, 403):
                result = "ok" if code < 400 else "denied" if code in (401, 403) else "failed"
                security.audit.record(
                    principal=principal.name if principal else who, action=action,
                    privilege=state.get("privilege"), target=state.get("acl_path", path),
                    result=result, status=code, detail=state.get("denial", ""))


async def _problem(send: Send, status: int, detail: str,
                   headers: dict[str, str] | None = None) -> None:
    resp = JSONResponse({"type": "about:blank", "title": "unauthorized" if status == 401
                         else "unavailable", "status": status, "detail": detail},
                        status_code=status, media_type=PROBLEM, headers=headers)
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> MutableMapping[str, Any]:
    return {"type": "http.disconnect"}


# wiring


def install(app: FastAPI) -> None:
    """Enforce and document access control on `app`: refuses to build it when a route
    declares no privilege. Call after all routers are included."""
    check_routes(app)
    app.add_middleware(SecurityMiddleware)

    @app.exception_handler(PolicyDenied)
    async def _denied(request: Request, exc: PolicyDenied) -> JSONResponse:
        request.state.denial = exc.message
        return JSONResponse({"type": "about:blank", "title": "forbidden", "status": 403,
                             "detail": exc.message, "kind": "policy"},
                            status_code=403, media_type=PROBLEM)

    _document(app)


_PROBLEM_SCHEMA = {
    "type": "object", "required": ["title", "status", "detail"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                   "status": {"type": "integer"}, "detail": {"type": "string"}},
}


def _document(app: FastAPI) -> None:
    """Put what access control adds into the OpenAPI document: the bearer scheme, each
    operation's privilege (x-privilege, x-acl-path), its 401/403 answers, and the
    problem+json body every error (also 422) really has."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        problem = {"$ref": "#/components/schemas/Problem"}
        comps = schema.setdefault("components", {})
        comps.setdefault("schemas", {})["Problem"] = _PROBLEM_SCHEMA
        comps.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "API token from `hvagent token create` (a uid-0 peer on the "
                           "unix socket needs none)"}
        for (method, path), req in route_privileges(app).items():
            op = schema.get("paths", {}).get(path, {}).get(method.lower())
            if op is None:
                continue
            op["x-privilege"] = str(req.privilege)
            op["x-acl-path"] = req.path
            if req.or_else is not None:  # also enough on its own
                op["x-or-privilege"] = str(req.or_else.privilege)
                op["x-or-acl-path"] = req.or_else.path
            op["security"] = [{"bearer": []}]
            responses = op.setdefault("responses", {})
            for code, text in (("401", "no valid token"), ("403", "not allowed"),
                               ("422", "invalid request")):
                if code == "422" and code not in responses:
                    continue
                responses[code] = {"description": text,
                                   "content": {PROBLEM: {"schema": problem}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
