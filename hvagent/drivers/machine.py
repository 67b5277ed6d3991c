"""The QEMU driver: one `Machine` per running VM (its QEMU process, pidfile and QMP
monitor), the `Machines` registry of the running ones, and the per-VM files (QMP socket,
pidfile, serial log, UEFI vars). Every QMP command the agent sends is a typed method
here; services say what they want (`await machine.hot_add_memory(dimm)`) and never name
a QMP command. The command line and the QEMU ids of devices are hvagent.drivers.cmdline;
disk image files themselves (format, creation) belong to hvagent.disk.image.

QEMU runs with -daemonize: the launching process returns once QEMU is set up (so start
errors come back synchronously) and the VM belongs to no agent process, so it survives
an agent restart. -no-shutdown keeps QEMU alive after the guest powers off, so the agent
tells a clean guest power-off (status "shutdown") from a crash (process gone, or status
"guest-panicked" through the pvpanic device) even when it happened while the agent was
down.

Why `replay`: a device that was hot-plugged differs from a cold-plugged one in the state
QEMU saves (PCIe link status, CPU and DIMM hotplug state), so a checkpoint taken after a
hot-add only loads into a QEMU where the same devices were hot-plugged the same way. The
spec records which devices are hot-added (`slot` of a disk/NIC, `dimms`, `hot_vcpus`)
and every start plugs them over QMP while QEMU waits (-S).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hvagent.drivers.cmdline import (
    VMFiles,
    blockdev,
    boot_indexes,
    bootable_devices,
    build_command,
    dimm_ids,
    disk_node,
    hotplug_port,
    media_ids,
    memory_backend_of,
    netdev_of,
    nic_ids,
    ovmf_vars_template,
    settle_pending,
    tap_netdev,
    without,
)
from hvagent.drivers.qmp import (
    LAUNCH_QMP_TIMEOUT,
    QMP_TIMEOUT,
    Monitor,
    MonitorGone,
    MonitorUnresponsive,
)
from hvagent.errors import Conflict, OperationFailed
from hvagent.host import run
from hvagent.spec import BootDevice, DimmSpec, Firmware, MediaSlot, MediaSpec, VMSpec

__all__ = [
    "LAUNCH_QMP_TIMEOUT", "QMP_TIMEOUT", "BlockStats", "Machine", "Machines", "MonitorGone",
    "MonitorUnresponsive", "VMFiles", "build_command", "is_alive", "kill", "launch",
    "prepare_files", "process_cpu_seconds", "read_pid", "remove_files", "reset_efivars",
    "settle_pending",
    "tail", "without",
]

log = logging.getLogger(__name__)

DeviceKind = Literal["vcpu", "memory", "disk", "nic"]
EventCallback = Callable[[str, str, dict[str, Any]], None]  # (vm, event, data)
Progress = Callable[[float], None]

# A daemonizing QEMU returns once it is set up; a loaded TCG host can take a while.
LAUNCH_TIMEOUT = 120.0
# How often a long QEMU job (snapshot, stream, migration) is asked about in case its
# status event was missed; the event itself ends the wait at once.
JOB_POLL = 0.25
# How often an unplug checks the device is still there besides waiting for the event
# (vCPUs send no DEVICE_DELETED in QEMU 7.2: polled more often).
UNPLUG_POLL = 0.5
VCPU_UNPLUG_POLL = 0.1
# Migration sends no status event unless asked to: its status is polled this often.
MIGRATION_POLL = 0.02


# the process and the per-VM files


def prepare_files(spec: VMSpec, files: VMFiles) -> None:
    """Per-VM persistent files made at create time (UEFI variable store)."""
    files.state_dir.mkdir(parents=True, exist_ok=True)
    if spec.firmware is Firmware.UEFI and not files.efivars.exists():
        reset_efivars(spec, files)


def reset_efivars(spec: VMSpec, files: VMFiles) -> None:
    """A fresh UEFI variable store for `spec` (with the Secure Boot keys when it boots
    securely); the VM's own boot entries are lost."""
    files.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = files.efivars.with_suffix(".tmp")
    shutil.copyfile(ovmf_vars_template(spec), tmp)
    os.replace(tmp, files.efivars)


def remove_files(files: VMFiles) -> None:
    for p in (files.qmp, files.pidfile, files.serial_log):
        p.unlink(missing_ok=True)
    shutil.rmtree(files.state_dir, ignore_errors=True)


