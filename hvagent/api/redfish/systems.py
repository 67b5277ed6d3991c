"""Redfish ComputerSystems: one per VM (`SystemType: Virtual`, its id is the VM's name)
and the host's (`_host`, `HostingRoles: [VirtualMachineServer]`), with their
Processors, Memory, EthernetInterfaces, Storage/Drives and VirtualMedia, the Reset
action and PATCH of Boot, ProcessorSummary.Count and MemorySummary (live hot-add on a
running VM). Everything is read from and done by the agent's services; this module only
translates. The per-VM Managers (hvagent.api.redfish.managers) reuse the VirtualMedia
views below.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from hvagent.access.privileges import Privilege as P
from hvagent.api import deps
from hvagent.api.auth import permitted, require
from hvagent.api.redfish.odata import (
    HOST_ID,
    ROOT,
    RedfishError,
    answer,
    check_if_match,
    collection,
    json_body,
    no_content,
    odata_type,
    ref,
    resource,
)
from hvagent.errors import NotFound
from hvagent.services.hostinfo import host_facts
from hvagent.services.media import MediaService
from hvagent.services.vms import VMInfo, VMService
from hvagent.spec import (
    BootDevice,
    BootEnabled,
    Firmware,
    MediaSlot,
    VMSpec,
    VMState,
)

router = APIRouter(prefix="/Systems", tags=["redfish"])
Service = Annotated[VMService, Depends(deps.vms)]
SystemId = Annotated[str, Path(max_length=64)]

# The namespace VM UUIDs are made in (stable: the same VM name on the same host).
_NS = uuid.UUID("6f1d0c52-9b8e-4b8e-a7a1-3c1b3c6c7a10")

POWER_STATE = {VMState.RUNNING: "On", VMState.PAUSED: "Paused", VMState.UNRESPONSIVE: "On",
               VMState.DEFINED: "Off", VMState.STOPPED: "Off", VMState.CRASHED: "Off"}
RESET_TYPES = ["On", "ForceOff", "GracefulShutdown", "ForceRestart", "GracefulRestart",
               "Pause", "Resume", "Nmi", "PowerCycle"]
# Redfish BootSourceOverrideTarget <-> the agent's boot devices.
TARGETS: dict[str, BootDevice] = {"Pxe": BootDevice.NETWORK, "Hdd": BootDevice.DISK,
                                  "Cd": BootDevice.CD, "Usb": BootDevice.USB,
                                  "UefiHttp": BootDevice.NETWORK}
ENABLED = {"Disabled": BootEnabled.DISABLED, "Once": BootEnabled.ONCE,
           "Continuous": BootEnabled.CONTINUOUS}
MODES = {"Legacy": Firmware.BIOS, "UEFI": Firmware.UEFI}
MEDIA = {"Cd": MediaSlot.CD, "UsbStick": MediaSlot.USB}
MEDIA_ID = {v: k for k, v in MEDIA.items()}
TRANSFER_PROTOCOLS = ["HTTP", "HTTPS", "FILE"]


def system_path(name: str) -> str:
    return f"{ROOT}/Systems/{name}"


def vm_uuid(name: str) -> str:
    return str(uuid.uuid5(_NS, name))


# access: a VM's resources are on its ACL path. The host's system (`_host`) is on
# /vms/_host, which no VM can be: who may read every VM (a role on /vms or /) reads it.


def need(privilege: P) -> Any:
    """`privilege` on the VM the URL names."""
    return Depends(require(privilege, "/vms/{system_id}"))


async def vm_info(svc: VMService, system_id: str, change: bool = False) -> VMInfo:
    """The VM `system_id` names. The host's system has no such parts (404) and is not
    changed through Redfish (`change`: 400)."""
    if system_id == HOST_ID:
        if change:
            raise RedfishError(400, f"{system_id}: the host is not changed through "
                               "Redfish", "ActionNotSupported", "change")
        raise RedfishError(404, f"{system_id}: the host's system has no such resource",
                           "ResourceNotFound", "Resource", system_id)
    try:
        return await svc.get(system_id)
    except NotFound:
        raise RedfishError(404, f"{system_id}: no such system", "ResourceNotFound",
                           "ComputerSystem", system_id) from None


def media_service(request: Request) -> MediaService:
    return request.app.state.media  # type: ignore[no-any-return]


# rendering


def boot_view(spec: VMSpec) -> dict[str, Any]:
    o = spec.boot_override
    target = "None"
    if o.enabled is not BootEnabled.DISABLED:
        target = "UefiHttp" if o.uefi_http and o.target is BootDevice.NETWORK else next(
            k for k, v in TARGETS.items() if v is o.target)
    allowed = ["None", "Pxe", "Hdd", "Cd", "Usb"] + (
        ["UefiHttp"] if spec.firmware is Firmware.UEFI else [])
    out: dict[str, Any] = {
        "BootSourceOverrideTarget": target,
        "BootSourceOverrideTarget@Redfish.AllowableValues": allowed,
        "BootSourceOverrideEnabled": next(k for k, v in ENABLED.items() if v is o.enabled),
        "BootSourceOverrideEnabled@Redfish.AllowableValues": list(ENABLED),
        "BootSourceOverrideMode": "UEFI" if spec.firmware is Firmware.UEFI else "Legacy",
        "BootSourceOverrideMode@Redfish.AllowableValues": list(MODES),
    }
    if o.http_boot_uri is not None:
        out["HttpBootUri"] = o.http_boot_uri
    return out


def status_of(state: VMState) -> dict[str, str]:
    if state is VMState.CRASHED:
        return {"State": "Enabled", "Health": "Critical"}
    if state is VMState.UNRESPONSIVE:
        return {"State": "Enabled", "Health": "Warning"}
    return {"State": "Enabled", "Health": "OK"}


def render_vm(info: VMInfo) -> dict[str, Any]:
    spec, path = info.spec, system_path(info.name)
    return resource(
        path, "ComputerSystem", info.name, info.name,
        SystemType="Virtual", UUID=vm_uuid(info.name),
        Manufacturer="QEMU", Model="KVM virtual machine (q35)",
        PowerState=POWER_STATE[info.state], Status=status_of(info.state),
        ProcessorSummary={"Count": spec.vcpus, "LogicalProcessorCount": spec.vcpus},
        MemorySummary={"TotalSystemMemoryGiB": round(spec.memory_mib / 1024, 3)},
        Boot=boot_view(spec),
        Processors=ref(f"{path}/Processors"), Memory=ref(f"{path}/Memory"),
        EthernetInterfaces=ref(f"{path}/EthernetInterfaces"),
        Storage=ref(f"{path}/Storage"), VirtualMedia=ref(f"{path}/VirtualMedia"),
        **({"SecureBoot": ref(f"{path}/SecureBoot")}
           if spec.firmware is Firmware.UEFI else {}),
        Links={"ManagedBy": [ref(f"{ROOT}/Managers/{info.name}")],
               "HostingComputerSystem": ref(system_path(HOST_ID))},
        Actions={"#ComputerSystem.Reset": {
            "target": f"{path}/Actions/ComputerSystem.Reset",
            "ResetType@Redfish.AllowableValues": RESET_TYPES}},
    )


async def render_host(svc: VMService) -> dict[str, Any]:
    h = await host_facts(svc)
    path = system_path(HOST_ID)
    import socket

    return resource(
        path, "ComputerSystem", HOST_ID, socket.gethostname(),
        SystemType="Physical", HostName=socket.gethostname(),
        HostingRoles=["VirtualMachineServer"],
        PowerState="On", Status={"State": "Enabled", "Health": "OK"},
        ProcessorSummary={"Count": h.cpu_count, "LogicalProcessorCount": h.cpu_count,
                          "Model": h.cpu_model},
        MemorySummary={"TotalSystemMemoryGiB": round(h.memory_total_bytes / 2**30, 3)},
        Links={"ManagedBy": [ref(f"{ROOT}/Managers/_agent")],
               "Chassis": [ref(f"{ROOT}/Chassis/{HOST_ID}")]},
    )


# the collection and the systems


@router.get("", dependencies=[Depends(require(P.VM_AUDIT, "/vms",
                                              or_else=require(P.SYS_AUDIT, "/")))])
async def list_systems(request: Request, svc: Service) -> Response:
    members = [system_path(HOST_ID)] if permitted(request, P.SYS_AUDIT, "/") else []
    members += [system_path(vm.name) for vm in await svc.list_vms()
                if permitted(request, P.VM_AUDIT, f"/vms/{vm.name}")]
    return answer(collection(f"{ROOT}/Systems", "ComputerSystemCollection",
                             "Computer systems", members))


@router.get("/{system_id}", dependencies=[need(P.VM_AUDIT)])
async def get_system(system_id: SystemId, svc: Service) -> Response:
    if system_id == HOST_ID:
        return answer(await render_host(svc))
    return answer(render_vm(await vm_info(svc, system_id)))


PATCHABLE = {"Boot", "ProcessorSummary", "MemorySummary"}


@router.patch("/{system_id}", dependencies=[need(P.VM_CONFIG_OPTIONS)])
async def patch_system(system_id: SystemId, request: Request, svc: Service) -> Response:
    info = await vm_info(svc, system_id, change=True)
    body = await json_body(request, PATCHABLE, "a ComputerSystem")
    check_if_match(request, render_vm(info))
    name = info.name
    # Each part needs the privilege the agent's own route for it needs.
    for key, priv in (("ProcessorSummary", P.VM_CONFIG_CPU),
                      ("MemorySummary", P.VM_CONFIG_MEMORY)):
        if key in body and not permitted(request, priv, f"/vms/{name}"):
            raise RedfishError(403, f"{key}: needs {priv} on /vms/{name}",
                               "InsufficientPrivilege")
    boot = _sub(body, "Boot", {"BootSourceOverrideTarget", "BootSourceOverrideEnabled",
                               "BootSourceOverrideMode", "HttpBootUri"})
    cpus = _sub(body, "ProcessorSummary", {"Count"})
    mem = _sub(body, "MemorySummary", {"TotalSystemMemoryGiB"})
    if boot:
        await _patch_boot(media_service(request), info, boot)
    devices = request.app.state.devices
    if "Count" in cpus:
        count = cpus["Count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise RedfishError(400, f"ProcessorSummary.Count: {count!r} is not a positive "
                               "integer", "PropertyValueTypeError", str(count),
                               "ProcessorSummary/Count")
        if count != info.spec.vcpus:
            await devices.set_vcpus(name, count)
    if "TotalSystemMemoryGiB" in mem:
        gib = mem["TotalSystemMemoryGiB"]
        if not isinstance(gib, int | float) or isinstance(gib, bool) or gib <= 0:
            raise RedfishError(400, f"MemorySummary.TotalSystemMemoryGiB: {gib!r} is not "
                               "a positive number", "PropertyValueTypeError", str(gib),
                               "MemorySummary/TotalSystemMemoryGiB")
        mib = round(gib * 1024)
        if mib != info.spec.memory_mib:
            await devices.set_memory(name, mib)
    return answer(render_vm(await svc.get(name)))


def _sub(body: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    part = body.get(key, {})
    if not isinstance(part, dict):
        raise RedfishError(400, f"{key}: must be an object", "PropertyValueTypeError",
                           str(part), key)
    for k in part:
        if k not in allowed and not k.startswith("@"):
            raise RedfishError(400, f"{key}.{k}: not a property that can be changed",
                               "PropertyNotWritable", f"{key}/{k}")
    return part


def _choice(part: dict[str, Any], key: str, table: dict[str, Any],
            allowed: list[str]) -> Any:
    value = part.get(key)
    if value is None:
        return None
    if value not in allowed:
        raise RedfishError(400, f"Boot.{key}: {value!r} is not one of "
                           f"{', '.join(allowed)}", "PropertyValueNotInList", str(value),
                           f"Boot/{key}")
    return table.get(value, value)


async def _patch_boot(media: MediaService, info: VMInfo, part: dict[str, Any]) -> None:
    spec = info.spec
    mode = _choice(part, "BootSourceOverrideMode", MODES, list(MODES))
    uefi = (mode or spec.firmware) is Firmware.UEFI
    targets = ["None", "Pxe", "Hdd", "Cd", "Usb"] + (["UefiHttp"] if uefi else [])
    raw_target = part.get("BootSourceOverrideTarget")
    target = _choice(part, "BootSourceOverrideTarget", TARGETS, targets)
    enabled = _choice(part, "BootSourceOverrideEnabled", ENABLED, list(ENABLED))
    if raw_target == "None":
        target, enabled = None, BootEnabled.DISABLED
    elif target is not None and enabled is None and \
            spec.boot_override.enabled is BootEnabled.DISABLED:
        enabled = BootEnabled.ONCE  # a target alone: Redfish services boot it once
    uri = part.get("HttpBootUri")
    if uri is not None and not isinstance(uri, str):
        raise RedfishError(400, "Boot.HttpBootUri: must be a string",
                           "PropertyValueTypeError", str(uri), "Boot/HttpBootUri")
    await media.set_boot(info.name, target=target, enabled=enabled, firmware=mode,
                         http_boot_uri=uri, set_uri="HttpBootUri" in part,
                         uefi_http=None if raw_target is None else raw_target == "UefiHttp")


# Reset


@router.post("/{system_id}/Actions/ComputerSystem.Reset",
             dependencies=[need(P.VM_POWERMGMT)])
async def reset_system(system_id: SystemId, request: Request, svc: Service) -> Response:
    info = await vm_info(svc, system_id, change=True)
    body = await json_body(request, {"ResetType"}, "ComputerSystem.Reset")
    kind = body.get("ResetType", "On")
    if kind not in RESET_TYPES:
        raise RedfishError(400, f"ResetType: {kind!r} is not one of {', '.join(RESET_TYPES)}",
                           "ActionParameterValueError", "ResetType", "ComputerSystem.Reset")
    name, state = info.name, info.state
    running = state in (VMState.RUNNING, VMState.PAUSED, VMState.UNRESPONSIVE)
    if kind == "On":
        if not running:
            await svc.start(name)
    elif kind == "ForceOff":
        if running:
            await svc.stop(name, force=True)
    elif kind == "ForceRestart":
        if running and state is not VMState.UNRESPONSIVE:
            await svc.reset(name)
        else:
            if running:
                await svc.stop(name, force=True)
            await svc.start(name)
    elif kind == "PowerCycle":
        if running:
            await svc.stop(name, force=True)
        await svc.start(name)
    elif kind == "Pause":
        await svc.pause(name)
    elif kind == "Resume":
        await svc.resume(name)
    elif kind == "Nmi":
        await svc.nmi(name)
    else:  # GracefulShutdown, GracefulRestart: the guest takes its time, a task follows
        if not running:
            if kind == "GracefulRestart":
                await svc.start(name)
            return no_content()
        restart = kind == "GracefulRestart"

        async def graceful(progress: Any) -> dict[str, Any]:
            await svc.stop(name)
            if restart:
                await svc.start(name)
            return {"ResetType": kind}

        job = svc.jobs.start(f"redfish-{kind}", name, graceful)
        monitor = f"{ROOT}/TaskService/TaskMonitors/{job.id}"
        return answer(_task_stub(job.id, kind, name), 202, {"Location": monitor})
    return no_content()


def _task_stub(job_id: str, kind: str, name: str) -> dict[str, Any]:
    from hvagent.api.redfish.tasks import task_path

    return {"@odata.id": task_path(job_id), "@odata.type": odata_type("Task"),
            "Id": job_id, "Name": f"{kind} of {name}", "TaskState": "Running",
            "TaskMonitor": f"{ROOT}/TaskService/TaskMonitors/{job_id}",
            "StartTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# Processors, Memory, EthernetInterfaces


@router.get("/{system_id}/Processors", dependencies=[need(P.VM_AUDIT)])
async def processors(system_id: SystemId, svc: Service) -> Response:
    info = await vm_info_or_host(svc, system_id)
    path = f"{system_path(system_id)}/Processors"
    n = info.spec.vcpus if info else 0
    return answer(collection(path, "ProcessorCollection", "Processors",
                             [f"{path}/CPU{i}" for i in range(n)]))


@router.get("/{system_id}/Processors/{cpu_id}", dependencies=[need(P.VM_AUDIT)])
async def processor(system_id: SystemId, cpu_id: Annotated[str, Path(max_length=16)],
                    svc: Service) -> Response:
    info = await vm_info(svc, system_id)
    spec = info.spec
    ids = [f"CPU{i}" for i in range(spec.vcpus)]
    if cpu_id not in ids:
        raise RedfishError(404, f"{cpu_id}: no such processor", "ResourceNotFound",
                           "Processor", cpu_id)
    i = ids.index(cpu_id)
    hot = i >= spec.vcpus - spec.hot_vcpus
    return answer(resource(
        f"{system_path(system_id)}/Processors/{cpu_id}", "Processor", cpu_id,
        f"vCPU {i}" + (" (hot-added)" if hot else ""), ProcessorType="CPU",
        ProcessorArchitecture="x86", InstructionSet="x86-64", TotalCores=1,
        TotalThreads=1, Status={"State": "Enabled", "Health": "OK"}))


def _memory_ids(spec: VMSpec) -> list[tuple[str, int, bool]]:
    out = [("boot", spec.boot_memory_mib, False)]
    out += [(f"dimm{d.slot}", d.size_mib, True) for d in spec.dimms]
    return out


@router.get("/{system_id}/Memory", dependencies=[need(P.VM_AUDIT)])
async def memory(system_id: SystemId, svc: Service) -> Response:
    info = await vm_info_or_host(svc, system_id)
    path = f"{system_path(system_id)}/Memory"
    ids = [i for i, _, _ in _memory_ids(info.spec)] if info else []
    return answer(collection(path, "MemoryCollection", "Memory",
                             [f"{path}/{i}" for i in ids]))


@router.get("/{system_id}/Memory/{memory_id}", dependencies=[need(P.VM_AUDIT)])
async def memory_device(system_id: SystemId, memory_id: Annotated[str, Path(max_length=16)],
                        svc: Service) -> Response:
    info = await vm_info(svc, system_id)
    for mid, mib, hot in _memory_ids(info.spec):
        if mid == memory_id:
            return answer(resource(
                f"{system_path(system_id)}/Memory/{mid}", "Memory", mid,
                "hot-added DIMM" if hot else "boot memory", MemoryType="DRAM",
                CapacityMiB=mib, Status={"State": "Enabled", "Health": "OK"}))
    raise RedfishError(404, f"{memory_id}: no such memory device", "ResourceNotFound",
                       "Memory", memory_id)


def nic_id(mac: str) -> str:
    return mac.replace(":", "").lower()


@router.get("/{system_id}/EthernetInterfaces", dependencies=[need(P.VM_AUDIT)])
async def nics(system_id: SystemId, svc: Service) -> Response:
    info = await vm_info_or_host(svc, system_id)
    path = f"{system_path(system_id)}/EthernetInterfaces"
    macs = [n.mac for n in info.spec.nics] if info else []
    return answer(collection(path, "EthernetInterfaceCollection", "Ethernet interfaces",
                             [f"{path}/{nic_id(m)}" for m in macs]))


@router.get("/{system_id}/EthernetInterfaces/{nic}", dependencies=[need(P.VM_AUDIT)])
async def nic(system_id: SystemId, nic: Annotated[str, Path(max_length=16)],
              svc: Service) -> Response:
    info = await vm_info(svc, system_id)
    for n in info.spec.nics:
        if nic_id(n.mac) == nic:
            body = resource(
                f"{system_path(system_id)}/EthernetInterfaces/{nic}", "EthernetInterface",
                nic, f"{n.model} on {n.network}", MACAddress=n.mac,
                PermanentMACAddress=n.mac, InterfaceEnabled=True,
                LinkStatus="LinkUp" if info.state is VMState.RUNNING else "LinkDown",
                Status={"State": "Enabled", "Health": "OK"},
                VLAN={"VLANEnable": n.vlan is not None, **(
                    {"VLANId": n.vlan} if n.vlan is not None else {})},
                Description=f"network {n.network}" + (
                    f", trunk {','.join(map(str, n.trunk))}" if n.trunk else ""))
            return answer(body)
    raise RedfishError(404, f"{nic}: no such interface", "ResourceNotFound",
                       "EthernetInterface", nic)


async def vm_info_or_host(svc: VMService, system_id: str) -> VMInfo | None:
    """The VM (None for the host, whose parts are not listed here)."""
    if system_id == HOST_ID:
        return None
    return await vm_info(svc, system_id)


# Storage and Drives


@router.get("/{system_id}/Storage", dependencies=[need(P.VM_AUDIT)])
async def storage(system_id: SystemId, svc: Service) -> Response:
    info = await vm_info_or_host(svc, system_id)
    path = f"{system_path(system_id)}/Storage"
    return answer(collection(path, "StorageCollection", "Storage",
                             [f"{path}/disks"] if info else []))


@router.get("/{system_id}/Storage/{storage_id}", dependencies=[need(P.VM_AUDIT)])
async def storage_subsystem(system_id: SystemId,
                            storage_id: Annotated[str, Path(max_length=16)],
                            svc: Service) -> Response:
    info = await vm_info(svc, system_id)
    if storage_id != "disks":
        raise RedfishError(404, f"{storage_id}: no such storage", "ResourceNotFound",
                           "Storage", storage_id)
    path = f"{system_path(system_id)}/Storage/disks"
    return answer(resource(path, "Storage", "disks", "Virtual disks",
                           Drives=[ref(f"{path}/Drives/disk{i}")
                                   for i in range(len(info.spec.disks))],
                           **{"Drives@odata.count": len(info.spec.disks)},
                           Status={"State": "Enabled", "Health": "OK"}))


@router.get("/{system_id}/Storage/{storage_id}/Drives/{drive_id}",
            dependencies=[need(P.VM_AUDIT)])
async def drive(system_id: SystemId, storage_id: Annotated[str, Path(max_length=16)],
                drive_id: Annotated[str, Path(max_length=16)], svc: Service) -> Response:
    info = await vm_info(svc, system_id)
    ids = [f"disk{i}" for i in range(len(info.spec.disks))]
    if storage_id != "disks" or drive_id not in ids:
        raise RedfishError(404, f"{drive_id}: no such drive", "ResourceNotFound", "Drive",
                           drive_id)
    d = info.spec.disks[ids.index(drive_id)]
    size = await svc.disks.capacity(d.path, d.format) if d.path else None
    body = resource(f"{system_path(system_id)}/Storage/disks/Drives/{drive_id}", "Drive",
                    drive_id, f"{d.bus} disk {ids.index(drive_id)}",
                    Protocol="SATA" if d.bus == "sata" else "PCIe", MediaType="HDD",
                    Status={"State": "Enabled", "Health": "OK"},
                    Description=f"{d.format} image {d.path}" + (
                        " (hot-plugged)" if d.slot is not None else ""))
    if size is not None:
        body["CapacityBytes"] = size
    return answer(body)


# VirtualMedia (on the System; the VM's Manager serves the same resources)


def media_view(base: str, info: VMInfo, media_id: str) -> dict[str, Any]:
    slot = MEDIA[media_id]
    m = info.spec.media_in(slot)
    path = f"{base}/VirtualMedia/{media_id}"
    body = resource(
        path, "VirtualMedia", media_id, "Virtual CD" if slot is MediaSlot.CD
        else "Virtual USB stick",
        MediaTypes=["CD", "DVD"] if slot is MediaSlot.CD else ["USBStick"],
        ConnectedVia="URI" if m is not None and m.image else "NotConnected",
        Inserted=bool(m is not None and m.image),
        WriteProtected=True if m is None else m.write_protected,
        Actions={
            "#VirtualMedia.InsertMedia": {
                "target": f"{path}/Actions/VirtualMedia.InsertMedia",
                "TransferProtocolType@Redfish.AllowableValues": TRANSFER_PROTOCOLS},
            "#VirtualMedia.EjectMedia": {
                "target": f"{path}/Actions/VirtualMedia.EjectMedia"}})
    if m is not None and m.image:
        body["Image"] = m.source or m.image
        body["ImageName"] = (m.source or m.image).rsplit("/", 1)[-1]
    return body


def media_collection(base: str) -> dict[str, Any]:
    return collection(f"{base}/VirtualMedia", "VirtualMediaCollection", "Virtual media",
                      [f"{base}/VirtualMedia/{m}" for m in MEDIA])


def media_slot(media_id: str) -> MediaSlot:
    if media_id not in MEDIA:
        raise RedfishError(404, f"{media_id}: no such virtual media (Cd, UsbStick)",
                           "ResourceNotFound", "VirtualMedia", media_id)
    return MEDIA[media_id]


async def insert_media(request: Request, media: MediaService, info: VMInfo,
                       media_id: str) -> None:
    slot = media_slot(media_id)
    body = await json_body(request, {"Image", "Inserted", "WriteProtected",
                                     "TransferProtocolType", "TransferMethod", "UserName",
                                     "Password"}, "VirtualMedia.InsertMedia")
    image = body.get("Image")
    if not isinstance(image, str) or not image:
        raise RedfishError(400, "Image: the URL or file of the medium is required",
                           "ActionParameterMissing", "VirtualMedia.InsertMedia", "Image")
    proto = body.get("TransferProtocolType")
    if proto is not None and proto not in TRANSFER_PROTOCOLS:
        raise RedfishError(400, f"TransferProtocolType: {proto!r} is not one of "
                           f"{', '.join(TRANSFER_PROTOCOLS)}", "ActionParameterValueError",
                           "TransferProtocolType", "VirtualMedia.InsertMedia")
    if body.get("Inserted", True) is not True:
        raise RedfishError(400, "Inserted: only true (a medium is inserted at once)",
                           "ActionParameterValueError", "Inserted",
                           "VirtualMedia.InsertMedia")
    if body.get("UserName") or body.get("Password"):
        raise RedfishError(400, "UserName/Password: media servers with credentials are "
                           "not supported", "ActionParameterValueError", "UserName",
                           "VirtualMedia.InsertMedia")
    wp = body.get("WriteProtected", True)
    if not isinstance(wp, bool):
        raise RedfishError(400, "WriteProtected: must be true or false",
                           "ActionParameterValueError", "WriteProtected",
                           "VirtualMedia.InsertMedia")
    await media.insert(info.name, slot, image, write_protected=wp)


@router.get("/{system_id}/VirtualMedia", dependencies=[need(P.VM_AUDIT)])
async def list_media(system_id: SystemId, svc: Service) -> Response:
    await vm_info(svc, system_id)
    return answer(media_collection(system_path(system_id)))


@router.get("/{system_id}/VirtualMedia/{media_id}", dependencies=[need(P.VM_AUDIT)])
async def get_media(system_id: SystemId, media_id: Annotated[str, Path(max_length=16)],
                    svc: Service) -> Response:
    info = await vm_info(svc, system_id)
    media_slot(media_id)
    return answer(media_view(system_path(system_id), info, media_id))


@router.post("/{system_id}/VirtualMedia/{media_id}/Actions/VirtualMedia.InsertMedia",
             dependencies=[need(P.VM_CONFIG_DISK)])
async def system_insert(system_id: SystemId, media_id: Annotated[str, Path(max_length=16)],
                        request: Request, svc: Service) -> Response:
    await insert_media(request, media_service(request), await vm_info(svc, system_id),
                       media_id)
    return no_content()


@router.post("/{system_id}/VirtualMedia/{media_id}/Actions/VirtualMedia.EjectMedia",
             dependencies=[need(P.VM_CONFIG_DISK)])
async def system_eject(system_id: SystemId, media_id: Annotated[str, Path(max_length=16)],
                       request: Request, svc: Service) -> Response:
    info = await vm_info(svc, system_id)
    await media_service(request).eject(info.name, media_slot(media_id))
    return no_content()


# SecureBoot (UEFI VMs)


def secure_boot_view(info: VMInfo) -> dict[str, Any]:
    spec = info.spec
    on = info.state in (VMState.RUNNING, VMState.PAUSED) and spec.secure_boot
    return resource(f"{system_path(info.name)}/SecureBoot", "SecureBoot", "SecureBoot",
                    "UEFI Secure Boot", SecureBootEnable=spec.secure_boot,
                    SecureBootCurrentBoot="Enabled" if on else "Disabled",
                    # The variable store carries Microsoft's keys (deployed); without
                    # Secure Boot the plain store has none (setup mode).
                    SecureBootMode="DeployedMode" if spec.secure_boot else "SetupMode")


async def _uefi_vm(svc: VMService, system_id: str, change: bool = False) -> VMInfo:
    info = await vm_info(svc, system_id, change)
    if info.spec.firmware is not Firmware.UEFI:
        raise RedfishError(404, f"{system_id}: a Legacy (BIOS) VM has no Secure Boot",
                           "ResourceNotFound", "SecureBoot", system_id)
    return info


@router.get("/{system_id}/SecureBoot", dependencies=[need(P.VM_AUDIT)])
async def get_secure_boot(system_id: SystemId, svc: Service) -> Response:
    return answer(secure_boot_view(await _uefi_vm(svc, system_id)))


@router.patch("/{system_id}/SecureBoot", dependencies=[need(P.VM_CONFIG_OPTIONS)])
async def patch_secure_boot(system_id: SystemId, request: Request, svc: Service) -> Response:
    info = await _uefi_vm(svc, system_id, change=True)
    body = await json_body(request, {"SecureBootEnable"}, "SecureBoot")
    check_if_match(request, secure_boot_view(info))
    if "SecureBootEnable" in body:
        on = body["SecureBootEnable"]
        if not isinstance(on, bool):
            raise RedfishError(400, "SecureBootEnable: must be true or false",
                               "PropertyValueTypeError", str(on), "SecureBootEnable")
        if on != info.spec.secure_boot:
            await media_service(request).set_boot(info.name, secure_boot=on)
    return answer(secure_boot_view(await svc.get(info.name)))
