"""Request and response bodies of REST v1 that are not domain models themselves."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hvagent.vm.service import DEFAULT_STOP_TIMEOUT


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = False
    timeout: float = Field(default=DEFAULT_STOP_TIMEOUT, gt=0, le=3600,
                           description="seconds to wait for an ACPI power-off")


class Console(BaseModel):
    name: str
    lines: int
    text: str


class Deleted(BaseModel):
    name: str
    removed_disks: list[str]


class AgentInfo(BaseModel):
    version: str
    accel: str
    accel_reason: str
    vms: int
