"""The Redfish service's frame: the version document (/redfish), the service root,
`$metadata` (a reference to every schema served, made from the one version table) and
the OData service document; the Managers (the agent's own, `_agent`, and one virtual BMC
per VM, as sushy-tools and VirtualBMC have, carrying the VM's VirtualMedia) and the
host's Chassis.
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response

from hvagent.access.privileges import Privilege as P
from hvagent.api import deps
from hvagent.api.auth import permitted, require
from hvagent.api.redfish import systems
from hvagent.api.redfish.odata import (
    AGENT_ID,
    COLLECTIONS,
    HOST_ID,
    REDFISH_VERSION,
    REFERENCED,
    ROOT,
    SCHEMAS,
    RedfishError,
    answer,
    collection,
    no_content,
    ref,
    resource,
)
from hvagent.config import agent_version
from hvagent.services.vms import VMService

router = APIRouter(tags=["redfish"])
Service = Annotated[VMService, Depends(deps.vms)]
ManagerId = Annotated[str, Path(max_length=64)]
SEE_HOST = require(P.SYS_AUDIT, "/")


def host_uuid() -> str:
    """The host's UUID: from its machine id, stable across agent restarts."""
    try:
        mid = FsPath("/etc/machine-id").read_text().strip()
        return str(uuid.UUID(mid))
    except (OSError, ValueError):
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname()))


@router.get("/redfish", include_in_schema=False)
@router.get("/redfish/")
async def versions() -> JSONResponse:
    return JSONResponse({"v1": f"{ROOT}/"}, headers={"OData-Version": "4.0"})


@router.get(f"{ROOT}/", include_in_schema=False)
@router.get(ROOT)
async def service_root() -> Response:
    return answer(resource(
        ROOT, "ServiceRoot", "RootService", "hvagent Redfish service",
        RedfishVersion=REDFISH_VERSION, UUID=host_uuid(), Vendor="corehost",
        Product="hvagent", ServiceIdentification=socket.gethostname(),
        ProtocolFeaturesSupported={"ExpandQuery": {"ExpandAll": False},
                                   "FilterQuery": False, "SelectQuery": False,
                                   "OnlyMemberQuery": False, "ExcerptQuery": False},
        Systems=ref(f"{ROOT}/Systems"), Managers=ref(f"{ROOT}/Managers"),
        Chassis=ref(f"{ROOT}/Chassis"), Tasks=ref(f"{ROOT}/TaskService"),
        SessionService=ref(f"{ROOT}/SessionService"),
        AccountService=ref(f"{ROOT}/AccountService"),
        Links={"Sessions": ref(f"{ROOT}/SessionService/Sessions")}))


def _metadata() -> str:
    refs = []
    for schema, version in SCHEMAS.items():
        refs.append(f'  <edmx:Reference Uri="http://redfish.dmtf.org/schemas/v1/{schema}_v1.xml">\n'
                    f'    <edmx:Include Namespace="{schema}"/>\n'
                    f'    <edmx:Include Namespace="{schema}.{version}"/>\n'
                    '  </edmx:Reference>')
    for schema in COLLECTIONS:
        refs.append(f'  <edmx:Reference Uri="http://redfish.dmtf.org/schemas/v1/{schema}_v1.xml">\n'
                    f'    <edmx:Include Namespace="{schema}"/>\n'
                    '  </edmx:Reference>')
    for schema in REFERENCED:
        refs.append(f'  <edmx:Reference Uri="http://redfish.dmtf.org/schemas/v1/{schema}_v1.xml">\n'
                    f'    <edmx:Include Namespace="{schema}"/>\n'
                    '  </edmx:Reference>')
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<edmx:Edmx xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx" Version="4.0">\n'
            + "\n".join(refs) + "\n"
            '  <edmx:DataServices>\n'
            '    <Schema xmlns="http://docs.oasis-open.org/odata/ns/edm" Namespace="Service">\n'
            f'      <EntityContainer Name="Service" Extends="ServiceRoot.{SCHEMAS["ServiceRoot"]}'
            '.ServiceContainer"/>\n'
            '    </Schema>\n'
            '  </edmx:DataServices>\n'
            '</edmx:Edmx>\n')


@router.get(f"{ROOT}/$metadata", response_class=Response, responses={
    200: {"content": {"application/xml": {}}, "description": "the OData CSDL document"}})
async def metadata() -> Response:
    return Response(_metadata(), media_type="application/xml",
                    headers={"OData-Version": "4.0"})


@router.get(f"{ROOT}/odata")
async def odata_document() -> JSONResponse:
    names = ["Systems", "Managers", "Chassis", "TaskService", "SessionService",
             "AccountService"]
    return JSONResponse({
        "@odata.context": f"{ROOT}/$metadata",
        "value": [{"name": "Service", "kind": "Singleton", "url": f"{ROOT}/"}] + [
            {"name": n, "kind": "Singleton", "url": f"{ROOT}/{n}"} for n in names]},
        headers={"OData-Version": "4.0"})


# Managers


