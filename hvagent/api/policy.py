"""GET/PUT /api/v1/policy: the host policy file (custom roles, ACLs, quotas, formats,
VLANs, libraries) read and replaced whole, as text — the Group Policy of a fleet, pushed
by the Ansible collection's `policy` module. A pushed policy is validated exactly as the
agent's start validates the file, written atomically and in force for the next request;
a bad one changes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from hvagent.access.policy import policy_text, save_policy
from hvagent.access.privileges import Privilege as P
from hvagent.access.security import Security
from hvagent.api import deps
from hvagent.api.auth import require
from hvagent.config import MAX_SETTINGS_BYTES

router = APIRouter(prefix="/policy", tags=["policy"])
# One writer at a time: two pushes never interleave their validate-and-rename.
_write = threading.Lock()


class PolicyText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=MAX_SETTINGS_BYTES,
                      description="the whole policy file, YAML ('' for no policy: "
                                  "built-in roles and no limits)")


class PolicyDocument(BaseModel):
    text: str = Field(description="the policy file as it is on the host ('' if none)")
    sha256: str = Field(description="sha256 of text (UTF-8), to tell a change at a glance")


def _document(text: str) -> PolicyDocument:
    return PolicyDocument(text=text, sha256=hashlib.sha256(text.encode()).hexdigest())


@router.get("", dependencies=[Depends(require(P.SYS_AUDIT, "/"))])
async def get_policy(request: Request) -> PolicyDocument:
    path = deps.vms(request).config.policy
    return _document(await asyncio.to_thread(policy_text, path))


@router.put("", dependencies=[Depends(require(P.PERMISSIONS_MODIFY, "/"))])
async def put_policy(body: PolicyText, request: Request,
                     security: Annotated[Security, Depends(deps.security)]) -> PolicyDocument:
    path = deps.vms(request).config.policy

    def replace() -> None:
        with _write:
            security.replace_policy(save_policy(path, body.text))

    await asyncio.to_thread(replace)
    return _document(body.text)