async def launch(cmd: list[str], files: VMFiles) -> int:
    """Start QEMU daemonized; returns its pid. QEMU's own error when it refuses."""
    files.qmp.unlink(missing_ok=True)
    files.pidfile.unlink(missing_ok=True)
    proc = await run.aspawn(cmd, stderr=run.PIPE, what="QEMU", start_new_session=True)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), LAUNCH_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise OperationFailed(f"QEMU did not start within {LAUNCH_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        raise OperationFailed(f"QEMU refused to start: {lines[-1] if lines else proc.returncode}")
    pid = read_pid(files)
    if pid is None:
        raise OperationFailed("QEMU started but wrote no pidfile")
    return pid


def read_pid(files: VMFiles) -> int | None:
    try:
        return int(files.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def is_alive(pid: int | None, files: VMFiles) -> bool:
    """True when `pid` is this VM's QEMU (not a recycled pid of another process)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return files.qmp_arg.encode() in cmdline


def process_cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) the process `pid` has used, from /proc/<pid>/stat; None
    when there is no such process."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command (which may hold spaces): utime is the 14th
    # field of the line, stime the 15th, in clock ticks.
    fields = stat.rsplit(")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int) -> str:
    try:
        with path.open("r", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class BlockStats:
    """I/O counters of one block device since QEMU started (QMP query-blockstats)."""

    read_bytes: int
    write_bytes: int
    read_requests: int
    write_requests: int


# one running VM


class Machine:
    """A running QEMU and its QMP monitor: every QMP command, by intention."""

    def __init__(self, name: str, files: VMFiles, on_event: EventCallback,
                 on_lost: Callable[[str], None]) -> None:
        self.name = name
        self.files = files
        self._on_event = on_event
        self._monitor = Monitor(name, on_event=self._event, on_lost=lambda: on_lost(name))
        # Unplugs and jobs in progress wait for their event here.
        self._deleted: dict[str, asyncio.Event] = {}
        self._jobs: dict[str, asyncio.Event] = {}

    @property
    def connected(self) -> bool:
        return self._monitor.connected

    async def connect(self, timeout: float = QMP_TIMEOUT) -> None:
        await self._monitor.connect(self.files.qmp, timeout)

    async def close(self) -> None:
        await self._monitor.close()

    def _event(self, event: str, data: dict[str, Any]) -> None:
        if event == "DEVICE_DELETED" and "device" in data:
            waiter = self._deleted.get(str(data["device"]))
            if waiter is not None:
                waiter.set()
                return  # an unplug in progress takes it
        elif event == "JOB_STATUS_CHANGE" and str(data.get("id")) in self._jobs:
            self._jobs[str(data["id"])].set()
        self._on_event(self.name, event, data)

    async def _quietly(self, cmd: str, args: dict[str, Any]) -> None:
        try:
            await self._monitor.command(cmd, args)
        except Exception as e:  # best-effort cleanup: report, never mask the first error
            log.warning("%s: %s: %s", self.name, cmd, e)

    # run state

    async def status(self) -> str:
        """QEMU's run state: running, paused, shutdown, internal-error, guest-panicked..."""
        return await self._monitor.status()

    async def cont(self) -> None:
        """Let the guest run (after -S, a pause, a checkpoint or a load)."""
        await self._monitor.command("cont")

    async def pause(self) -> None:
        await self._monitor.command("stop")

    async def reset(self) -> None:
        await self._monitor.command("system_reset")

    async def power_button(self) -> None:
        """Press the ACPI power button (the guest decides whether to power off)."""
        await self._monitor.command("system_powerdown")

    async def quit(self) -> None:
        """Ask QEMU to exit at once (no guest shutdown)."""
        await self._monitor.command("quit")

    async def inject_nmi(self) -> None:
        await self._monitor.command("inject-nmi")

    # boot order and removable media

    async def set_boot_order(self, spec: VMSpec, order: list[BootDevice]) -> None:
        """Renumber the bootindex of the devices fixed at boot for `order`. QEMU writes
        the firmware's boot order (fw_cfg `bootorder`) at every reset, so the change
        applies from the next reset on, never to the boot in progress."""
        index = boot_indexes(spec, order)
        devices = bootable_devices(spec)
        # Two devices may not hold the same index, even for a moment: clear all first.
        for dev in devices:
            await self._monitor.command("qom-set", {
                "path": f"/machine/peripheral/{dev}", "property": "bootindex", "value": -1})
        for dev, i in index.items():
            await self._monitor.command("qom-set", {
                "path": f"/machine/peripheral/{dev}", "property": "bootindex", "value": i})

    async def change_medium(self, slot: MediaSlot, media: MediaSpec) -> None:
        """Put `media`'s image into the running VM's drive (the tray closes again)."""
        assert media.image is not None
        dev, _ = media_ids(slot)
        await self._monitor.command("blockdev-change-medium", {
            "id": dev, "filename": media.image, "format": "raw",
            "read-only-mode": "read-only" if media.write_protected else "read-write"})

    async def eject_medium(self, slot: MediaSlot) -> None:
        """Take the medium out of the running VM's drive, whatever the guest locked."""
        dev, _ = media_ids(slot)
        await self._monitor.command("eject", {"id": dev, "force": True})

    # vCPUs

    async def _cpu_slots(self) -> list[dict[str, Any]]:
        """All vCPU positions in a stable order (socket, core, thread)."""
        slots = await self._monitor.command("query-hotpluggable-cpus")
        return sorted(slots, key=lambda s: tuple(s["props"].get(k, 0) for k in
                                                 ("socket-id", "die-id", "core-id",
                                                  "thread-id")))

    async def hot_add_vcpu(self) -> str:
        """Plug a vCPU into the first free position; returns its device id."""
        for i, s in enumerate(await self._cpu_slots()):
            if "qom-path" not in s:
                dev_id = f"cpu{i}"
                await self._monitor.command("device_add",
                                            {"driver": s["type"], "id": dev_id, **s["props"]})
                return dev_id
        raise Conflict("max_vcpus: every vCPU position is in use")

    async def hot_vcpus(self) -> list[str]:
        """Ids of the hot-added vCPUs present, in plug order."""
        out = []
        for s in await self._cpu_slots():
            path = s.get("qom-path", "")
            if path.startswith("/machine/peripheral/"):
                out.append(path.rsplit("/", 1)[1])
        return out

    # hot-add (each undone in QEMU when its second half is refused)

    async def hot_add_memory(self, dimm: DimmSpec) -> None:
        """A RAM backend and the pc-dimm in the DIMM's memory slot."""
        dev, mem = dimm_ids(dimm)
        await self._monitor.command("object-add", {"qom-type": "memory-backend-ram", "id": mem,
                                                   "size": dimm.size_mib << 20})
        try:
            await self._monitor.command("device_add", {"driver": "pc-dimm", "id": dev,
                                                       "memdev": mem, "slot": dimm.slot})
        except BaseException:
            await self._quietly("object-del", {"id": mem})
            raise

    async def hot_add_disk(self, spec: VMSpec, i: int) -> None:
        """Disk `i` of `spec` (on a hotplug port) as a virtio disk."""
        d = spec.disks[i]
        assert d.path is not None and d.format is not None and d.slot is not None
        node = disk_node(spec, i)
        await self._monitor.command("blockdev-add", blockdev(node, d))
        try:
            await self._monitor.command("device_add", {
                "driver": "virtio-blk-pci", "drive": node, "id": node,
                "bus": hotplug_port(d.slot)})
        except BaseException:
            await self._quietly("blockdev-del", {"node-name": node})
            raise

    async def hot_add_nic(self, spec: VMSpec, i: int) -> None:
        """NIC `i` of `spec` (on a hotplug port); a bridge NIC's tap must exist."""
        n = spec.nics[i]
        assert n.slot is not None
        dev, netdev = nic_ids(spec, i)
        if n.tapped:
            await self._monitor.command("netdev_add", tap_netdev(netdev, n.mac))
        else:
            await self._monitor.command("netdev_add", {"type": "user", "id": netdev})
        try:
            await self._monitor.command("device_add", {
                "driver": n.model, "id": dev, "netdev": netdev, "mac": n.mac,
                "bus": hotplug_port(n.slot), "romfile": ""})
        except BaseException:
            await self._quietly("netdev_del", {"id": netdev})
            raise

    async def replay(self, spec: VMSpec) -> None:
        """Plug the hot-added devices of `spec` into a QEMU started with -S (in the order
        they were added, so that their saved state matches)."""
        for _ in range(spec.hot_vcpus):
            await self.hot_add_vcpu()
        for d in spec.dimms:
            await self.hot_add_memory(d)
        for i, disk in enumerate(spec.disks):
            if disk.slot is not None:
                await self.hot_add_disk(spec, i)
        for i, nic in enumerate(spec.nics):
            if nic.slot is not None:
                await self.hot_add_nic(spec, i)

    # hot-remove

    async def has_device(self, dev: str) -> bool:
        children = await self._monitor.command("qom-list", {"path": "/machine/peripheral"})
        return any(c["name"] == dev for c in children)

    async def unplug(self, kind: DeviceKind, dev: str, timeout: float) -> bool:
        """Ask the guest to release `dev` and wait up to `timeout` seconds for
        DEVICE_DELETED (vCPUs: polled). True when it is gone, False when the guest has
        not released it yet. The backend stays: `release_backend` once it is gone."""
        loop = asyncio.get_running_loop()
        deleted = self._deleted[dev] = asyncio.Event()
        try:
            await self._monitor.command("device_del", {"id": dev})
            deadline = loop.time() + timeout
            wait = VCPU_UNPLUG_POLL if kind == "vcpu" else UNPLUG_POLL
            while not deleted.is_set():
                # A poll now and then in case the event was missed.
                if not await self.has_device(dev):
                    return True
                left = deadline - loop.time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(deleted.wait(), min(wait, left))
            return True
        finally:
            self._deleted.pop(dev, None)

    async def remove_devices(self, devs: list[str]) -> None:
        """Best-effort removal (undoing a partial hot-add); never raises."""
        for dev in devs:
            await self._quietly("device_del", {"id": dev})

    async def release_backend(self, kind: DeviceKind, dev: str) -> None:
        """Free what backed the removed device `dev` (block node, netdev, memory);
        best-effort."""
        if kind == "disk":
            await self._quietly("blockdev-del", {"node-name": dev})
        elif kind == "nic":
            await self._quietly("netdev_del", {"id": netdev_of(dev)})
        elif kind == "memory":
            await self._quietly("object-del", {"id": memory_backend_of(dev)})

    # block devices

    async def disk_roots(self) -> dict[str, dict[str, Any]]:
        """Device id -> the top block node QEMU has for it (changes with overlays): its
        `node-name`, `file`, and `image` (format, backing chain)."""
        out = {}
        for b in await self._monitor.command("query-block"):
            qdev = str(b.get("qdev", ""))
            if qdev.startswith("/machine/peripheral/") and b.get("inserted"):
                out[qdev.split("/")[3]] = b["inserted"]
        return out

    async def block_stats(self, timeout: float = QMP_TIMEOUT) -> dict[str, BlockStats]:
        """Device id (disk0, hpdisk1, ...) -> its I/O counters, for the guest's disks."""
        out = {}
        for b in await self._monitor.command("query-blockstats", timeout=timeout):
            qdev = str(b.get("qdev", ""))
            if not qdev.startswith("/machine/peripheral/"):
                continue
            st = b.get("stats", {})
            out[qdev.split("/")[3]] = BlockStats(
                read_bytes=int(st.get("rd_bytes", 0)), write_bytes=int(st.get("wr_bytes", 0)),
                read_requests=int(st.get("rd_operations", 0)),
                write_requests=int(st.get("wr_operations", 0)))
        return out

    async def disk_nodes(self, spec: VMSpec) -> list[str]:
        """The top block node of each disk of `spec`, in spec order."""
        roots = await self.disk_roots()
        return [roots[disk_node(spec, i)]["node-name"] for i in range(len(spec.disks))]

    async def disk_formats(self, spec: VMSpec) -> list[list[str]]:
        """The image formats QEMU has open for each disk of `spec`: the top image, then
        its backing files, in spec order."""
        roots = await self.disk_roots()
        out = []
        for i in range(len(spec.disks)):
            chain, image = [], roots[disk_node(spec, i)].get("image")
            while image:
                chain.append(str(image["format"]))
                image = image.get("backing-image")
            out.append(chain)
        return out

    async def snapshot_disk(self, node: str, overlay: str, overlay_node: str) -> None:
        """Freeze `node`: the guest writes to a new qcow2 `overlay` on top of it."""
        await self._monitor.command("blockdev-snapshot-sync", {
            "node-name": node, "snapshot-file": overlay, "snapshot-node-name": overlay_node,
            "format": "qcow2"})

    async def stream_into(self, overlay_node: str, job_id: str) -> None:
        """Copy the data below `overlay_node` up into it (the node then stands alone)."""
        await self._run_job("block-stream", job_id,
                            {"device": overlay_node, "auto-dismiss": False})

    async def remove_node(self, node: str) -> None:
        """Close a block node nothing uses any more."""
        await self._monitor.command("blockdev-del", {"node-name": node})

    # internal snapshots (QEMU jobs)

    async def snapshot_save(self, tag: str, nodes: list[str], job_id: str,
                            progress: Progress | None = None) -> None:
        """Save memory (into the first node) and every disk node as snapshot `tag`."""
        await self._run_job("snapshot-save", job_id,
                            {"tag": tag, "vmstate": nodes[0], "devices": nodes}, progress)

    async def snapshot_load(self, tag: str, nodes: list[str], job_id: str,
                            progress: Progress | None = None) -> None:
        """Load snapshot `tag` (memory and disks); the guest stays paused."""
        await self._run_job("snapshot-load", job_id,
                            {"tag": tag, "vmstate": nodes[0], "devices": nodes}, progress)

    async def snapshot_delete(self, tag: str, nodes: list[str], job_id: str) -> None:
        await self._run_job("snapshot-delete", job_id, {"tag": tag, "devices": nodes})

    async def job_ids(self) -> list[str]:
        """The QEMU jobs that exist now (running or concluded, not dismissed)."""
        return [str(j["id"]) for j in await self._monitor.command("query-jobs")]

    async def finish_job(self, job_id: str, progress: Progress | None = None) -> None:
        """Wait for job `job_id` to conclude; dismiss it; raise its error."""
        self._jobs.setdefault(job_id, asyncio.Event())
        try:
            while True:
                changed = self._jobs[job_id]
                changed.clear()  # before asking: an event from now on wakes the wait
                job = next((j for j in await self._monitor.command("query-jobs")
                            if j["id"] == job_id), None)
                if job is None:
                    return
                if progress is not None and job.get("total-progress"):
                    progress(job["current-progress"] / job["total-progress"])
                if job["status"] == "concluded":
                    await self._monitor.command("job-dismiss", {"id": job_id})
                    if job.get("error"):
                        raise OperationFailed(f"{job['type']}: {job['error']}")
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), JOB_POLL)
        finally:
            self._jobs.pop(job_id, None)

    async def _run_job(self, cmd: str, job_id: str, args: dict[str, Any],
                       progress: Progress | None = None) -> None:
        # Registered before the command: its first status events may come at once.
        self._jobs[job_id] = asyncio.Event()
        try:
            await self._monitor.command(cmd, {"job-id": job_id, **args})
        except BaseException:
            self._jobs.pop(job_id, None)
            raise
        await self.finish_job(job_id, progress)

    # memory state to and from a file (migration)

    async def save_memory(self, path: str, bandwidth: int) -> None:
        """Write the guest's memory and device state to `path` (the guest should be
        paused, so that it matches the disks)."""
        await self._monitor.command("migrate-set-parameters", {"max-bandwidth": bandwidth})
        await self._monitor.command("migrate", {"uri": f"exec:cat > {shlex.quote(path)}"})
        await self._migration_done()

    async def load_memory(self, path: str) -> None:
        """Load a state `save_memory` wrote into a QEMU started with -incoming defer."""
        await self._monitor.command("migrate-incoming",
                                    {"uri": f"exec:cat {shlex.quote(path)}"})
        await self._migration_done()

    async def cancel_memory_save(self) -> None:
        """Stop a memory state transfer still in progress (none: nothing happens)."""
        status = (await self._monitor.command("query-migrate")).get("status")
        if status in ("active", "setup"):
            await self._monitor.command("migrate_cancel")

    async def _migration_done(self) -> None:
        while True:
            status = (await self._monitor.command("query-migrate")).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise OperationFailed(f"memory state transfer {status}")
            await asyncio.sleep(MIGRATION_POLL)


