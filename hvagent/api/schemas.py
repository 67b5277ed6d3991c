"""Request and response bodies of REST v1 that are not domain models themselves."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from hvagent.spec import (
    DEFAULT_STOP_TIMEOUT,
    MAC_PATTERN,
    NAME_MAX,
    NAME_RE,
    NAME_RULE,
    PATH_MAX_CHARS,
    PATH_PATTERN,
    check_name,
    check_path,
)

# Path parameters: the same rules as the bodies that made the objects, so a name no
# object can have answers 422 naming the rule (not 404), and the document states it.
VMName = Annotated[str, Path(description=f"a VM name: {NAME_RULE}",
                             json_schema_extra={"pattern": NAME_RE, "minLength": 1,
                                                "maxLength": NAME_MAX}),
                   AfterValidator(check_name)]
CheckpointName = Annotated[str, Path(description=f"a checkpoint name: {NAME_RULE}",
                                     json_schema_extra={"pattern": NAME_RE, "minLength": 1,
                                                        "maxLength": NAME_MAX}),
                           AfterValidator(check_name)]
Mac = Annotated[str, Path(pattern=MAC_PATTERN, description="a NIC's MAC address")]
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="a job id")]
HostPathQuery = Annotated[str, Query(min_length=1, max_length=PATH_MAX_CHARS,
                                     json_schema_extra={"pattern": PATH_PATTERN},
                                     description="a host path (no control characters)"),
                          AfterValidator(check_path)]
TargetQuery = Annotated[str | None, Query(
    max_length=NAME_MAX, pattern=NAME_RE,
    description="only the jobs acting on this VM")]


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


class CpuInfo(BaseModel):
    count: int = Field(description="logical CPUs of the host")
    model: str = Field(description="the processor's model name, or 'unknown'")


class MemoryInfo(BaseModel):
    total_bytes: int = Field(description="MemTotal of /proc/meminfo")
    free_bytes: int = Field(description="MemAvailable of /proc/meminfo")
    committed_bytes: int = Field(description="the memory of the VMs that run or are paused")


class StorageInfo(BaseModel):
    dir: str = Field(description="the agent's storage directory")
    total_bytes: int = Field(description="size of its file system")
    free_bytes: int = Field(description="free space on it for the agent's writes")


class AgentInfo(BaseModel):
    version: str
    accel: str = Field(description="kvm or tcg; unavailable when the configured one does "
                       "not work on this host (accel_reason says why)")
    accel_reason: str
    vms: int
    state_dir: str
    persistent: bool = Field(description="whether the agent's state survives a power-off")
    persistence: str = Field(description="why (the mount and file system of state_dir)")
    warnings: list[str] = Field(description="conditions an operator should act on")
    cpu: CpuInfo
    memory: MemoryInfo
    storage: StorageInfo
    vm_states: dict[str, int] = Field(description="how many VMs are in each state")
