"""Dynamic resources of VMs: hot-add and hot-remove of vCPUs, memory (pc-dimm DIMMs),
disks and NICs, and the unplug state machine. The QMP side of each (plugging, waiting for
the guest to release a device, plugging hot-added devices again at start) is
hvagent.drivers.machine.Machine's; this service decides what changes and records it.

Unplug: requested -> removed when the guest releases the device -> or `pending` after a
timeout when the guest does not cooperate. A pending unplug stays in the spec
(`pending_unplugs`, shown by `show`) and completes when the device deletion is reported
later, when the next request finds the device gone, or at the VM's next power cycle
(hvagent.drivers.cmdline.settle_pending).

Every change is written to the spec right after QEMU accepted it; a change QEMU refuses
is undone in QEMU and leaves the spec as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from hvagent.drivers.cmdline import dimm_ids, disk_node, nic_ids, without
from hvagent.drivers.machine import DeviceKind, Machine
from hvagent.errors import Conflict, InvalidRequest, NotFound
from hvagent.services.limits import check_host_limits
from hvagent.services.metrics import OperationMetrics
from hvagent.services.networks import check_vlan
from hvagent.spec import (
    ACTIVE_STATES,
    DEFAULT_UNPLUG_TIMEOUT,
    DimmSpec,
    DiskSpec,
    NicSpec,
    PendingUnplug,
    VMSpec,
)

if TYPE_CHECKING:
    from hvagent.services.vms import VMInfo, VMService

log = logging.getLogger(__name__)

DIMM_STEP_MIB = 128  # Linux onlines hot-added memory in 128 MiB blocks


# free places for a hot-added device


def free_port(spec: VMSpec) -> int | None:
    used = {d.slot for d in spec.disks} | {n.slot for n in spec.nics}
    return next((p for p in range(spec.hotplug_ports) if p not in used), None)


def free_memory_slot(spec: VMSpec) -> int | None:
    used = {d.slot for d in spec.dimms}
    return next((s for s in range(spec.memory_slots or 0) if s not in used), None)


def _with(spec: VMSpec, **upd: Any) -> VMSpec:
    """A validated copy of `spec` with fields replaced; a change the spec's own rules
    refuse is the caller's mistake, named like any other invalid request."""
    try:
        return VMSpec.model_validate(spec.model_copy(update=upd).model_dump())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or ", ".join(upd)
        raise InvalidRequest(f"{spec.name}: {where}: {first['msg']}") from None


# the service


class Change(BaseModel):
    """The outcome of a resource change."""

    status: Literal["done", "pending"]
    detail: str
    vm: Any  # VMInfo after the change


