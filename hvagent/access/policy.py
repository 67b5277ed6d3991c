"""What the host allows at all: the host policy file and the admission checks.

Owns the host policy file (/etc/hvagent/policy.yaml, the group-policy analog): custom
roles, ACL entries (hvagent.access.acl), quotas, allowed disk formats, allowed VLANs per
role, whether nested virtualization is exposed to guests and the shared image libraries.

`Admission` is what the VM service asks before it creates or grows a VM: quotas, disk
formats, VLANs, and the access decision for the principal of the running request
(hvagent.access.principal.current_principal). Nothing here knows HTTP.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hvagent.access.acl import AccessControl, AclEntry, vm_of
from hvagent.access.principal import current_principal
from hvagent.access.privileges import ADMINISTRATOR, ALL_PRIVILEGES, BUILTIN_ROLES, Role
from hvagent.config import load_settings, parse_settings, validate_settings
from hvagent.errors import InvalidRequest, PolicyDenied
from hvagent.host.formats import DiskFormat
from hvagent.spec import VLAN_MAX, VLAN_MIN, VLAN_RULE

__all__ = ["AclEntry", "Admission", "HostPolicy", "PolicyDenied", "Quotas", "RoleDef",
           "Usage", "load_policy"]


# the policy file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleDef(_Strict):
    privileges: list[str]
    owner_only: bool = False

    @field_validator("privileges")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for p in v:
            if p not in ALL_PRIVILEGES:
                raise ValueError(f"unknown privilege {p!r}")
        return v


class Quotas(_Strict):
    """Absent = unlimited. Per VM counts the VM's ceiling (max_vcpus, max_memory_mib):
    a VM can grow to it by hot-add."""

    max_vcpus_per_vm: int | None = Field(default=None, ge=1)
    max_memory_mib_per_vm: int | None = Field(default=None, ge=1)
    max_vcpus_per_host: int | None = Field(default=None, ge=1)
    max_memory_mib_per_host: int | None = Field(default=None, ge=1)
    max_vcpus_per_principal: int | None = Field(default=None, ge=1)
    max_memory_mib_per_principal: int | None = Field(default=None, ge=1)
    max_vms_per_principal: int | None = Field(default=None, ge=0)


class HostPolicy(_Strict):
    quotas: Quotas = Quotas()
    disk_formats: list[str] = [f.value for f in DiskFormat]  # QEMU's names ("vhd" parses)
    # role name -> VLAN ids it may attach NICs to; a role not listed may use none.
    vlans: dict[str, list[int]] = {}
    # role name -> managed networks (hvagent.services.networks) it may attach NICs to; a
    # role not listed may use none. Absent: every role may use every network.
    networks: dict[str, list[str]] | None = None
    nested_virtualization: bool = True
    roles: dict[str, RoleDef] = {}
    acl: list[AclEntry] = []
    # Directories of shared, read-only images (kernels, initrds) any principal may name
    # as a VM's kernel or initrd (hvagent.services.files).
    library: list[str] = []

    @field_validator("disk_formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        out = []
        for f in v:
            try:
                out.append(DiskFormat(f).value)
            except ValueError:
                raise ValueError(f"unknown disk format {f!r}") from None
        return out

    @field_validator("vlans")
    @classmethod
    def _vlan_ids(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for role, ids in v.items():
            for i in ids:
                if not VLAN_MIN <= i <= VLAN_MAX:
                    raise ValueError(f"{role}: VLAN id {i} is not in {VLAN_RULE}")
        return v

    @field_validator("library")
    @classmethod
    def _library(cls, v: list[str]) -> list[str]:
        for d in v:
            if not d.startswith("/"):
                raise ValueError(f"{d!r} is not an absolute path")
            if Path(d).resolve() == Path("/"):
                # The whole host file system as "shared images" would undo the confinement.
                raise ValueError(f"{d!r}: a library cannot be the root directory")
        return v

    def model_post_init(self, _: Any) -> None:
        for name in self.roles:
            if name in BUILTIN_ROLES:
                raise ValueError(f"roles.{name}: a built-in role cannot be redefined")
        for i, e in enumerate(self.acl):
            if e.role not in BUILTIN_ROLES and e.role not in self.roles:
                raise ValueError(f"acl[{i}].role: unknown role {e.role!r}")

    def role(self, name: str) -> Role | None:
        if name in BUILTIN_ROLES:
            return BUILTIN_ROLES[name]
        d = self.roles.get(name)
        return Role(name, frozenset(d.privileges), d.owner_only) if d else None


def load_policy(path: Path) -> HostPolicy:
    """The policy file; a missing file means built-in roles and no limits."""
    if not path.exists():
        return HostPolicy()
    return load_settings(path, HostPolicy)


def policy_text(path: Path) -> str:
    """The policy file as it is on disk ('' when there is none)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{path}: cannot read: {e}") from e


