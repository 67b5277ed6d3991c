"""Dynamic resources of VMs: hot-add and hot-remove of vCPUs, memory (pc-dimm DIMMs),
disks and NICs over QMP, the unplug state machine, and plugging the hot-added devices
again each time QEMU starts (`replay`).

Why replay: a device that was hot-plugged differs from a cold-plugged one in the state
QEMU saves (PCIe link status, CPU and DIMM hotplug state), so a checkpoint taken after a
hot-add only loads into a QEMU where the same devices were hot-plugged the same way. The
spec therefore records which devices are hot-added (`slot` of a disk/NIC, `dimms`,
`hot_vcpus`) and every start plugs them over QMP while QEMU waits (-S).

Unplug: requested (`device_del`) -> removed on `DEVICE_DELETED` (vCPUs: polled with
`query-cpus-fast`, QEMU sends no event for them) -> or `pending` after a timeout when the
guest does not cooperate. A pending unplug stays in the spec (`pending_unplugs`, shown
by `show`) and completes when the event arrives later, when the next request finds the
device gone, or at the VM's next power cycle (`settle_pending`).

Every change is written to the spec right after QEMU accepted it; a change QEMU refuses
is undone in QEMU and leaves the spec as it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from hvagent.drivers import machine
from hvagent.drivers import net as bridge
from hvagent.drivers.qmp import Monitor
from hvagent.errors import Conflict, InvalidRequest, NotFound
from hvagent.services.files import normalize
from hvagent.services.files import resolve as resolve_file
from hvagent.services.limits import check_host_limits
from hvagent.spec import DimmSpec, DiskFormat, DiskSpec, NicSpec, PendingUnplug, VMSpec

if TYPE_CHECKING:
    from hvagent.services.vms import VMInfo, VMService

log = logging.getLogger(__name__)

DIMM_STEP_MIB = 128  # Linux onlines hot-added memory in 128 MiB blocks
DEFAULT_UNPLUG_TIMEOUT = 10.0
_ACTIVE = ("running", "paused", "unresponsive")  # QEMU runs (VMService.ACTIVE)
_EXT = {DiskFormat.QCOW2: "qcow2", DiskFormat.RAW: "raw", DiskFormat.VPC: "vhd",
        DiskFormat.VHDX: "vhdx"}


# QEMU ids of devices, derived from the spec so that every start uses the same ones


def disk_node(spec: VMSpec, i: int) -> str:
    """Block node name (and device id) of disk `i`; cold disks are machine.py's `disk{i}`."""
    slot = spec.disks[i].slot
    return f"hpdisk{slot}" if slot is not None else f"disk{i}"


def nic_ids(spec: VMSpec, i: int) -> tuple[str, str]:
    """(device id, netdev id) of NIC `i`."""
    slot = spec.nics[i].slot
    return (f"hpnic{slot}", f"hpnet{slot}") if slot is not None else (f"nic{i}", f"net{i}")


def dimm_ids(d: DimmSpec) -> tuple[str, str]:
    """(device id, memory backend id) of a DIMM."""
    return f"dimm{d.slot}", f"mem-dimm{d.slot}"


def _port(slot: int) -> str:
    return f"hp{slot}"  # machine.py's pcie-root-port ids


def free_port(spec: VMSpec) -> int | None:
    used = {d.slot for d in spec.disks} | {n.slot for n in spec.nics}
    return next((p for p in range(spec.hotplug_ports) if p not in used), None)


def free_memory_slot(spec: VMSpec) -> int | None:
    used = {d.slot for d in spec.dimms}
    return next((s for s in range(spec.memory_slots or 0) if s not in used), None)


# plugging


async def _cpu_slots(mon: Monitor) -> list[dict[str, Any]]:
    """All vCPU positions in a stable order (socket, core, thread)."""
    slots = await mon.execute("query-hotpluggable-cpus")
    return sorted(slots, key=lambda s: tuple(s["props"].get(k, 0) for k in
                                             ("socket-id", "die-id", "core-id", "thread-id")))


async def _add_cpu(mon: Monitor) -> str:
    slots = await _cpu_slots(mon)
    for i, s in enumerate(slots):
        if "qom-path" not in s:
            dev_id = f"cpu{i}"
            await mon.execute("device_add", {"driver": s["type"], "id": dev_id, **s["props"]})
            return dev_id
    raise Conflict("max_vcpus: every vCPU position is in use")


