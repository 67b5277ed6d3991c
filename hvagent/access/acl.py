"""ACL entries and the access decision: may a principal use a privilege on a path.

Access decisions follow Proxmox VE: an ACL entry grants a role to a principal on a path
(`/`, `/vms`, `/vms/<name>`, `/networks/<name>`); an entry with `propagate` also covers
the paths below it, and the most specific path that has entries for the principal
decides (a specific entry replaces what is inherited). A role marked `owner_only`
(VMCreator) grants its privileges on a single VM only to the principal that created it.
Entries come from the host policy file and from grants stored on the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hvagent.access.principal import Principal
from hvagent.access.privileges import Role

if TYPE_CHECKING:
    from hvagent.access.policy import HostPolicy


class AclEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(pattern=r"^/([A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*)?$", max_length=1024)
    principal: str = Field(min_length=1)
    role: str
    propagate: bool = True

    @field_validator("path")
    @classmethod
    def _canonical(cls, v: str) -> str:
        # "." and ".." would name a different path than the one access checks compare.
        if any(part in (".", "..") for part in v.split("/")):
            raise ValueError(f"{v!r} is not a canonical path (no . or .. parts)")
        return v


def ancestors(path: str) -> list[str]:
    """/vms/a -> ["/vms/a", "/vms", "/"] (most specific first)."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def vm_of(path: str) -> str | None:
    """The VM an ACL path names (/vms/<name>/...), None for any other path."""
    parts = [p for p in path.split("/") if p]
    return parts[1] if len(parts) >= 2 and parts[0] == "vms" else None


@dataclass
class AccessControl:
    """ACL entries (policy file + entries stored by `hvagent token create --role`)."""

    policy: HostPolicy
    stored: list[AclEntry] = field(default_factory=list)

    def entries(self) -> Iterable[AclEntry]:
        yield from self.policy.acl
        yield from self.stored

    def roles_on(self, principal: str, path: str) -> list[Role]:
        """The roles `principal` holds on `path`: the most specific level with entries."""
        mine = [e for e in self.entries() if e.principal == principal]
        for level in ancestors(path):
            found = [e for e in mine if e.path == level and (e.propagate or level == path)]
            if found:
                return [r for e in found if (r := self.policy.role(e.role)) is not None]
        return []

    def allowed(self, principal: Principal, privilege: str, path: str,
                owner: str | None) -> bool:
        """`owner` is the creator of the VM `path` names (None: no VM, or unknown)."""
        if principal.is_root:
            return True
        vm = vm_of(path)
        for role in self.roles_on(principal.name, path):
            if privilege not in role.privileges:
                continue
            if role.owner_only and vm is not None and owner != principal.name:
                continue
            return True
        return False
