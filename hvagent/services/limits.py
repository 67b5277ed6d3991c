"""What a VM may ask of this host: the limits that depend on the machine the agent runs
on, checked in one place before a VM is created, started or grown (hot-add) and when one
is imported. QEMU's own maxima, which do not depend on the host, are schema constraints
in hvagent.spec (so they show in the OpenAPI document); the policy's quotas are
hvagent.access.policy.Admission.

The rules, stated once:
- memory: one VM's maximum memory (`max_memory_mib`, what it may grow to by hot-add)
  may not exceed the host's physical memory (MemTotal in /proc/meminfo). Memory is
  overcommitted across VMs (QEMU allocates guest RAM lazily): the sum over all VMs is
  capped only by the policy's `quota.max_memory_mib_per_host`, if the policy sets one.
- vCPUs: one VM's maximum vCPUs (`max_vcpus`) may not exceed the host's logical CPUs,
  as Hyper-V does: more vCPUs than CPUs only adds lock-holder preemption stalls in the
  guest. vCPUs are overcommitted across VMs (quota.max_vcpus_per_host caps the sum).
- the VM's QMP socket path must fit a unix socket address (sun_path, 108 bytes with
  its NUL), which bounds the VM name by the length of the agent's run_dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from hvagent.errors import InvalidRequest
from hvagent.spec import VMSpec

# sizeof(struct sockaddr_un.sun_path) on Linux, including the terminating NUL.
SUN_PATH_MAX = 108
MEMINFO = Path("/proc/meminfo")


def host_memory_mib() -> int:
    """The host's physical memory (MemTotal), in MiB."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024  # kB
    raise RuntimeError(f"{MEMINFO}: no MemTotal line")


def host_cpus() -> int:
    return os.cpu_count() or 1


def check_host_limits(spec: VMSpec, qmp_socket: Path) -> None:
    """Raise InvalidRequest naming the first host limit `spec` exceeds."""
    mem = max(spec.memory_mib, spec.max_memory_mib or spec.memory_mib)
    host_mem = host_memory_mib()
    if mem > host_mem:
        field = "max_memory_mib" if mem > spec.memory_mib else "memory_mib"
        raise InvalidRequest(f"{field}: {mem} MiB is above this host's memory "
                             f"({host_mem} MiB, MemTotal)")
    cpus = max(spec.vcpus, spec.max_vcpus or spec.vcpus)
    host = host_cpus()
    if cpus > host:
        field = "max_vcpus" if cpus > spec.vcpus else "vcpus"
        raise InvalidRequest(f"{field}: {cpus} vCPUs is above this host's {host} logical "
                             "CPUs")
    size = len(os.fsencode(qmp_socket)) + 1
    if size > SUN_PATH_MAX:
        raise InvalidRequest(
            f"name: {spec.name!r} is too long for this agent: its QMP socket {qmp_socket} "
            f"needs {size} bytes, a unix socket path holds at most {SUN_PATH_MAX} "
            f"(shorten the name by {size - SUN_PATH_MAX} or use a shorter run_dir)")