async def _hot_cpu_ids(mon: Monitor) -> list[str]:
    """Ids of the hot-added vCPUs present, in plug order."""
    out = []
    for s in await _cpu_slots(mon):
        path = s.get("qom-path", "")
        if path.startswith("/machine/peripheral/"):
            out.append(path.rsplit("/", 1)[1])
    return out


async def _add_dimm(mon: Monitor, d: DimmSpec) -> None:
    dev, mem = dimm_ids(d)
    await mon.execute("object-add", {"qom-type": "memory-backend-ram", "id": mem,
                                     "size": d.size_mib << 20})
    try:
        await mon.execute("device_add", {"driver": "pc-dimm", "id": dev, "memdev": mem,
                                         "slot": d.slot})
    except BaseException:
        await _quietly(mon, "object-del", {"id": mem})
        raise


async def _add_disk(mon: Monitor, spec: VMSpec, i: int) -> None:
    d = spec.disks[i]
    assert d.path is not None and d.format is not None and d.slot is not None
    node = disk_node(spec, i)
    # One definition of a disk's block node: machine.py's (JSON, as on the command line).
    await mon.execute("blockdev-add", json.loads(machine._blockdev(node, d.path, d.format)))
    try:
        await mon.execute("device_add", {"driver": "virtio-blk-pci", "drive": node, "id": node,
                                         "bus": _port(d.slot)})
    except BaseException:
        await _quietly(mon, "blockdev-del", {"node-name": node})
        raise


async def _add_nic(mon: Monitor, spec: VMSpec, i: int) -> None:
    n = spec.nics[i]
    assert n.slot is not None
    dev, netdev = nic_ids(spec, i)
    if n.network == "bridge":  # the tap is already on its VLAN's bridge
        await mon.execute("netdev_add", {"type": "tap", "id": netdev,
                                         "ifname": bridge.tap_name(n.mac),
                                         "script": "no", "downscript": "no"})
    else:
        await mon.execute("netdev_add", {"type": n.network, "id": netdev})
    try:
        await mon.execute("device_add", {"driver": n.model, "id": dev, "netdev": netdev,
                                         "mac": n.mac, "bus": _port(n.slot), "romfile": ""})
    except BaseException:
        await _quietly(mon, "netdev_del", {"id": netdev})
        raise


async def _quietly(mon: Monitor, cmd: str, args: dict[str, Any]) -> None:
    try:
        await mon.execute(cmd, args)
    except Exception as e:  # best-effort cleanup: report, never mask the first error
        log.warning("%s: %s", cmd, e)


async def replay(mon: Monitor, spec: VMSpec) -> None:
    """Plug the hot-added devices of `spec` into a QEMU started with -S (same order as
    they were added, so that their saved state matches)."""
    for _ in range(spec.hot_vcpus):
        await _add_cpu(mon)
    for d in spec.dimms:
        await _add_dimm(mon, d)
    for i, disk in enumerate(spec.disks):
        if disk.slot is not None:
            await _add_disk(mon, spec, i)
    for i, nic in enumerate(spec.nics):
        if nic.slot is not None:
            await _add_nic(mon, spec, i)


# unplug bookkeeping (pure spec edits)


def _without(spec: VMSpec, p: PendingUnplug) -> VMSpec:
    """`spec` after the removal `p` completed."""
    upd: dict[str, Any] = {"pending_unplugs": [x for x in spec.pending_unplugs
                                               if x.device != p.device]}
    if p.kind == "vcpu":
        upd |= {"vcpus": spec.vcpus - 1, "hot_vcpus": spec.hot_vcpus - 1}
    elif p.kind == "memory":
        gone = [d for d in spec.dimms if dimm_ids(d)[0] == p.device]
        upd |= {"dimms": [d for d in spec.dimms if d not in gone],
                "memory_mib": spec.memory_mib - sum(d.size_mib for d in gone)}
    elif p.kind == "disk":
        upd["disks"] = [d for i, d in enumerate(spec.disks) if disk_node(spec, i) != p.device]
    else:
        upd["nics"] = [n for i, n in enumerate(spec.nics) if nic_ids(spec, i)[0] != p.device]
    return VMSpec.model_validate({**spec.model_dump(), **_dump(upd)})


