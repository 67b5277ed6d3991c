"""The VM service: the lifecycle of child VMs (create, start, stop, pause, resume,
reset, delete, console), their observed state, restart safety and crash detection.

The API and hvctl call only this. Later areas (hot-add, checkpoints, offline disks)
extend it with their own service modules that reuse `VMService.locks` (one operation at
a time per VM), `VMService.monitor(name)` (the VM's QMP connection) and `VMService.jobs`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from hvagent.access.policy import Admission
from hvagent.config import AgentConfig
from hvagent.disk import image
from hvagent.disk.errors import DiskError
from hvagent.drivers import machine
from hvagent.drivers import net as bridge
from hvagent.drivers.machine import VMFiles
from hvagent.drivers.qmp import LAUNCH_QMP_TIMEOUT, QMP_TIMEOUT, Monitor, MonitorGone
from hvagent.errors import Busy, Conflict, HVError, InvalidRequest, NotFound, OperationFailed
from hvagent.host.kvm import AccelChoice, choose_accel
from hvagent.services import devices
from hvagent.services.files import resolve as resolve_file
from hvagent.services.jobs import Jobs
from hvagent.services.limits import check_host_limits
from hvagent.spec import DiskFormat, DiskSpec, VMSpec, VMState
from hvagent.store import Store, VMRow

log = logging.getLogger(__name__)

# QEMU runs (so: no start, no delete, no offline disk edit); of these, only the
# ANSWERING ones take QMP commands. An unresponsive VM can still be stopped (killed).
ANSWERING = (VMState.RUNNING, VMState.PAUSED)
ACTIVE = (*ANSWERING, VMState.UNRESPONSIVE)
# How often the monitor of an unresponsive VM is tried again in the background.
PROBE_INTERVAL = 1.0
DEFAULT_STOP_TIMEOUT = 60.0
QUIT_TIMEOUT = 5.0
CRASH_LOG_LINES = 20
_EXT = {DiskFormat.QCOW2: "qcow2", DiskFormat.RAW: "raw", DiskFormat.VPC: "vhd",
        DiskFormat.VHDX: "vhdx"}


class OperationLocks:
    """One operation at a time per target; a second one fails at once with Busy (409)."""

    def __init__(self) -> None:
        self._ops: dict[str, str] = {}

    def current(self, target: str) -> str | None:
        return self._ops.get(target)

    def acquire(self, target: str, operation: str) -> None:
        if target in self._ops:
            raise Busy(target, self._ops[target])
        self._ops[target] = operation

    def release(self, target: str) -> None:
        self._ops.pop(target, None)

    @contextlib.contextmanager
    def hold(self, target: str, operation: str) -> Iterator[None]:
        self.acquire(target, operation)
        try:
            yield
        finally:
            self.release(target)


class VMInfo(BaseModel):
    name: str
    state: VMState
    spec: VMSpec
    pid: int | None
    operation: str | None  # in progress right now
    last_error: str | None
    serial_log: str
    created_at: float
    updated_at: float


class VMService:
    def __init__(self, config: AgentConfig, store: Store, jobs: Jobs) -> None:
        self.config = config
        self.store = store
        self.jobs = jobs
        self.locks = OperationLocks()
        self._monitors: dict[str, Monitor] = {}
        self._accel: AccelChoice | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._probing: set[str] = set()  # unresponsive VMs a background probe retries
        self.storage_dir = config.storage_dir.resolve()
        # Host policy (quotas, disk formats, VLANs, nested virt); the app sets the real one.
        self.admission = Admission()
        # Extensions (hvagent.services.devices, hvagent.services.checkpoints): QMP events with their
        # data (vm, event, data), and recovery work run once the VMs are reattached.
        self.event_listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self.startup_hooks: list[Callable[[], Awaitable[None]]] = []
        # (vm, keep_disks) -> files removed; run by delete() before the VM's row goes.
        self.delete_hooks: list[Callable[[str, bool], Awaitable[list[str]]]] = []

    # lifecycle of the service itself

    async def startup(self) -> None:
        """Reattach to every VM the previous agent left running and report true states."""
        failed = self.jobs.recover()
        if failed:
            log.info("marked %d interrupted jobs failed", failed)
        # All at once: a VM whose monitor does not answer costs one QMP deadline, not N.
        await asyncio.gather(*(self._observe_quietly(r.name) for r in self.store.list_vms()))
        for hook in self.startup_hooks:
            await hook()

    async def shutdown(self) -> None:
        """Drop QMP connections; the VMs keep running. Bounded: each close is."""
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*(self._drop_monitor(n) for n in list(self._monitors)),
                             return_exceptions=True)

    @property
    def accel(self) -> AccelChoice:
        if self._accel is None:
            self._accel = choose_accel(self.config.accel)
            log.info("accelerator %s: %s", self._accel.accel, self._accel.reason)
        return self._accel

    def files(self, name: str) -> VMFiles:
        c = self.config
        return VMFiles.for_vm(name, c.run_dir.resolve(), c.log_dir.resolve(),
                              c.state_dir.resolve())

    # queries

    async def list(self) -> list[VMInfo]:
        rows = await asyncio.gather(*(self._observe(r) for r in self.store.list_vms()))
        return [self._info(r) for r in rows]

    async def get(self, name: str) -> VMInfo:
        return self._info(await self._observe(self._row(name)))

    def console(self, name: str, lines: int = 50) -> str:
        self._row(name)
        return machine.tail(self.files(name).serial_log, lines)

    async def monitor(self, name: str) -> Monitor:
        """The QMP connection of a running VM (for device/checkpoint services)."""
        row = await self._observe(self._row(name))
        mon = self._monitors.get(name)
        if row.state not in ANSWERING or mon is None:
            raise Conflict(f"{name}: not running (state {row.state})")
        return mon

    # operations

    async def create(self, spec: VMSpec) -> VMInfo:
        with self.locks.hold(spec.name, "create"):
            if self.store.get_vm(spec.name) is not None:
                raise Conflict(f"{spec.name}: a VM with this name already exists")
            self.admission.admit(spec)  # before anything is made
            check_host_limits(spec, self.files(spec.name).qmp)
            # `list` alone would name the method below (mypy resolves it in class scope).
            created: builtins.list[Path] = []
            files = self.files(spec.name)
            try:
                spec = await self._resolve(spec, created)
                machine.prepare_files(spec, files)
                self.store.insert_vm(spec.name, spec.model_dump_json(), VMState.DEFINED)
                self.admission.created(spec.name)
            except BaseException:
                # Nothing half-made stays behind: no disk, no per-VM files, no row.
                for p in created:
                    p.unlink(missing_ok=True)
                machine.remove_files(files)
                raise
        return await self.get(spec.name)

    async def start(self, name: str) -> VMInfo:
        with self.locks.hold(name, "start"):
            row = await self._observe(self._row(name), locked=True)
            if row.state in ACTIVE:
                raise Conflict(f"{name}: already {row.state}")
            spec = VMSpec.model_validate_json(row.spec)
            # Again at start: the VM may predate the limits, or the host may have shrunk.
            check_host_limits(spec, self.files(name).qmp)
            settled = devices.settle_pending(spec)  # unplugs the guest never completed
            if settled != spec:
                self.store.update_vm(name, spec=settled.model_dump_json())
                spec = settled
            pid = await self.launch_paused(name, spec)
            try:
                await self._mon(name).execute("cont")
            except BaseException:
                machine.kill(pid)
                raise
            self.store.update_vm(name, state=VMState.RUNNING, pid=pid, last_error=None)
        return await self.get(name)

    async def launch_paused(self, name: str, spec: VMSpec, extra: tuple[str, ...] = ()) -> int:
        """Start QEMU for `spec` with the guest not yet running (-S), attach QMP and
        plug the hot-added devices again; returns QEMU's pid. The caller holds the VM's
        lock and records the new state (start: `cont`; checkpoint revert: load first)."""
        files = self.files(name)
        cmd = machine.build_command(spec, files,
                                    self.admission.qemu_args(self.accel.qemu_args))
        cmd += ["-S", *extra]
        log.info("%s: starting: %s", name, " ".join(cmd))
        try:
            await self.plug_nics(spec)  # QEMU opens the taps by name
            pid = await machine.launch(cmd, files)
        except BaseException:
            await self.unplug_nics(name, spec)
            raise
        try:
            await self._attach(name, files, LAUNCH_QMP_TIMEOUT)
            await devices.replay(self._mon(name), spec)
        except BaseException:
            machine.kill(pid)
            await self.unplug_nics(name, spec)
            raise
        return pid

    async def plug_nics(self, spec: VMSpec) -> None:
        """The taps of the VM's VLAN NICs, each on its VLAN's bridge."""
        for n in spec.nics:
            if n.vlan is not None:
                await bridge.plug(bridge.tap_name(n.mac), n.vlan)

    async def unplug_nics(self, name: str, spec: VMSpec | None = None) -> None:
        """Remove the VM's taps (and bridges left without ports) once QEMU has ended."""
        if spec is None:
            row = self.store.get_vm(name)
            if row is None:
                return
            spec = VMSpec.model_validate_json(row.spec)
        for n in spec.nics:
            if n.vlan is not None:
                try:
                    await bridge.unplug(bridge.tap_name(n.mac))
                except HVError as e:  # cleanup: report, never mask the state change
                    log.warning("%s: %s", name, e.message)

    async def end_qemu(self, name: str) -> None:
        """End the VM's QEMU at once (no guest shutdown); the caller holds the lock and
        records the new state."""
        await self._quit(name, self._row(name).pid)

    async def stop(self, name: str, force: bool = False,
                   timeout: float = DEFAULT_STOP_TIMEOUT) -> VMInfo:
        """ACPI power-off; force-off when the guest has not powered off after `timeout`
        seconds (or at once with `force`)."""
        with self.locks.hold(name, "force-off" if force else "stop"):
            row = await self._observe(self._row(name), locked=True)
            if row.state not in ACTIVE:
                raise Conflict(f"{name}: not running (state {row.state})")
            unresponsive = row.state == VMState.UNRESPONSIVE
            if unresponsive:
                await self._drop_monitor(name)  # its commands would only time out: kill
            mon = self._monitors.get(name)
            graceful = False
            if not force and mon is not None:
                graceful = await self._powerdown(name, row, mon, timeout)
            await self._quit(name, row.pid)
            note = None if graceful or force else f"forced off after {timeout:g}s"
            if unresponsive and not force:
                note = "forced off: its QMP monitor did not answer"
            self.store.update_vm(name, state=VMState.STOPPED, pid=None, last_error=note)
        return await self.get(name)

    async def pause(self, name: str) -> VMInfo:
        return await self._simple(name, "pause", "stop", VMState.RUNNING, VMState.PAUSED)

    async def resume(self, name: str) -> VMInfo:
        return await self._simple(name, "resume", "cont", VMState.PAUSED, VMState.RUNNING)

    async def reset(self, name: str) -> VMInfo:
        with self.locks.hold(name, "reset"):
            row = await self._observe(self._row(name), locked=True)
            if row.state not in ANSWERING:
                raise Conflict(f"{name}: not running (state {row.state})")
            await self._mon(name).execute("system_reset")
        return await self.get(name)

    async def delete(self, name: str, keep_disks: bool = False) -> builtins.list[str]:
        """Remove the VM; its agent-created disks too unless `keep_disks`. Disks that
        existed before the VM are never removed. Returns the removed disk paths."""
        with self.locks.hold(name, "delete"):
            row = await self._observe(self._row(name), locked=True)
            if row.state in ACTIVE:
                raise Conflict(f"{name}: is {row.state}; stop it first")
            spec = VMSpec.model_validate_json(row.spec)
            removed: builtins.list[str] = []
            for hook in self.delete_hooks:  # while the VM's other rows still exist
                removed += await hook(name, keep_disks)
            await self.unplug_nics(name, spec)  # taps a crashed QEMU may have left
            self.store.delete_vm(name)
            machine.remove_files(self.files(name))
            if not keep_disks:
                for d in spec.disks:
                    if d.created and d.path:
                        Path(d.path).unlink(missing_ok=True)
                        removed.append(d.path)
            return removed

    # internals

    def _row(self, name: str) -> VMRow:
        row = self.store.get_vm(name)
        if row is None:
            raise NotFound(f"{name}: no such VM")
        return row

    def _info(self, row: VMRow) -> VMInfo:
        return VMInfo(
            name=row.name, state=VMState(row.state), spec=VMSpec.model_validate_json(row.spec),
            pid=row.pid, operation=self.locks.current(row.name), last_error=row.last_error,
            serial_log=str(self.files(row.name).serial_log),
            created_at=row.created_at, updated_at=row.updated_at,
        )

    def _mon(self, name: str) -> Monitor:
        mon = self._monitors.get(name)
        if mon is None:
            raise OperationFailed(f"{name}: no QMP connection")
        return mon

    async def _simple(self, name: str, op: str, cmd: str, need: VMState,
                      result: VMState) -> VMInfo:
        with self.locks.hold(name, op):
            row = await self._observe(self._row(name), locked=True)
            if row.state != need:
                raise Conflict(f"{name}: cannot {op}: state is {row.state}, not {need}")
            await self._mon(name).execute(cmd)
            self.store.update_vm(name, state=result)
        return await self.get(name)

    async def _resolve(self, spec: VMSpec, created: builtins.list[Path]) -> VMSpec:
        """Check every file the spec names (hvagent.services.files: confined, and the caller's
        to use; recorded resolved) and create its new disks (recorded in `created` as they
        appear, so the caller can remove them on failure)."""
        boot: dict[str, str] = {}
        for field in ("kernel", "initrd"):
            value = getattr(spec, field)
            if value is not None:
                boot[field] = str(resolve_file(self, value, field, "boot", spec.name))
        disks: list[DiskSpec] = []
        seen: set[Path] = set()
        for i, d in enumerate(spec.disks):
            where = f"disks[{i}]"
            if d.path is not None:
                path = resolve_file(self, d.path, f"{where}.path", "disk", spec.name)
                found = await self.disk_format(path, f"{where}.path")
                if d.format is not None and found != d.format:
                    raise InvalidRequest(
                        f"{where}.format: {d.path} is {found}, not {d.format}")
                disks.append(DiskSpec(path=str(path), format=found, bus=d.bus))
            else:
                assert d.size is not None
                fmt = d.format or DiskFormat.QCOW2
                path = self.storage_dir / f"{spec.name}-disk{i}.{_EXT[fmt]}"
                if path.exists():
                    raise Conflict(f"{where}: {path} already exists")
                self.storage_dir.mkdir(parents=True, exist_ok=True)
                created.append(path)
                await self.create_disk(path, fmt, d.size, where)
                disks.append(DiskSpec(path=str(path), format=fmt, size=d.size, created=True,
                                      bus=d.bus))
            if path in seen:
                raise InvalidRequest(f"{where}.path: {path} is attached twice")
            seen.add(path)
        return spec.model_copy(update={"disks": disks, **boot})

    async def disk_format(self, path: Path, where: str) -> DiskFormat:
        """The format of an existing image (from its own magic, so a fixed VHD is not
        taken for raw), checked readable by qemu-img; shared, as a running VM may hold it."""
        try:
            info = await asyncio.to_thread(image.image_info, path, force_share=True)
        except DiskError as e:
            raise InvalidRequest(f"{where}: {path}: not a readable disk image: {e}") from e
        return DiskFormat(info.format.qemu)

    async def create_disk(self, path: Path, fmt: DiskFormat, size: int, where: str) -> None:
        """A new empty image of exactly `size` bytes (VHD too), written to a temporary
        file and renamed into place."""
        if size % 512:
            raise InvalidRequest(f"{where}.size: {size} bytes is not a multiple of 512")
        try:
            await asyncio.to_thread(image.create, path, image.ImageFormat.from_qemu(fmt), size)
        except DiskError as e:
            if "No space left on device" in str(e):  # a host limit, not a host failure
                raise InvalidRequest(f"{where}: no space left on device for {path} "
                                     f"({size} bytes): {e}") from e
            raise OperationFailed(f"{where}: cannot create {path}: {e}") from e

    async def _attach(self, name: str, files: VMFiles, timeout: float = QMP_TIMEOUT) -> None:
        await self._drop_monitor(name)
        mon = Monitor(name, on_event=lambda ev, data: self._on_event(name, ev, data),
                      on_lost=lambda: self._on_lost(name))
        await mon.connect(files.qmp, timeout)
        self._monitors[name] = mon

    async def _drop_monitor(self, name: str) -> None:
        mon = self._monitors.pop(name, None)
        if mon is not None:
            await mon.close()

    def _on_event(self, name: str, event: str, data: dict[str, Any] | None = None) -> None:
        if event in ("SHUTDOWN", "STOP", "RESUME"):
            self._spawn(self._observe_quietly(name))
        for listener in self.event_listeners:
            listener(name, event, data or {})

    def _on_lost(self, name: str) -> None:
        self._spawn(self._observe_quietly(name))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _observe_quietly(self, name: str) -> None:
        row = self.store.get_vm(name)
        if row is None:
            return
        try:
            await self._observe(row)
        except HVError as e:
            log.warning("%s: %s", name, e.message)

    async def _observe(self, row: VMRow, locked: bool = False,
                       probing: bool = False) -> VMRow:
        """Bring the recorded state in line with what QEMU really does. While another
        operation runs on the VM (and the caller is not that operation) it only reports.
        A live QEMU whose monitor does not answer is `unresponsive` until it answers."""
        name = row.name
        if not locked and not probing and self.locks.current(name) is not None:
            return row
        files = self.files(name)
        state = VMState(row.state)
        if state == VMState.UNRESPONSIVE and name in self._probing and not probing:
            # The background probe retries the monitor; here only ask whether QEMU lives,
            # so list/get answer at once.
            if machine.is_alive(row.pid, files):
                return row
        if state not in ACTIVE:
            pid = machine.read_pid(files)
            if not machine.is_alive(pid, files):
                return row
            # A QEMU for this VM runs although the record says otherwise (the agent died
            # between launching it and recording it): adopt it.
            self.store.update_vm(name, state=VMState.RUNNING, pid=pid)
            row = self._row(name)
        if not machine.is_alive(row.pid, files):
            await self._drop_monitor(name)
            log.warning("%s: QEMU (pid %s) is gone", name, row.pid)
            await self.unplug_nics(name)
            self.store.update_vm(name, state=VMState.CRASHED, pid=None, last_error=(
                "QEMU exited unexpectedly; serial log tail:\n"
                + machine.tail(files.serial_log, CRASH_LOG_LINES)))
            return self._row(name)
        mon = self._monitors.get(name)
        try:
            if mon is None or not mon.connected:
                await self._attach(name, files)
            status = await self._mon(name).status()
        except (MonitorGone, OperationFailed) as e:
            if not machine.is_alive(row.pid, files):
                # read again: a concurrent observer may have recorded why it ended
                return await self._observe(self._row(name), locked)
            await self._drop_monitor(name)
            if state != VMState.UNRESPONSIVE:
                log.warning("%s: unresponsive: %s", name, e)
            self.store.update_vm(name, state=VMState.UNRESPONSIVE,
                                 last_error=f"QMP monitor does not answer: {e}")
            if name not in self._probing:
                self._probing.add(name)
                self._spawn(self._probe(name))
            return self._row(name)
        if status == "shutdown":
            # The guest powered itself off; QEMU waits (-no-shutdown) for us to end it.
            await self._end_stopped_guest(name, row.pid, locked, VMState.STOPPED, None)
        elif status in ("internal-error", "guest-panicked"):
            await self._end_stopped_guest(name, row.pid, locked, VMState.CRASHED, (
                f"guest stopped with status {status}; serial log tail:\n"
                + machine.tail(files.serial_log, CRASH_LOG_LINES)))
        else:
            new = VMState.RUNNING if status == "running" else VMState.PAUSED
            if state == VMState.UNRESPONSIVE:
                log.info("%s: monitor answers again (%s)", name, new)
                self.store.update_vm(name, state=new, last_error=None)
            elif new != state:
                self.store.update_vm(name, state=new)
        return self._row(name)

    async def _end_stopped_guest(self, name: str, pid: int | None, locked: bool,
                                 state: VMState, note: str | None) -> None:
        """End the QEMU of a guest that stopped for good and record `state`, holding the
        VM's lock (unless the caller does) so that a concurrent observer only reports and
        never takes the QEMU this ends for one that died."""
        with contextlib.ExitStack() as stack:
            if not locked:
                stack.enter_context(contextlib.suppress(Busy))
                stack.enter_context(self.locks.hold(name, "stop"))
            await self._quit(name, pid)
            self.store.update_vm(name, state=state, pid=None, last_error=note)

    async def _probe(self, name: str) -> None:
        """Try an unresponsive VM's monitor again until it answers or QEMU is gone."""
        try:
            while True:
                await asyncio.sleep(PROBE_INTERVAL)
                row = self.store.get_vm(name)
                if row is None or row.state != VMState.UNRESPONSIVE:
                    return
                if self.locks.current(name) is None:
                    try:
                        await self._observe(row, probing=True)
                    except HVError as e:
                        log.warning("%s: %s", name, e.message)
        finally:
            self._probing.discard(name)

    async def _powerdown(self, name: str, row: VMRow, mon: Monitor, timeout: float) -> bool:
        """ACPI power button; True when the guest powered off within `timeout`."""
        files = self.files(name)
        try:
            if await mon.status() != "running":
                await mon.execute("cont")  # a paused guest cannot react to ACPI
            await mon.execute("system_powerdown")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not machine.is_alive(row.pid, files) or await mon.status() == "shutdown":
                    return True
                await asyncio.sleep(0.1)
        except MonitorGone:
            return not machine.is_alive(row.pid, files)
        return False

    async def _quit(self, name: str, pid: int | None) -> None:
        """End QEMU: `quit` over QMP, SIGKILL if it is still there after QUIT_TIMEOUT."""
        files = self.files(name)
        mon = self._monitors.get(name)
        asked = False
        if mon is not None:
            with contextlib.suppress(MonitorGone, OperationFailed):
                await mon.execute("quit")
                asked = True
        await self._drop_monitor(name)
        # Only a QEMU that took `quit` gets time to exit; else SIGKILL at once.
        deadline = time.monotonic() + (QUIT_TIMEOUT if asked else 0)
        while machine.is_alive(pid, files) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if pid and machine.is_alive(pid, files):
            machine.kill(pid)
            while machine.is_alive(pid, files):
                await asyncio.sleep(0.05)
        files.qmp.unlink(missing_ok=True)
        files.pidfile.unlink(missing_ok=True)
        await self.unplug_nics(name)
