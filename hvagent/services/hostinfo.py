"""The host's capacity as the agent reports it (GET /api/v1/agent): CPUs, memory (and how
much of it the running VMs hold), the storage directory's file system and the VMs by
state. Read from /proc and statvfs on each request: the numbers are live, nothing is
cached."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hvagent.services.vms import VMService
from hvagent.spec import ANSWERING_STATES, VMState

PROC = Path("/proc")


@dataclass(frozen=True)
class HostFacts:
    cpu_count: int
    cpu_model: str
    memory_total_bytes: int
    memory_free_bytes: int  # MemAvailable: what a new VM can take without swapping
    memory_committed_bytes: int  # the memory of the VMs that run or are paused
    storage_dir: str
    storage_total_bytes: int
    storage_free_bytes: int  # for an unprivileged writer, as statvfs's f_bavail says
    vm_states: dict[str, int]  # every VMState, zero included, so a script can index it


def cpu_model(proc: Path = PROC) -> str:
    """The first processor's model name (x86 "model name", else arm's "Processor"/"CPU
    part"), or "unknown"."""
    try:
        text = (proc / "cpuinfo").read_text()
    except OSError:
        return "unknown"
    for key in ("model name", "Processor", "cpu model"):
        for line in text.splitlines():
            k, sep, v = line.partition(":")
            if sep and k.strip() == key and v.strip():
                return v.strip()
    return "unknown"


def meminfo(proc: Path = PROC) -> dict[str, int]:
    """/proc/meminfo in bytes (its figures are kB)."""
    out = {}
    for line in (proc / "meminfo").read_text().splitlines():
        k, sep, v = line.partition(":")
        fields = v.split()
        if sep and fields and fields[0].isdigit():
            out[k.strip()] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


async def host_facts(svc: VMService) -> HostFacts:
    vms = await svc.list_vms()  # observed states: a crashed QEMU commits nothing
    states = Counter(str(vm.state) for vm in vms)
    committed = sum(vm.spec.memory_mib for vm in vms if vm.state in ANSWERING_STATES)
    mem = meminfo()
    storage = svc.storage_dir
    # Not made yet (no disk created): its file system is the nearest existing parent's.
    where = storage
    while not where.exists() and where != where.parent:
        where = where.parent
    st = os.statvfs(where)
    return HostFacts(
        cpu_count=os.cpu_count() or 1, cpu_model=cpu_model(),
        memory_total_bytes=mem.get("MemTotal", 0),
        memory_free_bytes=mem.get("MemAvailable", mem.get("MemFree", 0)),
        memory_committed_bytes=committed * 1024 * 1024,
        storage_dir=str(storage),
        storage_total_bytes=st.f_blocks * st.f_frsize,
        storage_free_bytes=st.f_bavail * st.f_frsize,
        vm_states={str(s): states.get(str(s), 0) for s in VMState})
