"""REST v1: the host's managed networks (/api/v1/networks): bridged, nat and isolated
networks as objects (hvagent.services.networks). Creating and deleting take
Network.Allocate, seeing them Network.Audit; which networks a role may attach NICs to is
the host policy's `networks` rule."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from hvagent.access.privileges import Privilege as P
from hvagent.api.auth import require
from hvagent.netspec import NetworkSpec
from hvagent.services.networks import NetworkInfo, NetworkService
from hvagent.spec import Name

router = APIRouter(prefix="/networks", tags=["networks"])


def _networks(request: Request) -> NetworkService:
    return request.app.state.vms.networks  # type: ignore[no-any-return]


Networks = Annotated[NetworkService, Depends(_networks)]


@router.get("", dependencies=[Depends(require(P.NETWORK_AUDIT, "/networks"))])
async def list_networks(svc: Networks) -> list[NetworkInfo]:
    return await svc.list()


@router.get("/{name}", dependencies=[Depends(require(P.NETWORK_AUDIT, "/networks/{name}"))])
async def show_network(name: Name, svc: Networks) -> NetworkInfo:
    return await svc.get(name)


@router.post("", status_code=status.HTTP_201_CREATED,
             dependencies=[Depends(require(P.NETWORK_ALLOCATE, "/networks"))])
async def create_network(spec: NetworkSpec, svc: Networks) -> NetworkInfo:
    return await svc.create(spec)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT,
               dependencies=[Depends(require(P.NETWORK_ALLOCATE, "/networks/{name}"))])
async def delete_network(name: Name, svc: Networks) -> Response:
    await svc.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