class DeviceService:
    def __init__(self, vms: VMService, metrics: OperationMetrics | None = None) -> None:
        self.vms = vms
        self.hotadd_duration = (metrics or OperationMetrics()).hotadd_duration
        vms.event_listeners.append(self._on_event)

    # queries

    async def devices(self, name: str) -> dict[str, Any]:
        info = await self.vms.get(name)
        if info.state in ACTIVE_STATES:
            await self._reconcile(name)
            info = await self.vms.get(name)
        s = info.spec
        return {
            "name": name, "state": info.state,
            "vcpus": s.vcpus, "max_vcpus": s.max_vcpus, "hot_vcpus": s.hot_vcpus,
            "memory_mib": s.memory_mib, "max_memory_mib": s.max_memory_mib,
            "boot_memory_mib": s.boot_memory_mib,
            "dimms": [d.model_dump() for d in s.dimms],
            "memory_slots": s.memory_slots,
            "free_memory_slots": (s.memory_slots or 0) - len(s.dimms),
            "hotplug_ports": s.hotplug_ports,
            "free_ports": s.hotplug_ports - sum(d.slot is not None for d in s.disks)
                          - sum(n.slot is not None for n in s.nics),
            "disks": [d.model_dump() for d in s.disks],
            "nics": [n.model_dump() for n in s.nics],
            "pending_unplugs": [p.model_dump() for p in s.pending_unplugs],
        }

    # changes

    async def set_memory(self, name: str, memory_mib: int,
                         timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> Change:
        m = await self._machine_if_active(name)
        with self.vms.locks.hold(name, "set-memory"):
            spec = self._spec(name)
            assert spec.max_memory_mib is not None
            if memory_mib > spec.max_memory_mib:
                raise Conflict(f"max_memory_mib: {memory_mib} MiB is above the VM's maximum "
                               f"of {spec.max_memory_mib} MiB")
            check_host_limits(spec.model_copy(update={"memory_mib": memory_mib}),
                              self.vms.files(name).qmp)
            if m is None:  # stopped: the boot memory changes
                if memory_mib - (spec.memory_mib - spec.boot_memory_mib) < 16:
                    raise InvalidRequest(f"memory_mib: {memory_mib} MiB leaves less than "
                                         "16 MiB of boot memory beside the DIMMs")
                new = _with(spec, memory_mib=memory_mib)
                self.vms.admission.admit(new, previous=spec)
                return await self._commit(name, spec, new, "done",
                                          f"memory set to {memory_mib} MiB")
            await self._reconcile_locked(name, m)
            spec = self._spec(name)
            delta = memory_mib - spec.memory_mib
            if delta == 0:
                return await self._result(name, "done", "memory unchanged")
            if delta > 0:
                return await self._add_memory(name, m, spec, delta)
            return await self._remove_memory(name, m, spec, -delta, timeout)

    async def _add_memory(self, name: str, m: Machine, spec: VMSpec, delta: int) -> Change:
        if delta % DIMM_STEP_MIB:
            raise InvalidRequest(f"memory_mib: a running VM grows in steps of "
                                 f"{DIMM_STEP_MIB} MiB (asked for +{delta} MiB)")
        slot = free_memory_slot(spec)
        if slot is None:
            raise Conflict(f"memory_slots: all {spec.memory_slots} memory slots are in use")
        dimm = DimmSpec(slot=slot, size_mib=delta)
        new = _with(spec, memory_mib=spec.memory_mib + delta, dimms=[*spec.dimms, dimm])
        self.vms.admission.admit(new, previous=spec)
        with self.hotadd_duration.labels(device="memory").time():
            await m.hot_add_memory(dimm)
        return await self._commit(name, spec, new, "done",
                                  f"added a {delta} MiB DIMM in slot {slot}")

    async def _remove_memory(self, name: str, m: Machine, spec: VMSpec, delta: int,
                             timeout: float) -> Change:
        # Whole hot-added DIMMs only, newest first (the guest can offline movable memory).
        busy = {p.device for p in spec.pending_unplugs}
        take: list[DimmSpec] = []
        for d in reversed(spec.dimms):
            if sum(x.size_mib for x in take) >= delta:
                break
            if dimm_ids(d)[0] not in busy:
                take.append(d)
        if sum(x.size_mib for x in take) != delta:
            sizes = ", ".join(str(d.size_mib) for d in reversed(spec.dimms)) or "none"
            raise Conflict(f"dimms: a running VM shrinks only by whole hot-added DIMMs, "
                           f"newest first (DIMMs in MiB, newest first: {sizes})")
        pending = []
        for d in take:
            done = await self._unplug(name, m, "memory", dimm_ids(d)[0], timeout)
            if not done:
                pending.append(dimm_ids(d)[0])
        if pending:
            return await self._result(name, "pending",
                                      f"the guest has not released {', '.join(pending)} yet")
        return await self._result(name, "done", f"memory set to {spec.memory_mib - delta} MiB")

    async def set_vcpus(self, name: str, vcpus: int,
                        timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> Change:
        m = await self._machine_if_active(name)
        with self.vms.locks.hold(name, "set-vcpus"):
            spec = self._spec(name)
            assert spec.max_vcpus is not None
            if vcpus > spec.max_vcpus:
                raise Conflict(f"max_vcpus: {vcpus} vCPUs is above the VM's maximum of "
                               f"{spec.max_vcpus}")
            check_host_limits(spec.model_copy(update={"vcpus": vcpus}),
                              self.vms.files(name).qmp)
            if m is None:
                new = _with(spec, vcpus=vcpus, hot_vcpus=min(spec.hot_vcpus, vcpus - 1))
                self.vms.admission.admit(new, previous=spec)
                return await self._commit(name, spec, new, "done", f"vcpus set to {vcpus}")
            await self._reconcile_locked(name, m)
            spec = self._spec(name)
            if vcpus > spec.vcpus:
                new = _with(spec, vcpus=vcpus, hot_vcpus=spec.hot_vcpus + vcpus - spec.vcpus)
                self.vms.admission.admit(new, previous=spec)
                added: list[str] = []
                try:
                    for _ in range(vcpus - spec.vcpus):
                        with self.hotadd_duration.labels(device="vcpu").time():
                            added.append(await m.hot_add_vcpu())
                except BaseException:
                    await m.remove_devices(added)  # all or nothing
                    raise
                return await self._commit(name, spec, new, "done",
                                          f"added vCPUs {', '.join(added)}")
            if vcpus == spec.vcpus:
                return await self._result(name, "done", "vcpus unchanged")
            hot = [c for c in await m.hot_vcpus()
                   if c not in {p.device for p in spec.pending_unplugs}]
            count = spec.vcpus - vcpus
            if count > len(hot):
                raise Conflict(f"hot_vcpus: only hot-added vCPUs can be removed from a "
                               f"running VM ({len(hot)} removable, asked for {count})")
            pending = []
            for dev in reversed(hot[-count:]):
                if not await self._unplug(name, m, "vcpu", dev, timeout):
                    pending.append(dev)
            if pending:
                return await self._result(name, "pending",
                                          f"the guest has not released {', '.join(pending)} yet")
            return await self._result(name, "done", f"vcpus set to {vcpus}")

    async def attach_disk(self, name: str, disk: DiskSpec) -> Change:
        if disk.bus != "virtio":
            # An AHCI port cannot be hot-plugged; a sata disk is defined with the VM.
            raise InvalidRequest(f"disk.bus: {disk.bus} disks cannot be hot-attached (only "
                                 "virtio); define the disk with the VM instead")
        m = await self._machine_if_active(name)
        with self.vms.locks.hold(name, "attach-disk"):
            spec = self._spec(name)
            slot = free_port(spec)
            if slot is None and m is not None:
                raise Conflict(f"hotplug_ports: all {spec.hotplug_ports} hotplug ports are "
                               "in use")
            created: list[Path] = []
            try:
                resolved = await self.vms.disks.resolve(spec.name, disk, "disk", created,
                                                        number=len(spec.disks), next_free=True)
                new = _with(spec, disks=[*spec.disks, resolved.model_copy(update={"slot": slot})])
                self.vms.admission.admit(new, previous=spec)
                if m is not None:
                    with self.hotadd_duration.labels(device="disk").time():
                        await m.hot_add_disk(new, len(new.disks) - 1)
                return await self._commit(name, spec, new, "done",
                                          f"attached {resolved.path}")
            except BaseException:
                for p in created:
                    p.unlink(missing_ok=True)
                raise

    async def detach_disk(self, name: str, path: str,
                          timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> Change:
        m = await self._machine_if_active(name)
        with self.vms.locks.hold(name, "detach-disk"):
            spec = self._spec(name)
            # Only matched against this VM's own disks: nothing to confine or own.
            want = self.vms.disks.own_disk_path(path)
            matches = [i for i, d in enumerate(spec.disks) if d.path == want]
            if not matches:
                raise NotFound(f"{name}: no disk {path}")
            i = matches[0]
            if m is None:
                new = _with(spec, disks=[d for j, d in enumerate(spec.disks) if j != i])
                return await self._commit(name, spec, new, "done", f"detached {want}")
            return await self._unplug_port_device(name, m, spec, "disk",
                                                  disk_node(spec, i), spec.disks[i].slot,
                                                  f"disk {want}", timeout)

    async def add_nic(self, name: str, nic: NicSpec) -> Change:
        m = await self._machine_if_active(name)
        nic = self.vms.networks.resolve_nic(nic, "nic")
        nic = self.vms.networks.unique_macs([nic], name, "nic")[0]
        await self.vms.networks.check_trunks([nic], "nic")
        with self.vms.locks.hold(name, "add-nic"):
            spec = self._spec(name)
            slot = free_port(spec)
            if slot is None and m is not None:
                raise Conflict(f"hotplug_ports: all {spec.hotplug_ports} hotplug ports are "
                               "in use")
            new = _with(spec, nics=[*spec.nics, nic.model_copy(update={"slot": slot})])
            self.vms.admission.admit(new, previous=spec)
            if m is not None:
                added = new.nics[-1]
                await self.vms.networks.plug(added)  # QEMU opens the tap by name
                try:
                    with self.hotadd_duration.labels(device="nic").time():
                        await m.hot_add_nic(new, len(new.nics) - 1)
                except BaseException:
                    await self.vms.networks.unplug(added)
                    raise
            return await self._commit(name, spec, new, "done", f"added NIC {nic.mac}")

    async def set_nic_vlan(self, name: str, mac: str, vlan: int | None,
                           trunk: list[int] | None = None) -> Change:
        """Move a bridge NIC to VLAN `vlan` and/or give it the trunk list `trunk` (None:
        unchanged); on a running VM its tap moves live (the guest keeps its NIC and sees
        the new segments at once)."""
        if vlan is not None:
            check_vlan(vlan)
        m = await self._machine_if_active(name)
        with self.vms.locks.hold(name, "set-nic-vlan"):
            spec = self._spec(name)
            matches = [i for i, n in enumerate(spec.nics) if n.mac == mac.lower()]
            if not matches:
                raise NotFound(f"{name}: no NIC with MAC {mac}")
            i = matches[0]
            nic = spec.nics[i]
            if nic.network == "user" or self.vms.networks.addressed(nic.network):
                raise Conflict(f"{name}: NIC {mac} uses {nic.network} networking, which has "
                               "no VLAN (remove it and add a bridge NIC)")
            want_vlan = nic.vlan if vlan is None else vlan
            want_trunk = nic.trunk if trunk is None else trunk
            try:
                moved = NicSpec.model_validate({**nic.model_dump(), "vlan": want_vlan,
                                                "trunk": want_trunk})
            except ValidationError as e:
                raise InvalidRequest(f"NIC {mac}: {e.errors()[0]['msg']}") from None
            if (moved.vlan, moved.trunk) == (nic.vlan, nic.trunk):
                return await self._result(name, "done", f"NIC {mac} already on VLAN "
                                          f"{nic.vlan}" + _trunk_text(nic.trunk))
            await self.vms.networks.check_trunks([moved], "nic")
            nics = [moved if j == i else n for j, n in enumerate(spec.nics)]
            new = _with(spec, nics=nics)
            self.vms.admission.admit(new, previous=spec)
            if m is not None:
                await self.vms.networks.plug(moved)
            return await self._commit(
                name, spec, new, "done", f"NIC {mac} moved from VLAN {nic.vlan}"
                f"{_trunk_text(nic.trunk)} to VLAN {moved.vlan}{_trunk_text(moved.trunk)}")

    async def remove_nic(self, name: str, mac: str,
                         timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> Change:
        m = await self._machine_if_active(name)
        with self.vms.locks.hold(name, "remove-nic"):
            spec = self._spec(name)
            matches = [i for i, n in enumerate(spec.nics) if n.mac == mac.lower()]
            if not matches:
                raise NotFound(f"{name}: no NIC with MAC {mac}")
            i = matches[0]
            if m is None:
                new = _with(spec, nics=[n for j, n in enumerate(spec.nics) if j != i])
                return await self._commit(name, spec, new, "done", f"removed NIC {mac}")
            return await self._unplug_port_device(name, m, spec, "nic", nic_ids(spec, i)[0],
                                                  spec.nics[i].slot, f"NIC {mac}", timeout)

    # internals

    async def _unplug_port_device(self, name: str, m: Machine, spec: VMSpec,
                                  kind: Literal["disk", "nic"], dev: str, slot: int | None,
                                  what: str, timeout: float) -> Change:
        if slot is None:
            raise Conflict(f"{what} was attached at boot (not on a hotplug port): stop the "
                           "VM to remove it")
        if dev in {p.device for p in spec.pending_unplugs}:
            return await self._result(name, "pending", f"{what}: removal already pending")
        if await self._unplug(name, m, kind, dev, timeout):
            return await self._result(name, "done", f"removed {what}")
        return await self._result(name, "pending",
                                  f"{what}: the guest has not released it after {timeout:g}s; "
                                  "removal completes when it does or at the next power cycle")

    async def _unplug(self, name: str, m: Machine, kind: DeviceKind, dev: str,
                      timeout: float) -> bool:
        """Ask for `dev` to be removed and wait up to `timeout`. True: removed and the
        spec says so; False: recorded as pending in the spec."""
        if not await m.unplug(kind, dev, timeout):
            pending = PendingUnplug(kind=kind, device=dev, requested_at=time.time())
            spec = self._spec(name)
            await self._commit(name, spec, _with(
                spec, pending_unplugs=[*spec.pending_unplugs, pending]), "pending", "")
            return False
        await self._finish(name, m, self._spec(name),
                           PendingUnplug(kind=kind, device=dev, requested_at=time.time()))
        return True

    async def _finish(self, name: str, m: Machine | None, spec: VMSpec,
                      p: PendingUnplug) -> None:
        """The device is gone from the guest: free its backend, record it in the spec."""
        if m is not None:
            await m.release_backend(p.kind, p.device)
            if p.kind == "nic":
                for i, n in enumerate(spec.nics):
                    if nic_ids(spec, i)[0] == p.device:
                        await self.vms.networks.unplug(n)
        self.vms.store.update_vm(name, spec=without(spec, p).model_dump_json())
        log.info("%s: %s %s removed", name, p.kind, p.device)

    async def _reconcile(self, name: str) -> None:
        """Complete pending unplugs whose device is gone (events missed while the agent
        was down; vCPUs, which send none)."""
        spec = self._spec(name)
        if not spec.pending_unplugs:
            return
        try:
            m = await self.vms.machine(name)
            with self.vms.locks.hold(name, "unplug"):
                await self._reconcile_locked(name, m)
        except Conflict:
            return  # busy or stopped: a later request does it

    async def _reconcile_locked(self, name: str, m: Machine) -> None:
        for p in self._spec(name).pending_unplugs:
            if not await m.has_device(p.device):
                await self._finish(name, m, self._spec(name), p)

    def _on_event(self, name: str, event: str, data: dict[str, Any]) -> None:
        # Deletions an unplug in progress waits for never come here (Machine.unplug).
        if event != "DEVICE_DELETED" or "device" not in data:
            return
        # A pending unplug the guest completed late.
        row = self.vms.store.get_vm(name)
        if row and any(p.device == data["device"]
                       for p in VMSpec.model_validate_json(row.spec).pending_unplugs):
            asyncio.get_running_loop().create_task(self._reconcile(name))

    async def _machine_if_active(self, name: str) -> Machine | None:
        info = await self.vms.get(name)
        return await self.vms.machine(name) if info.state in ACTIVE_STATES else None

    def _spec(self, name: str) -> VMSpec:
        row = self.vms.store.get_vm(name)
        if row is None:
            raise NotFound(f"{name}: no such VM")
        return VMSpec.model_validate_json(row.spec)

    async def _commit(self, name: str, old: VMSpec, new: VMSpec, status: str,
                      detail: str) -> Change:
        self.vms.store.update_vm(name, spec=new.model_dump_json())
        return await self._result(name, status, detail)

    async def _result(self, name: str, status: str, detail: str) -> Change:
        info: VMInfo = await self.vms.get(name)
        return Change(status=status, detail=detail, vm=info)  # type: ignore[arg-type]


def _trunk_text(trunk: list[int]) -> str:
    return f" (trunk {','.join(map(str, trunk))})" if trunk else ""
