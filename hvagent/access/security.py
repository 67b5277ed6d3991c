"""The running agent's access control in one object: who a token names, whether a
principal may use a privilege on a path (ACLs and VM ownership), the quota usage the
host policy counts, and the audit log. The HTTP side (headers, peers, 401/403) is
hvagent.api.auth's.
"""

from __future__ import annotations

from hvagent.access.acl import AccessControl, vm_of
from hvagent.access.audit import AuditLog
from hvagent.access.policy import Admission, HostPolicy, Usage
from hvagent.access.principal import Principal
from hvagent.access.sessions import Sessions
from hvagent.access.tokens import Tokens, TokenStatus
from hvagent.spec import VMSpec
from hvagent.store import Store


class Security:
    """Tokens, ACLs, VM owners and the audit log of one agent."""

    def __init__(self, store: Store, policy: HostPolicy, enforce: bool = True) -> None:
        self.store = store
        self.policy = policy
        self.tokens = Tokens(store)
        self.audit = AuditLog(store)
        self.sessions = Sessions(self.tokens)  # Redfish logins (X-Auth-Token)
        # enforce=False exists for bench/auth.py only (the same app without the checks).
        self.enforce = enforce
        self._admissions: list[Admission] = []

    def admission(self) -> Admission:
        """The host-policy hook the VM service calls on create and resource changes."""
        a = Admission(self.policy, self.access, usage=self.usage,
                      record_owner=self.tokens.set_owner, owner=self.tokens.owner)
        self._admissions.append(a)
        return a

    def replace_policy(self, policy: HostPolicy) -> None:
        """A new host policy, in force for the next decision: the ACLs are built from
        self.policy on every check, and the admission hooks handed out follow it."""
        self.policy = policy
        for a in self._admissions:
            a.policy = policy

    def access(self) -> AccessControl:
        # Stored grants are read on every decision: `hvagent token create --role` on the
        # host takes effect at once.
        return AccessControl(self.policy, self.tokens.grants())

    def token_principal(self, token: str) -> tuple[Principal | None, str, str]:
        """(principal, why-not, who-to-blame-in-the-audit-log) of a bearer token: a
        valid token names its principal; an unknown, expired or revoked one none."""
        info = self.tokens.lookup(token)
        if info is None:
            return None, "invalid token", "-"
        status = info.status()
        if status is not TokenStatus.VALID:
            return None, f"token {info.id} is {status}", info.principal
        return Principal(info.principal, info.id), "", info.principal

    def allowed(self, principal: Principal, privilege: str, path: str) -> bool:
        """Whether `principal` holds `privilege` on the ACL path `path`."""
        if principal.is_root:
            return True
        vm = vm_of(path)
        owner = self.tokens.owner(vm) if vm is not None else None
        return self.access().allowed(principal, privilege, path, owner)

    def permitted(self, principal: Principal | None, privilege: str, path: str) -> bool:
        """The decision a route makes: no principal holds nothing; with checks off
        (enforce=False) everything is permitted."""
        if not self.enforce:
            return True
        return principal is not None and self.allowed(principal, privilege, path)

    def usage(self, principal: str | None, exclude: str) -> Usage:
        """vCPUs and memory (ceilings) of the host's VMs, or of those `principal` owns,
        leaving out the VM `exclude` (the one being created or changed)."""
        vcpus = mem = count = 0
        for row in self.store.list_vms(owned_by=principal):
            if row.name == exclude:
                continue
            spec = VMSpec.model_validate_json(row.spec)
            vcpus += max(spec.vcpus, spec.max_vcpus or 0)
            mem += max(spec.memory_mib, spec.max_memory_mib or 0)
            count += 1
        return Usage(vcpus, mem, count)