def save_policy(path: Path, text: str) -> HostPolicy:
    """Replace the policy file with `text`, all or nothing: the text is validated exactly
    as the agent's start would (errors name the file and the key), then written to a
    temporary file beside it, synced and renamed over it. Returns the new policy."""
    raw = text.encode("utf-8")
    policy = validate_settings(path, parse_settings(path, raw), HostPolicy)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise InvalidRequest(f"{path.parent}: cannot write the policy: "
                             f"{e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InvalidRequest(f"{path}: cannot write the policy: {e.strerror or e}") from e
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)  # the rename survives a power cut
    finally:
        os.close(dirfd)
    return policy


# admission: quotas, formats, VLANs (asked by the VM service)


@dataclass(frozen=True)
class Usage:
    vcpus: int
    memory_mib: int
    vms: int


class Admission:
    """The host policy's checks on a VM spec. `usage(principal)` returns what is in use
    on the host (principal None) or by one principal, excluding the VM being changed."""

    def __init__(self, policy: HostPolicy | None = None,
                 access: AccessControl | Callable[[], AccessControl] | None = None,
                 usage: Any = None, record_owner: Any = None,
                 owner: Callable[[str], str | None] | None = None) -> None:
        # `access` may be a callable returning the current ACLs, so that grants stored
        # after the agent started (`hvagent token create --role`) count at once.
        self.policy = policy or HostPolicy()
        self.access = access or AccessControl(self.policy)
        self._usage = usage
        self._record_owner = record_owner
        self._owner = owner  # VM name -> the principal that created it

    def _acl(self) -> AccessControl:
        return self.access() if callable(self.access) else self.access

    def may(self, privilege: str, path: str) -> bool:
        """Whether the requesting principal holds `privilege` on `path` (the same
        decision as a route's; no principal in context means the agent itself)."""
        who = current_principal.get()
        if who is None or who.is_root:
            return True
        vm = vm_of(path)
        owner = self._owner(vm) if vm is not None and self._owner is not None else None
        return self._acl().allowed(who, privilege, path, owner)

    def is_host_admin(self) -> bool:
        """root, or a principal holding Administrator on /vms: who may use host files
        that belong to no VM (loose images, the host's /boot)."""
        who = current_principal.get()
        if who is None or who.is_root:
            return True
        return any(r.name == ADMINISTRATOR for r in self._acl().roles_on(who.name, "/vms"))

    def admit(self, spec: Any, previous: Any = None) -> None:
        """Raise PolicyDenied naming the first rule `spec` breaks (`previous`: the VM's
        spec before a change, None on create)."""
        q = self.policy.quotas
        vcpus = max(spec.vcpus, spec.max_vcpus or spec.vcpus)
        mem = max(spec.memory_mib, spec.max_memory_mib or spec.memory_mib)
        _limit("quota.max_vcpus_per_vm", q.max_vcpus_per_vm, vcpus)
        _limit("quota.max_memory_mib_per_vm", q.max_memory_mib_per_vm, mem)
        for i, d in enumerate(spec.disks):
            fmt = str(d.format or "qcow2")
            if fmt not in self.policy.disk_formats:
                raise PolicyDenied(
                    f"policy disk_formats={','.join(self.policy.disk_formats)}: "
                    f"disks[{i}] is {fmt}")
        self._check_vlans(spec, previous)
        self._check_networks(spec, previous)
        if self._usage is None:
            return
        name = spec.name
        host = self._usage(None, name)
        _limit("quota.max_vcpus_per_host", q.max_vcpus_per_host, host.vcpus + vcpus)
        _limit("quota.max_memory_mib_per_host", q.max_memory_mib_per_host,
               host.memory_mib + mem)
        who = current_principal.get()
        if who is None or who.is_root:
            return
        mine = self._usage(who.name, name)
        _limit("quota.max_vcpus_per_principal", q.max_vcpus_per_principal, mine.vcpus + vcpus)
        _limit("quota.max_memory_mib_per_principal", q.max_memory_mib_per_principal,
               mine.memory_mib + mem)
        if previous is None:
            _limit("quota.max_vms_per_principal", q.max_vms_per_principal, mine.vms + 1)

    def _check_vlans(self, spec: Any, previous: Any = None) -> None:
        # Only NIC attachments the change adds (a new NIC, or a NIC moved to another
        # VLAN): a VM already on a VLAN stays reconfigurable (memory, vCPUs, ...) by
        # whoever may reconfigure it.
        def key(n: Any) -> tuple[Any, Any, Any]:
            return (getattr(n, "mac", None), getattr(n, "vlan", None),
                    tuple(getattr(n, "trunk", ())))

        before = {key(n) for n in previous.nics} if previous is not None else set()
        vlans = [v for n in spec.nics if key(n) not in before
                 for v in [getattr(n, "vlan", None), *getattr(n, "trunk", ())]
                 if v is not None]
        if not vlans:
            return
        self.check_vlans(vlans, f"/vms/{spec.name}")

    def _check_networks(self, spec: Any, previous: Any = None) -> None:
        # As for VLANs: only the NICs the change adds to a managed network.
        rule = self.policy.networks
        who = current_principal.get()
        if rule is None or who is None or who.is_root:
            return
        before = {(n.mac, n.network) for n in previous.nics} if previous is not None else set()
        wanted = [n.network for n in spec.nics
                  if getattr(n, "managed", False) and (n.mac, n.network) not in before]
        if not wanted:
            return
        roles = [r.name for r in self._acl().roles_on(who.name, f"/vms/{spec.name}")]
        if ADMINISTRATOR in roles:
            return
        allowed = {w for r in roles for w in rule.get(r, [])}
        for w in wanted:
            if w not in allowed:
                shown = ";".join(f"networks.{r}={','.join(rule.get(r, [])) or 'none'}"
                                 for r in roles) or "networks"
                raise PolicyDenied(f"policy {shown}: network {w} is not allowed for "
                                   f"{who.name} (roles: {', '.join(roles) or 'none'})")

    def check_vlans(self, vlans: Iterable[int], path: str) -> None:
        who = current_principal.get()
        if who is None or who.is_root:
            return
        roles = [r.name for r in self._acl().roles_on(who.name, path)]
        if ADMINISTRATOR in roles:
            return  # like root: any VLAN
        allowed = {v for r in roles for v in self.policy.vlans.get(r, [])}
        for v in vlans:
            if v not in allowed:
                rule = ";".join(f"vlans.{r}={_ids(self.policy.vlans.get(r, []))}"
                                for r in roles) or "vlans"
                raise PolicyDenied(f"policy {rule}: VLAN {v} is not allowed for "
                                   f"{who.name} (roles: {', '.join(roles) or 'none'})")

    def created(self, name: str) -> None:
        """Record the requesting principal as the owner of the new VM `name`."""
        who = current_principal.get()
        if self._record_owner is not None and who is not None and not who.is_root:
            self._record_owner(name, who.name)


def _ids(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) or "none"


def _limit(rule: str, limit: int | None, requested: int) -> None:
    if limit is not None and requested > limit:
        raise PolicyDenied(f"policy {rule}={limit}: requested {requested}")
