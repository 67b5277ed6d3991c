"""The HTTP side of access control: who sends a request, what each route needs, and the
401/403 answers. The decisions themselves are hvagent.access's.

Every route declares the one privilege it needs, on an ACL path, with
`Depends(require(Privilege.X, "/vms/{name}"))`; `route_privileges(app)` lists them and
`check_routes(app)` refuses to build an app with a route that declares none. Where the
ACL path depends on a stored object (a job acts on the VM it targets), a `resolve`
function computes it from the request; `or_else` names a second requirement that also
suffices (Proxmox's `['or', ...]` checks). Routes that return lists filter them with
`permitted(request, privilege, path)`, the same decision per item.

One request: `SecurityMiddleware` finds the principal (a bearer token, else a uid-0 peer on
the unix socket is `root`) and answers 401 when there is none; the route's `Requirement`
checks the principal's roles on the ACL path (hvagent.access.security) and answers 403;
the middleware then writes the audit entry of every mutating request and every denial,
once.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from hvagent.access.principal import ROOT, Principal, current_principal
from hvagent.access.privileges import Privilege
from hvagent.access.security import Security
from hvagent.api.errors import (
    MUTATING,
    PROBLEM_SCHEMA,
    error_content,
    error_response,
    is_redfish,
)
from hvagent.api.routes import routes
from hvagent.errors import PolicyDenied

log = logging.getLogger(__name__)

# Routes anyone may read: the API description and the CA certificate clients pin; and
# what Redfish leaves open (its service root, version and metadata documents, and the
# login itself: POST Sessions).
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/ca.pem", "/redfish", "/redfish/", "/redfish/v1",
                          "/redfish/v1/", "/redfish/v1/$metadata", "/redfish/v1/odata"})
PUBLIC_ROUTES = frozenset({("POST", "/redfish/v1/SessionService/Sessions")})


def is_public(method: str, path: str) -> bool:
    return path in PUBLIC_PATHS or (method, path.rstrip("/")) in PUBLIC_ROUTES


def _basic(cred: str) -> tuple[str, str]:
    try:
        user, _, password = base64.b64decode(cred, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return user, password


def authenticate(security: Security, scope: MutableMapping[str, Any]) -> tuple[
        Principal | None, str, str]:
    """(principal, why-not, who-to-blame-in-the-audit-log) of a request: its bearer
    token, else a uid-0 peer on the unix socket is root."""
    if not security.enforce:
        return Principal(ROOT), "", ROOT
    header = session = None
    for k, v in scope.get("headers", ()):
        if k == b"authorization":
            header = v.decode("latin-1")
        elif k == b"x-auth-token":
            session = v.decode("latin-1").strip()
    if header is not None:
        scheme, _, cred = header.strip().partition(" ")
        if scheme.lower() == "basic" and cred.strip():
            # HTTP basic (Redfish): the principal's name and one of its API tokens.
            user, password = _basic(cred.strip())
            principal = security.sessions.check_password(user, password)
            if principal is None:
                return None, "invalid user name or password (a token of that user)", \
                    user or "-"
            return principal, "", principal.name
        if scheme.lower() != "bearer" or not cred.strip():
            return None, "malformed Authorization header (expected: Bearer TOKEN)", "-"
        return security.token_principal(cred.strip())
    if session is not None:
        found = security.sessions.lookup(session)
        if found is None:
            return None, "invalid or expired session (X-Auth-Token)", "-"
        return found.principal, "", found.principal.name
    uid = (scope.get("state") or {}).get("peer_uid")
    if uid == 0:
        return Principal(ROOT), "", ROOT
    who = f"uid:{uid}" if uid is not None else "-"
    return None, "authentication required (Authorization: Bearer TOKEN)", who


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
    if security is None:
        return False
    return security.permitted(getattr(request.state, "principal", None), privilege, path)


def requirement_of(route: Any) -> Requirement | None:
    """The Requirement a route declares (its last one), None when it declares none."""
    req = None
    dependant = getattr(route, "dependant", None)
    if dependant is not None:
        for dep in dependant.dependencies:
            if isinstance(dep.call, Requirement):
                req = dep.call
    return req


def declared_routes(app: Any) -> Iterator[tuple[str, Any, Requirement | None]]:
    """(full path, route, its Requirement or None) for every route of `app`."""
    for path, route in routes(app):
        yield path, route, requirement_of(route)


def route_privileges(app: Any) -> dict[tuple[str, str], Requirement]:
    """(method, path) -> Requirement for every route of `app` that declares one."""
    out: dict[tuple[str, str], Requirement] = {}
    for path, route, req in declared_routes(app):
        if req is not None:
            for method in route.methods:
                out[(method, path)] = req
    return out


def undeclared_routes(app: Any) -> list[str]:
    """Routes that are neither public nor declare a privilege."""
    return sorted(f"{','.join(sorted(getattr(route, 'methods', None) or ['*']))} {path}"
                  for path, route, req in declared_routes(app)
                  if req is None and path not in PUBLIC_PATHS
                  and not all(is_public(m, path) for m in getattr(route, "methods", None)
                              or ["*"]))


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
            await _send(send, error_response(path, 503, "unavailable",
                                             "the agent is starting"))
            return
        principal, why, who = authenticate(security, scope)
        if principal is None and not is_public(method, path):
            await _send(send, error_response(path, 401, "unauthorized", why, {
                "www-authenticate": "Basic realm=\"hvagent\"" if is_redfish(path)
                else "Bearer"}))
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


async def _send(send: Send, response: JSONResponse) -> None:
    await response({"type": "http"}, _no_receive, send)


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
        return error_response(request.url.path, 403, "forbidden", exc.message, kind="policy")

    _document(app)


def _document(app: FastAPI) -> None:
    """Put what access control adds into the OpenAPI document: the bearer scheme, each
    operation's privilege (x-privilege, x-acl-path), its 401/403 answers, and the
    problem+json body every error (also 422) really has."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        comps = schema.setdefault("components", {})
        comps.setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
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
                                   "content": error_content(path)}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
