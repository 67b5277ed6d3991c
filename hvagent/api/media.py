"""REST v1: a VM's removable media and boot override (/api/v1/vms/{name}/media/{slot},
/api/v1/vms/{name}/boot); Redfish's VirtualMedia and Boot are the same service
(hvagent.services.media)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from hvagent.access.privileges import Privilege as P
from hvagent.api import deps
from hvagent.api.auth import require
from hvagent.api.schemas import VMName
from hvagent.services.media import MediaService
from hvagent.services.vms import VMInfo, VMService
from hvagent.spec import PATH_MAX_CHARS, TEXT_PATTERN, BootDevice, BootEnabled, Firmware, MediaSlot

router = APIRouter(prefix="/vms", tags=["media"])
Service = Annotated[VMService, Depends(deps.vms)]


def _media(request: Request) -> MediaService:
    return request.app.state.media  # type: ignore[no-any-return]


Media = Annotated[MediaService, Depends(_media)]


class InsertMedia(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=PATH_MAX_CHARS,
                       json_schema_extra={"pattern": TEXT_PATTERN}, description=(
                           "an http(s) URL (the agent downloads it) or a file in the storage "
                           "directory or, read-only, a library"))
    write_protected: bool = True


class BootChange(BaseModel):
    """Fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    target: BootDevice | None = None
    enabled: BootEnabled | None = None
    firmware: Firmware | None = Field(default=None, description="only while the VM is off")


@router.put("/{name}/media/{slot}", dependencies=[Depends(require(P.VM_CONFIG_DISK))])
async def insert_media(name: VMName, slot: MediaSlot, body: InsertMedia, media: Media,
                       svc: Service) -> VMInfo:
    await media.insert(name, slot, body.image, write_protected=body.write_protected)
    return await svc.get(name)


@router.delete("/{name}/media/{slot}", dependencies=[Depends(require(P.VM_CONFIG_DISK))])
async def eject_media(name: VMName, slot: MediaSlot, media: Media, svc: Service) -> VMInfo:
    await media.eject(name, slot)
    return await svc.get(name)


@router.put("/{name}/boot", dependencies=[Depends(require(P.VM_CONFIG_OPTIONS))])
async def set_boot(name: VMName, body: BootChange, media: Media, svc: Service) -> VMInfo:
    await media.set_boot(name, target=body.target, enabled=body.enabled,
                         firmware=body.firmware)
    return await svc.get(name)