def need(privilege: P) -> Any:
    """`privilege` on the VM whose manager the URL names (the agent's own, `_agent`,
    is on /vms/_agent: who may read every VM reads it)."""
    return Depends(require(privilege, "/vms/{manager_id}"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


@router.get(f"{ROOT}/Managers", dependencies=[Depends(require(
    P.VM_AUDIT, "/vms", or_else=SEE_HOST))])
async def managers(request: Request, svc: Service) -> Response:
    members = [f"{ROOT}/Managers/{AGENT_ID}"] if permitted(request, P.SYS_AUDIT, "/") else []
    members += [f"{ROOT}/Managers/{vm.name}" for vm in await svc.list_vms()
                if permitted(request, P.VM_AUDIT, f"/vms/{vm.name}")]
    return answer(collection(f"{ROOT}/Managers", "ManagerCollection", "Managers", members))


@router.get(f"{ROOT}/Managers/{{manager_id}}", dependencies=[need(P.VM_AUDIT)])
async def manager(manager_id: ManagerId, request: Request, svc: Service) -> Response:
    path = f"{ROOT}/Managers/{manager_id}"
    common = {"FirmwareVersion": agent_version(), "DateTime": _now(),
              "DateTimeLocalOffset": "+00:00", "PowerState": "On",
              "Status": {"State": "Enabled", "Health": "OK"}}
    if manager_id == AGENT_ID:
        servers = [ref(systems.system_path(HOST_ID))] + [
            ref(systems.system_path(vm.name)) for vm in await svc.list_vms()
            if permitted(request, P.VM_AUDIT, f"/vms/{vm.name}")]
        return answer(resource(
            path, "Manager", AGENT_ID, "hvagent", ManagerType="Service", UUID=host_uuid(),
            Model="hvagent", **common,
            Links={"ManagerForServers": servers,
                   "ManagerForChassis": [ref(f"{ROOT}/Chassis/{HOST_ID}")]}))
    info = await systems.vm_info(svc, manager_id)
    return answer(resource(
        path, "Manager", info.name, f"virtual BMC of {info.name}", ManagerType="BMC",
        UUID=systems.vm_uuid(info.name), Model="hvagent virtual BMC", **common,
        VirtualMedia=ref(f"{path}/VirtualMedia"),
        Links={"ManagerForServers": [ref(systems.system_path(info.name))],
               "ManagerInChassis": ref(f"{ROOT}/Chassis/{HOST_ID}")}))


@router.get(f"{ROOT}/Managers/{{manager_id}}/VirtualMedia", dependencies=[need(P.VM_AUDIT)])
async def manager_media(manager_id: ManagerId, svc: Service) -> Response:
    await _vm_manager(svc, manager_id)
    return answer(systems.media_collection(f"{ROOT}/Managers/{manager_id}"))


@router.get(f"{ROOT}/Managers/{{manager_id}}/VirtualMedia/{{media_id}}",
            dependencies=[need(P.VM_AUDIT)])
async def manager_media_item(manager_id: ManagerId,
                             media_id: Annotated[str, Path(max_length=16)],
                             svc: Service) -> Response:
    info = await _vm_manager(svc, manager_id)
    systems.media_slot(media_id)
    return answer(systems.media_view(f"{ROOT}/Managers/{manager_id}", info, media_id))


@router.post(f"{ROOT}/Managers/{{manager_id}}/VirtualMedia/{{media_id}}/Actions/"
             "VirtualMedia.InsertMedia", dependencies=[need(P.VM_CONFIG_DISK)])
async def manager_insert(manager_id: ManagerId, media_id: Annotated[str, Path(max_length=16)],
                         request: Request, svc: Service) -> Response:
    info = await _vm_manager(svc, manager_id)
    await systems.insert_media(request, systems.media_service(request), info, media_id)
    return no_content()


@router.post(f"{ROOT}/Managers/{{manager_id}}/VirtualMedia/{{media_id}}/Actions/"
             "VirtualMedia.EjectMedia", dependencies=[need(P.VM_CONFIG_DISK)])
async def manager_eject(manager_id: ManagerId, media_id: Annotated[str, Path(max_length=16)],
                        request: Request, svc: Service) -> Response:
    info = await _vm_manager(svc, manager_id)
    await systems.media_service(request).eject(info.name, systems.media_slot(media_id))
    return no_content()


async def _vm_manager(svc: VMService, manager_id: str) -> systems.VMInfo:
    if manager_id == AGENT_ID:
        raise RedfishError(404, f"{manager_id}: the agent's manager has no virtual media "
                           "(each VM's manager has)", "ResourceNotFound", "VirtualMedia",
                           manager_id)
    return await systems.vm_info(svc, manager_id)


# Chassis


@router.get(f"{ROOT}/Chassis", dependencies=[Depends(SEE_HOST)])
async def chassis_list() -> Response:
    return answer(collection(f"{ROOT}/Chassis", "ChassisCollection", "Chassis",
                             [f"{ROOT}/Chassis/{HOST_ID}"]))


@router.get(f"{ROOT}/Chassis/{{chassis_id}}", dependencies=[Depends(SEE_HOST)])
async def chassis(chassis_id: Annotated[str, Path(max_length=64)]) -> Response:
    if chassis_id != HOST_ID:
        raise RedfishError(404, f"{chassis_id}: no such chassis", "ResourceNotFound",
                           "Chassis", chassis_id)
    return answer(resource(
        f"{ROOT}/Chassis/{HOST_ID}", "Chassis", HOST_ID, socket.gethostname(),
        ChassisType="StandAlone", PowerState="On",
        Status={"State": "Enabled", "Health": "OK"},
        Links={"ComputerSystems": [ref(systems.system_path(HOST_ID))],
               "ManagedBy": [ref(f"{ROOT}/Managers/{AGENT_ID}")]}))
