"""problem+json error responses (RFC 9457) for the agent's own errors and for request
validation. `detail` is the one line a client shows the user."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


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
        return problem(STATUS.get(exc.kind, 500), exc.kind, exc.message, **extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, "invalid", validation_detail(exc), kind="invalid")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, "http", str(exc.detail))
