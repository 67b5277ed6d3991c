"""REST v1: resources of a VM that change while it runs (/api/v1/vms/{name}/...):
memory, vCPUs, disks, NICs. A removal the guest has not completed answers 202 with
status "pending"; it also shows in the VM's spec (`pending_unplugs`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hvagent.access.privileges import Privilege as P
from hvagent.api.auth import require
from hvagent.api.schemas import HostPathQuery, Mac, VMName
from hvagent.services.devices import Change, DeviceService
from hvagent.spec import (
    DEFAULT_UNPLUG_TIMEOUT,
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    MIN_MEMORY_MIB,
    VLAN_MAX,
    VLAN_MIN,
    VLAN_RULE,
    DiskSpec,
    NicSpec,
    cross_field,
)

router = APIRouter(prefix="/vms", tags=["devices"])


def _devices(request: Request) -> DeviceService:
    return request.app.state.devices  # type: ignore[no-any-return]


Devices = Annotated[DeviceService, Depends(_devices)]
Timeout = Annotated[float, Query(gt=0, le=600, description="seconds to wait for the guest "
                                                          "to release a removed device")]


class MemoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    memory_mib: int = Field(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)


class VcpusRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vcpus: int = Field(ge=1, le=MAX_VCPUS)


# A removal the guest has not completed yet answers 202 (see the module docstring).
PENDING: dict[int | str, dict[str, Any]] = {202: {
    "model": Change, "description": "asked for; the guest has not released the device yet"}}


def _answer(change: Change, response: Response) -> Change:
    if change.status == "pending":
        response.status_code = status.HTTP_202_ACCEPTED
    return change


@router.get("/{name}/devices", dependencies=[Depends(require(P.VM_AUDIT, "/vms/{name}"))])
async def show_devices(name: VMName, svc: Devices) -> dict[str, Any]:
    return await svc.devices(name)


@router.put("/{name}/memory", responses=PENDING,
            dependencies=[Depends(require(P.VM_CONFIG_MEMORY, "/vms/{name}"))])
async def set_memory(name: VMName, body: MemoryRequest, svc: Devices, response: Response,
                     timeout: Timeout = DEFAULT_UNPLUG_TIMEOUT) -> Change:
    return _answer(await svc.set_memory(name, body.memory_mib, timeout), response)


@router.put("/{name}/vcpus", responses=PENDING,
            dependencies=[Depends(require(P.VM_CONFIG_CPU, "/vms/{name}"))])
async def set_vcpus(name: VMName, body: VcpusRequest, svc: Devices, response: Response,
                    timeout: Timeout = DEFAULT_UNPLUG_TIMEOUT) -> Change:
    return _answer(await svc.set_vcpus(name, body.vcpus, timeout), response)


@router.post("/{name}/disks", status_code=status.HTTP_201_CREATED,
             dependencies=[Depends(require(P.VM_CONFIG_DISK, "/vms/{name}"))])
async def attach_disk(name: VMName, disk: DiskSpec, svc: Devices) -> Change:
    return await svc.attach_disk(name, disk)


@router.delete("/{name}/disks", responses=PENDING,
               dependencies=[Depends(require(P.VM_CONFIG_DISK, "/vms/{name}"))])
async def detach_disk(name: VMName, path: HostPathQuery, svc: Devices, response: Response,
                      timeout: Timeout = DEFAULT_UNPLUG_TIMEOUT) -> Change:
    return _answer(await svc.detach_disk(name, path, timeout), response)


@router.post("/{name}/nics", status_code=status.HTTP_201_CREATED,
             dependencies=[Depends(require(P.VM_CONFIG_NETWORK, "/vms/{name}"))])
async def add_nic(name: VMName, nic: NicSpec, svc: Devices) -> Change:
    return await svc.add_nic(name, nic)


class NicVlanRequest(BaseModel):
    """The NIC's new VLAN, trunk list, or both (what is not given stays)."""

    model_config = ConfigDict(extra="forbid")
    vlan: int | None = Field(default=None, ge=VLAN_MIN, le=VLAN_MAX,
                             description=f"VLAN id ({VLAN_RULE}): access or native VLAN")
    trunk: list[Annotated[int, Field(ge=VLAN_MIN, le=VLAN_MAX)]] | None = Field(
        default=None, max_length=64, description="the VLANs the NIC carries tagged")

    @model_validator(mode="after")
    def _something(self) -> NicVlanRequest:
        if self.vlan is None and self.trunk is None:
            raise cross_field("give vlan, trunk or both")
        return self


@router.put("/{name}/nics/{mac}",
            dependencies=[Depends(require(P.VM_CONFIG_NETWORK, "/vms/{name}"))])
async def set_nic_vlan(name: VMName, mac: Mac, body: NicVlanRequest, svc: Devices) -> Change:
    """Move a NIC to another VLAN, or change its trunk list; on a running VM the guest
    sees the new segments at once."""
    return await svc.set_nic_vlan(name, mac, body.vlan, body.trunk)


@router.delete("/{name}/nics/{mac}", responses=PENDING,
               dependencies=[Depends(require(P.VM_CONFIG_NETWORK, "/vms/{name}"))])
async def remove_nic(name: VMName, mac: Mac, svc: Devices, response: Response,
                     timeout: Timeout = DEFAULT_UNPLUG_TIMEOUT) -> Change:
    return _answer(await svc.remove_nic(name, mac, timeout), response)
