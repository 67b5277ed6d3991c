"""What every Redfish resource carries: `@odata.id`, `@odata.type` with the schema
version served (one table, the `$metadata` document is made from it), `@odata.etag`,
collections with `Members@odata.count`, and the JSON answer with `OData-Version` and
`ETag` headers. Ids that are not VM names: VM names never start with `_`, so the host's
system and chassis (`_host`) and the agent's manager (`_agent`) cannot collide with a VM.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from hvagent.errors import HVError

ROOT = "/redfish/v1"
HOST_ID = "_host"  # the host's ComputerSystem and Chassis
AGENT_ID = "_agent"  # the agent's Manager
REDFISH_VERSION = "1.22.0"

# Schema namespace -> the version served (DMTF's 2025.4 bundle).
SCHEMAS: dict[str, str] = {
    "ServiceRoot": "v1_20_0", "ComputerSystem": "v1_27_0", "Manager": "v1_24_0",
    "Chassis": "v1_28_0", "Processor": "v1_22_0", "Memory": "v1_23_0",
    "EthernetInterface": "v1_12_4", "Storage": "v1_21_0", "Drive": "v1_22_0",
    "VirtualMedia": "v1_6_5", "TaskService": "v1_3_0", "Task": "v1_7_4",
    "SessionService": "v1_2_0", "Session": "v1_8_0", "AccountService": "v1_18_1",
    "ManagerAccount": "v1_14_1", "Role": "v1_3_3", "Message": "v1_3_0",
    "SecureBoot": "v1_1_2",
}
# Collections (unversioned schemas) served.
COLLECTIONS = ("ComputerSystemCollection", "ManagerCollection", "ChassisCollection",
               "ProcessorCollection", "MemoryCollection", "EthernetInterfaceCollection",
               "StorageCollection", "VirtualMediaCollection", "TaskCollection",
               "SessionCollection", "ManagerAccountCollection", "RoleCollection")
# Schemas only referenced (types used inside the resources above).
REFERENCED = ("Resource", "RedfishExtensions", "Settings", "IPAddresses", "VLanNetworkInterface")


class RedfishError(HVError):
    """A Redfish-specific bad request: `key` names the Base message, `args` its values."""

    kind = "invalid"

    def __init__(self, status: int, message: str, key: str, *args: str) -> None:
        super().__init__(message)
        self.status = status
        self.key = key
        self.args_ = args


def odata_type(schema: str, typename: str | None = None) -> str:
    return f"#{schema}.{SCHEMAS[schema]}.{typename or schema}"


def ref(path: str) -> dict[str, str]:
    return {"@odata.id": path}


def resource(path: str, schema: str, id_: str, name: str, **props: Any) -> dict[str, Any]:
    return {"@odata.id": path, "@odata.type": odata_type(schema), "Id": id_, "Name": name,
            **props}


def collection(path: str, schema: str, name: str, members: list[str]) -> dict[str, Any]:
    return {"@odata.id": path, "@odata.type": f"#{schema}.{schema}", "Name": name,
            "Members@odata.count": len(members), "Members": [ref(m) for m in members]}


def etag_of(body: dict[str, Any]) -> str:
    plain = {k: v for k, v in body.items() if k != "@odata.etag"}
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:20]
    return f'W/"{digest}"'


def answer(body: dict[str, Any], status: int = 200,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """A resource as JSON with its ETag (in the body and the header)."""
    tag = etag_of(body)
    if "@odata.id" in body and "Members" not in body:
        body = {**body, "@odata.etag": tag}
    h = {"OData-Version": "4.0", "ETag": tag, **(headers or {})}
    return JSONResponse(body, status_code=status, headers=h)


def no_content(headers: dict[str, str] | None = None) -> Response:
    return Response(status_code=204, headers={"OData-Version": "4.0", **(headers or {})})


def check_if_match(request: Request, current: dict[str, Any]) -> None:
    """412 when the client's If-Match names another version of the resource."""
    want = request.headers.get("if-match")
    if want is None or want.strip() == "*":
        return
    tags = [t.strip() for t in want.split(",")]
    have = etag_of(current)
    if have not in tags and have.removeprefix("W/") not in tags:
        raise RedfishError(412, f"If-Match {want}: the resource is now {have}",
                           "PreconditionFailed")


async def json_body(request: Request, allowed: set[str], where: str) -> dict[str, Any]:
    """The request's JSON object; an unknown property is a 400 naming it."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise RedfishError(400, f"{where}: the body is not JSON", "MalformedJSON") from None
    if not isinstance(body, dict):
        raise RedfishError(400, f"{where}: the body must be a JSON object", "MalformedJSON")
    for k in body:
        if k not in allowed and not k.startswith("@"):
            raise RedfishError(400, f"{k}: not a property {where} takes", "PropertyUnknown", k)
    return body
