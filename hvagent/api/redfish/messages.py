"""Redfish's extended errors: every error answer under /redfish is an `error` object
whose `@Message.ExtendedInfo` names a message of DMTF's Base registry (shipped here,
Base.1.22.1.json), with its arguments filled in; `message` is the agent's own one line.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

REGISTRY_FILE = Path(__file__).with_name("Base.1.22.1.json")
REGISTRY_PREFIX = "Base.1.22"
MESSAGE_TYPE = "#Message.v1_3_0.Message"

# The Base message each status answers with (those without arguments, or with the
# arguments every such answer has).
BY_STATUS: dict[int, str] = {
    400: "GeneralError", 401: "NoValidSession", 403: "InsufficientPrivilege",
    404: "ResourceNotFound", 405: "OperationNotAllowed", 409: "ResourceInUse",
    412: "PreconditionFailed", 415: "GeneralError", 422: "GeneralError",
    500: "InternalError", 501: "GeneralError", 503: "ServiceTemporarilyUnavailable",
}


@cache
def registry() -> dict[str, Any]:
    return json.loads(REGISTRY_FILE.read_text())  # type: ignore[no-any-return]


def message(key: str, *args: str, resolution: str | None = None) -> dict[str, Any]:
    """One `Message` object of the Base registry, its %1.. filled with `args`."""
    entry = registry()["Messages"][key]
    text = entry["Message"]
    want = int(entry.get("NumberOfArgs", 0))
    args = (tuple(args) + ("",) * want)[:want]
    for i, a in enumerate(args, 1):
        text = text.replace(f"%{i}", a)
    out: dict[str, Any] = {
        "@odata.type": MESSAGE_TYPE, "MessageId": f"{REGISTRY_PREFIX}.{key}",
        "Message": text, "MessageArgs": list(args),
        "MessageSeverity": entry.get("MessageSeverity") or entry.get("Severity", "Critical"),
        "Resolution": resolution or entry.get("Resolution", "None."),
    }
    return out


def redfish_error(status: int, detail: str, headers: dict[str, str] | None = None,
                  key: str | None = None, args: tuple[str, ...] = (),
                  **_: Any) -> JSONResponse:
    """The extended-error answer for `status`; `detail` is the line a client shows."""
    key = key or BY_STATUS.get(status, "GeneralError")
    if key == "ResourceNotFound" and not args:
        args = ("Resource", detail.split(":", 1)[0])
    if key == "ServiceTemporarilyUnavailable" and not args:
        args = ("5",)
    info = message(key, *args, resolution=detail)
    body = {"error": {"code": info["MessageId"], "message": detail,
                      "@Message.ExtendedInfo": [info]}}
    h = {"OData-Version": "4.0", **(headers or {})}
    return JSONResponse(body, status_code=status, headers=h)
