"""The privilege table, stated once: every privilege by name (what it allows) and the
built-in roles, each a set of privileges (Proxmox VE's model). Custom roles come from the
host policy file (hvagent.access.policy); routes name the privilege they need
(hvagent.api.auth.require).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Privilege(StrEnum):
    VM_ALLOCATE = "VM.Allocate"  # create or remove a VM
    VM_CONFIG_CPU = "VM.Config.CPU"
    VM_CONFIG_MEMORY = "VM.Config.Memory"
    VM_CONFIG_DISK = "VM.Config.Disk"
    VM_CONFIG_NETWORK = "VM.Config.Network"
    VM_CONFIG_OPTIONS = "VM.Config.Options"
    VM_POWERMGMT = "VM.PowerMgmt"
    VM_CONSOLE = "VM.Console"
    VM_SNAPSHOT = "VM.Snapshot"
    VM_SNAPSHOT_ROLLBACK = "VM.Snapshot.Rollback"
    VM_AUDIT = "VM.Audit"
    DISK_READ = "Disk.Read"
    DISK_WRITE = "Disk.Write"
    NETWORK_ALLOCATE = "Network.Allocate"  # create or remove a managed network
    NETWORK_AUDIT = "Network.Audit"  # see the managed networks
    SYS_AUDIT = "Sys.Audit"
    SYS_MODIFY = "Sys.Modify"
    SYS_METRICS = "Sys.Metrics"  # read the Prometheus metrics (GET /metrics)
    PERMISSIONS_MODIFY = "Permissions.Modify"


P = Privilege
VM_CONFIG = frozenset({P.VM_CONFIG_CPU, P.VM_CONFIG_MEMORY, P.VM_CONFIG_DISK,
                       P.VM_CONFIG_NETWORK, P.VM_CONFIG_OPTIONS})
ALL_PRIVILEGES = frozenset(Privilege)


@dataclass(frozen=True)
class Role:
    name: str
    privileges: frozenset[str]
    owner_only: bool = False  # on /vms/<name>: only for the principal that created it


ADMINISTRATOR = "Administrator"
BUILTIN_ROLES: dict[str, Role] = {r.name: r for r in (
    Role(ADMINISTRATOR, ALL_PRIVILEGES),
    # Creates VMs and manages the ones it created; nothing on other principals' VMs.
    Role("VMCreator", frozenset({P.VM_ALLOCATE, P.VM_AUDIT, *VM_CONFIG, P.VM_POWERMGMT,
                                 P.VM_CONSOLE, P.VM_SNAPSHOT, P.VM_SNAPSHOT_ROLLBACK,
                                 P.NETWORK_AUDIT}),
         owner_only=True),
    # Runs and reconfigures existing VMs; may not create or delete any (no VM.Allocate).
    # Sys.Audit: the agent's status, the audit log and every job where it holds the role
    # on / (the jobs of the VMs it may see need only VM.Audit).
    Role("VMOperator", frozenset({*VM_CONFIG, P.VM_POWERMGMT, P.VM_CONSOLE, P.VM_SNAPSHOT,
                                  P.VM_SNAPSHOT_ROLLBACK, P.VM_AUDIT, P.SYS_AUDIT,
                                  P.SYS_METRICS, P.NETWORK_AUDIT})),
    # Sys.Metrics: they see all of it through Sys.Audit already.
    Role("Auditor", frozenset({P.VM_AUDIT, P.SYS_AUDIT, P.SYS_METRICS, P.NETWORK_AUDIT})),
    # A Prometheus server's token: the metrics and nothing else.
    Role("MetricsReader", frozenset({P.SYS_METRICS})),
)}
