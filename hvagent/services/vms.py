"""The VM service: the lifecycle of child VMs (create, start, stop, pause, resume,
reset, delete, console), their observed state, restart safety and crash detection.

The API and hvctl call only this. The other services of a VM (devices, checkpoints,
disks) reuse `VMService.locks` (one operation at a time per VM), `VMService.machine(name)`
(the running VM's hvagent.drivers.machine.Machine, every QMP command as a method),
`VMService.launch_paused` / `end_qemu`, and `VMService.jobs`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from enum import StrEnum, auto
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from hvagent.access.policy import Admission
from hvagent.config import AgentConfig
from hvagent.drivers import machine
from hvagent.drivers.machine import (
    LAUNCH_QMP_TIMEOUT,
    QMP_TIMEOUT,
    Machine,
    Machines,
    MonitorGone,
    VMFiles,
)
from hvagent.errors import Busy, Conflict, HVError, InvalidRequest, NotFound, OperationFailed
from hvagent.host.kvm import AccelChoice, choose_accel
from hvagent.services.disks import DiskService
from hvagent.services.files import Use
from hvagent.services.jobs import Jobs
from hvagent.services.limits import check_host_limits
from hvagent.services.networks import NetworkService
from hvagent.spec import (
    ACTIVE_STATES,
    ANSWERING_STATES,
    DEFAULT_STOP_TIMEOUT,
    DiskSpec,
    Firmware,
    MediaSpec,
    VMSpec,
    VMState,
)
from hvagent.store import Store, VMRow

log = logging.getLogger(__name__)

# How often the monitor of an unresponsive VM is tried again in the background.
PROBE_INTERVAL = 1.0
QUIT_TIMEOUT = 5.0
CRASH_LOG_LINES = 20


class Operation(StrEnum):
    """The lifecycle operations, by the name a VM shows while one holds its lock."""

    CREATE = auto()
    START = auto()
    STOP = auto()
    FORCE_OFF = "force-off"
    PAUSE = auto()
    RESUME = auto()
    RESET = auto()
    DELETE = auto()


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


# How long shutdown waits for a probe it called off to end its guest (it polls 5x a second).
PROBE_STOP_WAIT = 5.0


class VMService:
    def __init__(self, config: AgentConfig, store: Store, jobs: Jobs) -> None:
        self.config = config
        self.store = store
        self.jobs = jobs
        self.locks = OperationLocks()
        self.machines = Machines(on_event=self._on_event, on_lost=self._on_lost)
        self._accel_task: asyncio.Task[AccelChoice] | None = None
        self._probe_stop = threading.Event()  # set on shutdown: a running probe gives up
        self._background: set[asyncio.Task[Any]] = set()
        self._probing: set[str] = set()  # unresponsive VMs a background probe retries
        self.storage_dir = config.storage_dir.resolve()
        # Host policy (quotas, disk formats, VLANs, nested virt); the app sets the real one.
        self.admission = Admission()
        # The VM's disk images and the host side of its NICs.
        self.disks = DiskService(self)
        self.networks = NetworkService(config, store)
        # Extensions (hvagent.services.devices, hvagent.services.checkpoints): QMP events with their
        # data (vm, event, data), and recovery work run once the VMs are reattached.
        self.event_listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self.startup_hooks: list[Callable[[], Awaitable[None]]] = []
        # (vm, keep_disks) -> files removed; run by delete() before the VM's row goes.
        self.delete_hooks: list[Callable[[str, bool], Awaitable[list[str]]]] = []
        # (vm, spec, machine) -> spec, run by start() once QEMU is up and paused (a
        # one-time boot override is spent there: hvagent.services.media).
        self.launch_hooks: list[Callable[[str, VMSpec, Machine], Awaitable[VMSpec]]] = []

    # lifecycle of the service itself

    async def startup(self) -> None:
        """Reattach to every VM the previous agent left running and report true states."""
        failed = self.jobs.recover()
        if failed:
            log.info("marked %d interrupted jobs failed", failed)
        # All at once: a VM whose monitor does not answer costs one QMP deadline, not N.
        await asyncio.gather(*(self._observe_quietly(r.name) for r in self.store.list_vms()))
        # The networks, and the taps of the VMs that run, as the store says.
        await self.networks.startup([VMSpec.model_validate_json(r.spec)
                                     for r in self.store.list_vms()
                                     if r.state in ACTIVE_STATES])
        for hook in self.startup_hooks:
            await hook()

    async def shutdown(self) -> None:
        """Drop QMP connections; the VMs keep running. Bounded: each close is, and a
        probe still running is called off (its thread would hold the exit up)."""
        self._probe_stop.set()
        if self._accel_task is not None:
            # The probe's thread ends its guest within a poll; the process may be ended by
            # a signal right after this returns, which would orphan that guest.
            await asyncio.wait({self._accel_task}, timeout=PROBE_STOP_WAIT)
        for t in list(self._background):
            t.cancel()
        await self.networks.shutdown()
        await self.machines.detach_all()

    def begin_accel_probe(self) -> None:
        """Resolve the accelerator in the background: the probe guest may take its whole
        deadline, and the agent serves meanwhile. The first VM start (and GET /agent)
        waits for the verdict; later ones have it."""
        if self._accel_task is None:
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._resolve_accel))
            # Retrieved here, so an `accel: kvm` refusal nobody asked for yet is no
            # "exception was never retrieved" (it is logged and kept for the askers).
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._accel_task = task

    def _resolve_accel(self) -> AccelChoice:
        try:
            choice = choose_accel(self.config.accel, stop=self._probe_stop)
        except InvalidRequest as e:  # `accel: kvm` on a host where KVM does not run guests
            log.warning("accelerator: %s", e)
            raise
        log.info("accelerator %s: %s", choice.accel, choice.reason)
        return choice

    async def accel(self) -> AccelChoice:
        """The accelerator VMs start with (InvalidRequest when the configured one does
        not work on this host)."""
        self.begin_accel_probe()
        assert self._accel_task is not None
        # Shielded: a request that gives up does not cancel the probe for the others.
        return await asyncio.shield(self._accel_task)

    def files(self, name: str) -> VMFiles:
        c = self.config
        return VMFiles.for_vm(name, c.run_dir.resolve(), c.log_dir.resolve(),
                              c.state_dir.resolve())

    # queries

    async def list_vms(self) -> list[VMInfo]:
        rows = await asyncio.gather(*(self._observe(r) for r in self.store.list_vms()))
        return [self._info(r) for r in rows]

    def count(self) -> int:
        """How many VMs are defined (no state observed)."""
        return len(self.store.list_vms())

    async def get(self, name: str) -> VMInfo:
        return self._info(await self._observe(self._row(name)))

    def console(self, name: str, lines: int = 50) -> str:
        self._row(name)
        return machine.tail(self.files(name).serial_log, lines)

    async def machine(self, name: str) -> Machine:
        """The Machine of a VM whose QEMU runs and answers (Conflict otherwise)."""
        row = await self._observe(self._row(name))
        m = self.machines.get(name)
        if row.state not in ANSWERING_STATES or m is None:
            raise Conflict(f"{name}: not running (state {row.state})")
        return m

    def attached(self, name: str) -> Machine | None:
        """The Machine the agent is attached to for `name`, without observing the VM
        (for work that already holds the VM's lock)."""
        return self.machines.get(name)

    # operations

    async def create(self, spec: VMSpec) -> VMInfo:
        with self.locks.hold(spec.name, Operation.CREATE):
            if self.store.get_vm(spec.name) is not None:
                raise Conflict(f"{spec.name}: a VM with this name already exists")
            spec = self.networks.resolve_nics(spec)
            await self.networks.check_trunks(spec.nics)
            self.admission.admit(spec)  # before anything is made
            check_host_limits(spec, self.files(spec.name).qmp)
            created: list[Path] = []
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
        with self.locks.hold(name, Operation.START):
            row = await self._observe(self._row(name), locked=True)
            if row.state in ACTIVE_STATES:
                raise Conflict(f"{name}: already {row.state}")
            spec = VMSpec.model_validate_json(row.spec)
            # Again at start: the VM may predate the limits, or the host may have shrunk.
            check_host_limits(spec, self.files(name).qmp)
            settled = machine.settle_pending(spec)  # unplugs the guest never completed
            if settled != spec:
                self.store.update_vm(name, spec=settled.model_dump_json())
                spec = settled
            pid = await self.launch_paused(name, spec)
            try:
                m = self.machines.require(name)
                for hook in self.launch_hooks:
                    spec = await hook(name, spec, m)
                await m.cont()
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
        cmd = machine.build_command(spec, files, (await self.accel()).qemu_args,
                                    nested=self.admission.policy.nested_virtualization)
        cmd += ["-S", *extra]
        log.info("%s: starting: %s", name, " ".join(cmd))
        try:
            await self.plug_nics(spec)  # QEMU opens the taps by name
            pid = await machine.launch(cmd, files)
        except BaseException:
            await self.unplug_nics(name, spec)
            raise
        try:
            m = await self.machines.attach(name, files, LAUNCH_QMP_TIMEOUT)
            await m.replay(spec)
        except BaseException:
            machine.kill(pid)
            await self.unplug_nics(name, spec)
            raise
        return pid

    async def plug_nics(self, spec: VMSpec) -> None:
        """The taps of the VM's VLAN NICs, each on its VLAN's bridge."""
        await self.networks.plug_vm(spec)

    async def unplug_nics(self, name: str, spec: VMSpec | None = None) -> None:
        """Remove the VM's taps (and bridges left without ports) once QEMU has ended."""
        if spec is None:
            row = self.store.get_vm(name)
            if row is None:
                return
            spec = VMSpec.model_validate_json(row.spec)
        await self.networks.unplug_vm(name, spec)  # logs, never raises

    async def end_qemu(self, name: str) -> None:
        """End the VM's QEMU at once (no guest shutdown); the caller holds the lock and
        records the new state."""
        await self._quit(name, self._row(name).pid)

    async def stop(self, name: str, force: bool = False,
                   timeout: float = DEFAULT_STOP_TIMEOUT) -> VMInfo:
        """ACPI power-off; force-off when the guest has not powered off after `timeout`
        seconds (or at once with `force`)."""
        with self.locks.hold(name, Operation.FORCE_OFF if force else Operation.STOP):
            row = await self._observe(self._row(name), locked=True)
            if row.state not in ACTIVE_STATES:
                raise Conflict(f"{name}: not running (state {row.state})")
            unresponsive = row.state == VMState.UNRESPONSIVE
            if unresponsive:
                await self.machines.detach(name)  # its commands would only time out: kill
            m = self.machines.get(name)
            graceful = False
            if not force and m is not None:
                graceful = await self._powerdown(name, row, m, timeout)
            await self._quit(name, row.pid)
            note = None if graceful or force else f"forced off after {timeout:g}s"
            if unresponsive and not force:
                note = "forced off: its QMP monitor did not answer"
            self.store.update_vm(name, state=VMState.STOPPED, pid=None, last_error=note)
        return await self.get(name)

    async def pause(self, name: str) -> VMInfo:
        return await self._simple(name, Operation.PAUSE, Machine.pause, VMState.RUNNING,
                                  VMState.PAUSED)

    async def resume(self, name: str) -> VMInfo:
        return await self._simple(name, Operation.RESUME, Machine.cont, VMState.PAUSED,
                                  VMState.RUNNING)

    async def nmi(self, name: str) -> VMInfo:
        """Send the guest a non-maskable interrupt (a kernel may dump or panic on it)."""
        with self.locks.hold(name, "nmi"):
            row = await self._observe(self._row(name), locked=True)
            if row.state not in ANSWERING_STATES:
                raise Conflict(f"{name}: not running (state {row.state})")
            await self.machines.require(name).inject_nmi()
        return await self.get(name)

    async def reset(self, name: str) -> VMInfo:
        with self.locks.hold(name, Operation.RESET):
            row = await self._observe(self._row(name), locked=True)
            if row.state not in ANSWERING_STATES:
                raise Conflict(f"{name}: not running (state {row.state})")
            await self.machines.require(name).reset()
        return await self.get(name)

    async def delete(self, name: str, keep_disks: bool = False) -> list[str]:
        """Remove the VM; its agent-created disks too unless `keep_disks`. Disks that
        existed before the VM are never removed. Returns the removed disk paths."""
        with self.locks.hold(name, Operation.DELETE):
            row = await self._observe(self._row(name), locked=True)
            if row.state in ACTIVE_STATES:
                raise Conflict(f"{name}: is {row.state}; stop it first")
            spec = VMSpec.model_validate_json(row.spec)
            removed: list[str] = []
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

    async def _simple(self, name: str, op: str,
                      action: Callable[[Machine], Coroutine[Any, Any, None]], need: VMState,
                      result: VMState) -> VMInfo:
        with self.locks.hold(name, op):
            row = await self._observe(self._row(name), locked=True)
            if row.state != need:
                raise Conflict(f"{name}: cannot {op}: state is {row.state}, not {need}")
            await action(self.machines.require(name))
            self.store.update_vm(name, state=result)
        return await self.get(name)

    async def _resolve(self, spec: VMSpec, created: builtins.list[Path]) -> VMSpec:
        """Check every file the spec names (hvagent.services.disks: confined, and the
        caller's to use; recorded resolved) and create its new disks (recorded in `created`
        as they appear, so the caller can remove them on failure)."""
        boot: dict[str, str] = {}
        for field in ("kernel", "initrd"):
            value = getattr(spec, field)
            if value is not None:
                boot[field] = str(self.disks.allowed_file(value, field, "boot", spec.name))
        disks: list[DiskSpec] = []
        seen: set[str | None] = set()
        for i, d in enumerate(spec.disks):
            where = f"disks[{i}]"
            disk = await self.disks.resolve(spec.name, d, where, created, number=i)
            if disk.path in seen:
                raise InvalidRequest(f"{where}.path: {disk.path} is attached twice")
            seen.add(disk.path)
            disks.append(disk)
        media: list[MediaSpec] = []
        for i, m in enumerate(spec.media):
            if m.image is not None:
                use: Use = "media" if m.write_protected else "disk"
                path = str(self.disks.allowed_file(m.image, f"media[{i}].image", use,
                                                   spec.name))
                m = m.model_copy(update={"image": path, "source": m.source or m.image})
            media.append(m)
        return spec.model_copy(update={"disks": disks, "media": media, **boot})

    def refresh_firmware_files(self, name: str, spec: VMSpec, fresh: bool = False) -> None:
        """The per-VM firmware files `spec` needs (a UEFI variable store), made when
        missing (`fresh`: made again); the caller holds the VM's lock."""
        if fresh and spec.firmware is Firmware.UEFI:
            machine.reset_efivars(spec, self.files(name))
        machine.prepare_files(spec, self.files(name))

    def _on_event(self, name: str, event: str, data: dict[str, Any] | None = None) -> None:
        if event in ("SHUTDOWN", "STOP", "RESUME"):
            self._spawn(self._observe_quietly(name))
        for listener in self.event_listeners:
            listener(name, event, data or {})

    def _on_lost(self, name: str) -> None:
        self._spawn(self._observe_quietly(name))

    def spawn(self, coro: Any) -> None:
        """Run `coro` in the background, kept referenced until it ends."""
        self._spawn(coro)

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
        if state not in ACTIVE_STATES:
            pid = machine.read_pid(files)
            if not machine.is_alive(pid, files):
                return row
            # A QEMU for this VM runs although the record says otherwise (the agent died
            # between launching it and recording it): adopt it.
            self.store.update_vm(name, state=VMState.RUNNING, pid=pid)
            row = self._row(name)
        if not machine.is_alive(row.pid, files):
            await self.machines.detach(name)
            log.warning("%s: QEMU (pid %s) is gone", name, row.pid)
            await self.unplug_nics(name)
            self.store.update_vm(name, state=VMState.CRASHED, pid=None, last_error=(
                "QEMU exited unexpectedly; serial log tail:\n"
                + machine.tail(files.serial_log, CRASH_LOG_LINES)))
            return self._row(name)
        m = self.machines.get(name)
        try:
            if m is None or not m.connected:
                m = await self.machines.attach(name, files, QMP_TIMEOUT)
            status = await m.status()
        except (MonitorGone, OperationFailed) as e:
            if not machine.is_alive(row.pid, files):
                # read again: a concurrent observer may have recorded why it ended
                return await self._observe(self._row(name), locked)
            await self.machines.detach(name)
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
                stack.enter_context(self.locks.hold(name, Operation.STOP))
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

    async def _powerdown(self, name: str, row: VMRow, m: Machine, timeout: float) -> bool:
        """ACPI power button; True when the guest powered off within `timeout`."""
        files = self.files(name)
        try:
            if await m.status() != "running":
                await m.cont()  # a paused guest cannot react to ACPI
            await m.power_button()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not machine.is_alive(row.pid, files) or await m.status() == "shutdown":
                    return True
                await asyncio.sleep(0.1)
        except MonitorGone:
            return not machine.is_alive(row.pid, files)
        return False

    async def _quit(self, name: str, pid: int | None) -> None:
        """End QEMU: `quit` over QMP, SIGKILL if it is still there after QUIT_TIMEOUT."""
        files = self.files(name)
        m = self.machines.get(name)
        asked = False
        if m is not None:
            with contextlib.suppress(MonitorGone, OperationFailed):
                await m.quit()
                asked = True
        await self.machines.detach(name)
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