# the running VMs


class Machines:
    """The Machine of every running VM the agent is attached to, by VM name. Events of
    each (except those a Machine's own waits take) go to `on_event`; a lost connection
    to `on_lost`."""

    def __init__(self, on_event: EventCallback, on_lost: Callable[[str], None]) -> None:
        self._on_event = on_event
        self._on_lost = on_lost
        self._machines: dict[str, Machine] = {}

    def get(self, name: str) -> Machine | None:
        return self._machines.get(name)

    def require(self, name: str) -> Machine:
        m = self._machines.get(name)
        if m is None:
            raise OperationFailed(f"{name}: no QMP connection")
        return m

    def names(self) -> list[str]:
        return list(self._machines)

    async def attach(self, name: str, files: VMFiles, timeout: float = QMP_TIMEOUT) -> Machine:
        """Connect to the VM's QEMU (replacing an older connection)."""
        await self.detach(name)
        m = Machine(name, files, self._on_event, self._on_lost)
        await m.connect(timeout)
        self._machines[name] = m
        return m

    async def detach(self, name: str) -> None:
        """Drop the connection; QEMU keeps running."""
        m = self._machines.pop(name, None)
        if m is not None:
            await m.close()

    async def detach_all(self) -> None:
        await asyncio.gather(*(self.detach(n) for n in self.names()), return_exceptions=True)