def _dump(upd: dict[str, Any]) -> dict[str, Any]:
    return {k: [x.model_dump() if isinstance(x, BaseModel) else x for x in v]
            if isinstance(v, list) else v for k, v in upd.items()}


def _with(spec: VMSpec, **upd: Any) -> VMSpec:
    """A validated copy of `spec` with fields replaced; a change the spec's own rules
    refuse is the caller's mistake, named like any other invalid request."""
    try:
        return VMSpec.model_validate({**spec.model_dump(), **_dump(upd)})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or ", ".join(upd)
        raise InvalidRequest(f"{spec.name}: {where}: {first['msg']}") from None


def settle_pending(spec: VMSpec) -> VMSpec:
    """The spec for a fresh start: unplugs still pending are complete (the devices are
    simply not plugged again)."""
    for p in list(spec.pending_unplugs):
        spec = _without(spec, p)
    return spec


# the service


class Change(BaseModel):
    """The outcome of a resource change."""

    status: Literal["done", "pending"]
    detail: str
    vm: Any  # VMInfo after the change


class DeviceService:
    def __init__(self, vms: VMService) -> None:
        self.vms = vms
        self._deleted: dict[tuple[str, str], asyncio.Future[None]] = {}
        vms.event_listeners.append(self._on_event)

    # queries

    async def devices(self, name: str) -> dict[str, Any]:
        info = await self.vms.get(name)
        if info.state in _ACTIVE:
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
        mon = await self._monitor_if_active(name)
        with self.vms.locks.hold(name, "set-memory"):
            spec = self._spec(name)
            assert spec.max_memory_mib is not None
            if memory_mib > spec.max_memory_mib:
                raise Conflict(f"max_memory_mib: {memory_mib} MiB is above the VM's maximum "
                               f"of {spec.max_memory_mib} MiB")
            check_host_limits(spec.model_copy(update={"memory_mib": memory_mib}),
                              self.vms.files(name).qmp)
            if mon is None:  # stopped: the boot memory changes
                if memory_mib - (spec.memory_mib - spec.boot_memory_mib) < 16:
                    raise InvalidRequest(f"memory_mib: {memory_mib} MiB leaves less than "
                                         "16 MiB of boot memory beside the DIMMs")
                new = _with(spec, memory_mib=memory_mib)
                self.vms.admission.admit(new, previous=spec)
                return await self._commit(name, spec, new, "done",
                                          f"memory set to {memory_mib} MiB")
            await self._reconcile_locked(name, mon)
            spec = self._spec(name)
            delta = memory_mib - spec.memory_mib
            if delta == 0:
                return await self._result(name, "done", "memory unchanged")
            if delta > 0:
                return await self._add_memory(name, mon, spec, delta)
            return await self._remove_memory(name, mon, spec, -delta, timeout)

    async def _add_memory(self, name: str, mon: Monitor, spec: VMSpec, delta: int) -> Change:
        if delta % DIMM_STEP_MIB:
            raise InvalidRequest(f"memory_mib: a running VM grows in steps of "
                                 f"{DIMM_STEP_MIB} MiB (asked for +{delta} MiB)")
        slot = free_memory_slot(spec)
        if slot is None:
            raise Conflict(f"memory_slots: all {spec.memory_slots} memory slots are in use")
        dimm = DimmSpec(slot=slot, size_mib=delta)
        new = _with(spec, memory_mib=spec.memory_mib + delta, dimms=[*spec.dimms, dimm])
        self.vms.admission.admit(new, previous=spec)
        await _add_dimm(mon, dimm)
        return await self._commit(name, spec, new, "done",
                                  f"added a {delta} MiB DIMM in slot {slot}")

    async def _remove_memory(self, name: str, mon: Monitor, spec: VMSpec, delta: int,
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
            done = await self._unplug(name, mon, "memory", dimm_ids(d)[0], timeout)
            if not done:
                pending.append(dimm_ids(d)[0])
        if pending:
            return await self._result(name, "pending",
                                      f"the guest has not released {', '.join(pending)} yet")
        return await self._result(name, "done", f"memory set to {spec.memory_mib - delta} MiB")

    async def set_vcpus(self, name: str, vcpus: int,
                        timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> Change:
        mon = await self._monitor_if_active(name)
        with self.vms.locks.hold(name, "set-vcpus"):
            spec = self._spec(name)
            assert spec.max_vcpus is not None
            if vcpus > spec.max_vcpus:
                raise Conflict(f"max_vcpus: {vcpus} vCPUs is above the VM's maximum of "
                               f"{spec.max_vcpus}")
            check_host_limits(spec.model_copy(update={"vcpus": vcpus}),
                              self.vms.files(name).qmp)
            if mon is None:
                new = _with(spec, vcpus=vcpus, hot_vcpus=min(spec.hot_vcpus, vcpus - 1))
                self.vms.admission.admit(new, previous=spec)
                return await self._commit(name, spec, new, "done", f"vcpus set to {vcpus}")
            await self._reconcile_locked(name, mon)
            spec = self._spec(name)
            if vcpus > spec.vcpus:
                new = _with(spec, vcpus=vcpus, hot_vcpus=spec.hot_vcpus + vcpus - spec.vcpus)
                self.vms.admission.admit(new, previous=spec)
                added = []
                try:
                    for _ in range(vcpus - spec.vcpus):
                        added.append(await _add_cpu(mon))
                except BaseException:
                    for dev in added:  # all or nothing
                        await _quietly(mon, "device_del", {"id": dev})
                    raise
                return await self._commit(name, spec, new, "done",
                                          f"added vCPUs {', '.join(added)}")
            if vcpus == spec.vcpus:
                return await self._result(name, "done", "vcpus unchanged")
            hot = [c for c in await _hot_cpu_ids(mon)
                   if c not in {p.device for p in spec.pending_unplugs}]
            count = spec.vcpus - vcpus
            if count > len(hot):
                raise Conflict(f"hot_vcpus: only hot-added vCPUs can be removed from a "
                               f"running VM ({len(hot)} removable, asked for {count})")
            pending = []
            for dev in reversed(hot[-count:]):
                if not await self._unplug(name, mon, "vcpu", dev, timeout):
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
        mon = await self._monitor_if_active(name)
        with self.vms.locks.hold(name, "attach-disk"):
            spec = self._spec(name)
            slot = free_port(spec)
            if slot is None and mon is not None:
                raise Conflict(f"hotplug_ports: all {spec.hotplug_ports} hotplug ports are "
                               "in use")
            created: list[Path] = []
            try:
                resolved = await self._resolve_disk(spec, disk, created)
                new = _with(spec, disks=[*spec.disks, resolved.model_copy(update={"slot": slot})])
                self.vms.admission.admit(new, previous=spec)
                if mon is not None:
                    await _add_disk(mon, new, len(new.disks) - 1)
                return await self._commit(name, spec, new, "done",
                                          f"attached {resolved.path}")
            except BaseException:
                for p in created:
                    p.unlink(missing_ok=True)
                raise

    async def detach_disk(self, name: str, path: str,
                          timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> Change:
        mon = await self._monitor_if_active(name)
        with self.vms.locks.hold(name, "detach-disk"):
            spec = self._spec(name)
            # Only matched against this VM's own disks: nothing to confine or own.
            want = str(normalize(self.vms.storage_dir, path))
            matches = [i for i, d in enumerate(spec.disks) if d.path == want]
            if not matches:
                raise NotFound(f"{name}: no disk {path}")
            i = matches[0]
            if mon is None:
                new = _with(spec, disks=[d for j, d in enumerate(spec.disks) if j != i])
                return await self._commit(name, spec, new, "done", f"detached {want}")
            return await self._unplug_port_device(name, mon, spec, "disk",
                                                  disk_node(spec, i), spec.disks[i].slot,
                                                  f"disk {want}", timeout)

    async def add_nic(self, name: str, nic: NicSpec) -> Change:
        mon = await self._monitor_if_active(name)
        with self.vms.locks.hold(name, "add-nic"):
            spec = self._spec(name)
            slot = free_port(spec)
            if slot is None and mon is not None:
                raise Conflict(f"hotplug_ports: all {spec.hotplug_ports} hotplug ports are "
                               "in use")
            new = _with(spec, nics=[*spec.nics, nic.model_copy(update={"slot": slot})])
            self.vms.admission.admit(new, previous=spec)
            if mon is not None:
                added = new.nics[-1]
                if added.vlan is not None:
                    await bridge.plug(bridge.tap_name(added.mac), added.vlan)
                try:
                    await _add_nic(mon, new, len(new.nics) - 1)
                except BaseException:
                    if added.vlan is not None:
                        await bridge.unplug(bridge.tap_name(added.mac))
                    raise
            return await self._commit(name, spec, new, "done", f"added NIC {nic.mac}")

    async def set_nic_vlan(self, name: str, mac: str, vlan: int) -> Change:
        """Move a bridge NIC to VLAN `vlan`; on a running VM its tap moves to that VLAN's
        bridge live (the guest keeps its NIC and sees the new segment at once)."""
        if not 1 <= vlan <= 4094:
            raise InvalidRequest(f"vlan: {vlan} is not in 1..4094")
        mon = await self._monitor_if_active(name)
        with self.vms.locks.hold(name, "set-nic-vlan"):
            spec = self._spec(name)
            matches = [i for i, n in enumerate(spec.nics) if n.mac == mac.lower()]
            if not matches:
                raise NotFound(f"{name}: no NIC with MAC {mac}")
            i = matches[0]
            nic = spec.nics[i]
            if nic.network != "bridge":
                raise Conflict(f"{name}: NIC {mac} uses {nic.network} networking, which has "
                               "no VLAN (remove it and add a bridge NIC)")
            if nic.vlan == vlan:
                return await self._result(name, "done", f"NIC {mac} already on VLAN {vlan}")
            nics = [n.model_copy(update={"vlan": vlan}) if j == i else n
                    for j, n in enumerate(spec.nics)]
            new = _with(spec, nics=nics)
            self.vms.admission.admit(new, previous=spec)
            if mon is not None:
                await bridge.plug(bridge.tap_name(nic.mac), vlan)
            return await self._commit(name, spec, new, "done",
                                      f"NIC {mac} moved from VLAN {nic.vlan} to VLAN {vlan}")

    async def remove_nic(self, name: str, mac: str,
                         timeout: float = DEFAULT_UNPLUG_TIMEOUT) -> Change:
        mon = await self._monitor_if_active(name)
        with self.vms.locks.hold(name, "remove-nic"):
            spec = self._spec(name)
            matches = [i for i, n in enumerate(spec.nics) if n.mac == mac.lower()]
            if not matches:
                raise NotFound(f"{name}: no NIC with MAC {mac}")
            i = matches[0]
            if mon is None:
                new = _with(spec, nics=[n for j, n in enumerate(spec.nics) if j != i])
                return await self._commit(name, spec, new, "done", f"removed NIC {mac}")
            return await self._unplug_port_device(name, mon, spec, "nic", nic_ids(spec, i)[0],
                                                  spec.nics[i].slot, f"NIC {mac}", timeout)

    # internals

    async def _unplug_port_device(self, name: str, mon: Monitor, spec: VMSpec,
                                  kind: Literal["disk", "nic"], dev: str, slot: int | None,
                                  what: str, timeout: float) -> Change:
        if slot is None:
            raise Conflict(f"{what} was attached at boot (not on a hotplug port): stop the "
                           "VM to remove it")
        if dev in {p.device for p in spec.pending_unplugs}:
            return await self._result(name, "pending", f"{what}: removal already pending")
        if await self._unplug(name, mon, kind, dev, timeout):
            return await self._result(name, "done", f"removed {what}")
        return await self._result(name, "pending",
                                  f"{what}: the guest has not released it after {timeout:g}s; "
                                  "removal completes when it does or at the next power cycle")

    async def _unplug(self, name: str, mon: Monitor,
                      kind: Literal["vcpu", "memory", "disk", "nic"], dev: str,
                      timeout: float) -> bool:
        """Ask QEMU to remove `dev` and wait up to `timeout`. True: removed and the spec
        says so; False: recorded as pending in the spec."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._deleted[(name, dev)] = fut
        try:
            await mon.execute("device_del", {"id": dev})
            deadline = loop.time() + timeout
            while True:
                if kind == "vcpu":
                    # No DEVICE_DELETED for a vCPU itself in QEMU 7.2: poll.
                    if not await self._present(mon, dev):
                        break
                    wait = 0.1
                else:
                    wait = 0.5  # the event; a poll now and then in case it was missed
                    if fut.done() or not await self._present(mon, dev):
                        break
                left = deadline - loop.time()
                if left <= 0:
                    pending = PendingUnplug(kind=kind, device=dev, requested_at=time.time())
                    spec = self._spec(name)
                    await self._commit(name, spec, _with(
                        spec, pending_unplugs=[*spec.pending_unplugs, pending]), "pending", "")
                    return False
                try:
                    await asyncio.wait_for(asyncio.shield(fut), min(wait, left))
                except TimeoutError:
                    pass
        finally:
            self._deleted.pop((name, dev), None)
        spec = self._spec(name)
        await self._finish(name, mon, spec, PendingUnplug(kind=kind, device=dev,
                                                          requested_at=time.time()))
        return True

    async def _finish(self, name: str, mon: Monitor | None, spec: VMSpec,
                      p: PendingUnplug) -> None:
        """The device is gone from the guest: free its backend, record it in the spec."""
        if mon is not None:
            if p.kind == "disk":
                await _quietly(mon, "blockdev-del", {"node-name": p.device})
            elif p.kind == "nic":
                await _quietly(mon, "netdev_del", {"id": p.device.replace("hpnic", "hpnet")})
                for i, n in enumerate(spec.nics):
                    if nic_ids(spec, i)[0] == p.device and n.vlan is not None:
                        await bridge.unplug(bridge.tap_name(n.mac))
            elif p.kind == "memory":
                await _quietly(mon, "object-del", {"id": "mem-" + p.device})
        self.vms.store.update_vm(name, spec=_without(spec, p).model_dump_json())
        log.info("%s: %s %s removed", name, p.kind, p.device)

    @staticmethod
    async def _present(mon: Monitor, dev: str) -> bool:
        children = await mon.execute("qom-list", {"path": "/machine/peripheral"})
        return any(c["name"] == dev for c in children)

    async def _reconcile(self, name: str) -> None:
        """Complete pending unplugs whose device is gone (events missed while the agent
        was down; vCPUs, which send none)."""
        spec = self._spec(name)
        if not spec.pending_unplugs:
            return
        try:
            mon = await self.vms.monitor(name)
            with self.vms.locks.hold(name, "unplug"):
                await self._reconcile_locked(name, mon)
        except Conflict:
            return  # busy or stopped: a later request does it

    async def _reconcile_locked(self, name: str, mon: Monitor) -> None:
        for p in self._spec(name).pending_unplugs:
            if not await self._present(mon, p.device):
                await self._finish(name, mon, self._spec(name), p)

    def _on_event(self, name: str, event: str, data: dict[str, Any]) -> None:
        if event != "DEVICE_DELETED" or "device" not in data:
            return
        fut = self._deleted.get((name, str(data["device"])))
        if fut is not None and not fut.done():
            fut.set_result(None)
        elif fut is None:
            # A pending unplug the guest completed late.
            row = self.vms.store.get_vm(name)
            if row and any(p.device == data["device"]
                           for p in VMSpec.model_validate_json(row.spec).pending_unplugs):
                asyncio.get_running_loop().create_task(self._reconcile(name))

    async def _monitor_if_active(self, name: str) -> Monitor | None:
        info = await self.vms.get(name)
        return await self.vms.monitor(name) if info.state in _ACTIVE else None

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

    async def _resolve_disk(self, spec: VMSpec, disk: DiskSpec, created: list[Path]) -> DiskSpec:
        """An existing image the caller may use (hvagent.services.files), or a new one created
        in the storage directory."""
        where = "disk"
        svc = self.vms
        if disk.path is not None:
            path = resolve_file(svc, disk.path, f"{where}.path", "disk", spec.name)
            found = await svc.disk_format(path, f"{where}.path")
            if disk.format is not None and found != disk.format:
                raise InvalidRequest(f"{where}.format: {disk.path} is {found}, not {disk.format}")
            return DiskSpec(path=str(path), format=found)
        assert disk.size is not None
        fmt = disk.format or DiskFormat.QCOW2
        svc.storage_dir.mkdir(parents=True, exist_ok=True)
        n = len(spec.disks)
        while (path := svc.storage_dir / f"{spec.name}-disk{n}.{_EXT[fmt]}").exists():
            n += 1
        created.append(path)
        await svc.create_disk(path, fmt, disk.size, where)
        return DiskSpec(path=str(path), format=fmt, size=disk.size, created=True)
