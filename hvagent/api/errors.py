"""problem+json error responses (RFC 9457) for the agent's own errors and for request
validation, and their declaration in the OpenAPI document. `detail` is the one line a
client shows the user.

The statuses, stated once: 400 the request is well-formed but cannot be carried out as
asked (a file it names does not exist or is outside the storage directory, a host limit,
a cross-field rule a service checks); 404 an object it names does not exist; 409 the
object's state or another operation in progress stands in the way; 422 the request
breaks a rule of the schema (or a cross-field rule the schema's description states);
500 the hypervisor or the host failed to do something valid. 405 (wrong method on a
known path) carries the `Allow` header RFC 9110 requires.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from hvagent.api.routes import routes
from hvagent.errors import Busy, HVError

STATUS = {
    "invalid": 400,
    "not-found": 404,
    "conflict": 409,
    "busy": 409,
    "failed": 500,
    "error": 500,
}
PROBLEM = "application/problem+json"
# The body of every error answer, in the OpenAPI document (components/schemas/Problem).
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["title", "status", "detail"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                   "status": {"type": "integer"}, "detail": {"type": "string"}},
}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
# Redfish's extended error (DSP0266 "Error responses"), the body of every error under
# /redfish.
REDFISH_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["code", "message", "@Message.ExtendedInfo"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "@Message.ExtendedInfo": {"type": "array",
                                                 "items": {"type": "object"}}}}},
}


def error_content(path: str) -> dict[str, Any]:
    """The OpenAPI `content` of an error answer of the operation at `path`."""
    if is_redfish(path):
        return {"application/json": {"schema": {"$ref": "#/components/schemas/RedfishError"}}}
    return {PROBLEM: {"schema": PROBLEM_REF}}
# The methods that change something: they can meet a conflict or fail, and every one is
# audited (hvagent.api.auth).
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def is_redfish(path: str) -> bool:
    return path == "/redfish" or path.startswith("/redfish/")


def error_response(path: str, status: int, title: str, detail: str,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The error answer for a request to `path`: Redfish's extended error under
    /redfish (hvagent.api.redfish.messages), problem+json everywhere else."""
    if is_redfish(path):
        from hvagent.api.redfish.messages import redfish_error  # only Redfish needs it

        return redfish_error(status, detail, headers, **extra)
    return problem(status, title, detail, headers, **extra)


def _field(loc: tuple[Any, ...]) -> str:
    # ("body", "disks", 0, "format") -> "disks[0].format"
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_detail(exc: RequestValidationError) -> str:
    msgs = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        field = _field(tuple(err["loc"]))
        msgs.append(f"{field}: {msg}" if field else msg)
    return "; ".join(msgs)


def install(app: FastAPI) -> None:
    @app.exception_handler(HVError)
    async def _hv(request: Request, exc: HVError) -> JSONResponse:
        extra: dict[str, Any] = {"kind": exc.kind}
        if isinstance(exc, Busy):
            extra["operation"] = exc.operation
        # An error of one face (Redfish) may name its own status and message key.
        status = getattr(exc, "status", None) or STATUS.get(exc.kind, 500)
        if getattr(exc, "key", None):
            extra.update(key=exc.key, args=getattr(exc, "args_", ()))  # type: ignore[attr-defined]
        return error_response(request.url.path, status, exc.kind, exc.message, **extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # `errors`: each broken rule's field and pydantic type; `cross_field` marks a
        # rule across fields, which the schema states only in its description.
        broken = [{"field": _field(tuple(e["loc"])), "type": str(e["type"])}
                  for e in exc.errors()]
        return error_response(request.url.path, 422, "invalid", validation_detail(exc),
                              kind="invalid", errors=broken)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route matching the path; a path served by
            # several routes (GET and DELETE /vms/{name}) allows all their methods.
            headers["Allow"] = allowed_methods(app, request)
        return error_response(request.url.path, exc.status_code, "http", str(exc.detail),
                              headers=headers or None)


def allowed_methods(app: FastAPI, request: Request) -> str:
    """The methods of the resource the path names: of the templates matching it, those
    with the fewest parameters (/vms/import is the import resource, not the VM
    `import`), as the OpenAPI document describes it."""
    found: dict[int, set[str]] = {}
    for path, route in routes(app):
        if compile_path(path)[0].match(request.url.path):
            found.setdefault(path.count("{"), set()).update(getattr(route, "methods", ()))
    return ", ".join(sorted(found[min(found)])) if found else ""


def _declared(path: str, route: APIRoute, method: str) -> dict[str, str]:
    """The error statuses a route can answer, from its shape (the handlers above are the
    only way an error leaves the agent): every operation on a named object may find it
    missing, every change may meet a conflicting state or fail in QEMU, and every request
    with parameters may name something that cannot be used."""
    has_params = bool(route.dependant.path_params or route.dependant.query_params
                      or route.dependant.body_params)
    out: dict[str, str] = {}
    if has_params:
        out["400"] = "the request cannot be carried out as asked"
    if route.dependant.path_params:
        out["404"] = "no such object"
    if method in MUTATING or "/disks/" in path:
        out["409"] = "the object's state or another operation is in the way"
    if method in MUTATING:
        out["500"] = "the hypervisor or the host failed"
    if is_redfish(path) and method in MUTATING:
        # Redfish routes read their JSON bodies themselves (Redfish's own error keys);
        # the login answers 401 to a wrong password.
        out["400"] = "the request cannot be carried out as asked"
        out["401"] = "no valid credentials"
    return out


def declare(app: FastAPI) -> None:
    """Declare in the OpenAPI document every error status each operation can answer,
    with the problem+json body. Call once every router is included."""
    build = app.openapi
    done = False

    def openapi() -> dict[str, Any]:
        nonlocal done
        schema = build()
        if done:
            return schema
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", PROBLEM_SCHEMA)
        schemas.setdefault("RedfishError", REDFISH_ERROR_SCHEMA)
        for path, route in routes(app):
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            for method in route.methods or ():
                op = schema.get("paths", {}).get(path, {}).get(method.lower())
                if op is None:
                    continue
                responses = op.setdefault("responses", {})
                for code, text in _declared(path, route, method).items():
                    responses.setdefault(code, {
                        "description": text, "content": error_content(path)})
                if is_redfish(path):
                    # FastAPI documents its 422 as application/json with its own
                    # schema; under /redfish the body is the Redfish error.
                    for code, resp in responses.items():
                        if code[0] in "45":
                            resp["content"] = error_content(path)
        done = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
