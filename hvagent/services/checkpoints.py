"""Checkpoints of VMs: create (disks, plus memory when the VM runs), list as a tree,
revert, delete; and bringing interrupted checkpoint work to a known state after an
agent restart.

Two methods, chosen per checkpoint:
- internal: every disk is qcow2 -> qcow2 internal snapshots, taken and loaded by QEMU's
  `snapshot-save` / `snapshot-load` jobs (memory state inside the first disk), or by
  `qemu-img snapshot` for a stopped VM.
- external: a disk is raw, VHD or VHDX (which cannot hold snapshots), or the VM has no
  disk -> the disks are frozen and the VM continues on new qcow2 overlays (like Hyper-V's
  differencing disks), the memory goes to a state file (`migrate` to a file). After the
  first external checkpoint the VM's disks are qcow2 overlays, so later checkpoints are
  internal ones in those overlays. Frozen images and overlays live in
  `<storage_dir>/<vm>.checkpoints/` and are removed once no checkpoint and no disk of the
  VM needs them; the original images are never changed or removed.

Each checkpoint stores the VM spec of its moment (the device layout, hot-added devices
included). Revert starts QEMU from that spec with the guest paused (-S, hot-added
devices plugged again), loads the memory state, then continues; the VM's spec becomes
the checkpoint's. Long operations are jobs (hvagent.services.jobs) holding the VM's lock.
QEMU's side of each step is a hvagent.drivers.machine.Machine method; the rows are
hvagent.store.checkpoints'.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel

from hvagent.disk.errors import DiskError, ImageInUse
from hvagent.drivers import storage
from hvagent.drivers.cmdline import disk_node
from hvagent.drivers.machine import Machine
from hvagent.errors import Conflict, HVError, NotFound, OperationFailed
from hvagent.services.jobs import Job
from hvagent.services.metrics import OperationMetrics
from hvagent.spec import ACTIVE_STATES, DiskFormat, DiskSpec, VMSpec, VMState
from hvagent.store.checkpoints import CheckpointMethod, CheckpointRow, CheckpointStatus

if TYPE_CHECKING:
    from hvagent.services.vms import VMService

log = logging.getLogger(__name__)

Method = CheckpointMethod
# How a revert brought the checkpoint back: memory loaded into the running QEMU, a new
# QEMU started from the checkpoint's layout and memory, or the disks only (VM left off).
RevertHow = Literal["in-place", "restarted", "disk-only"]
MIGRATE_BANDWIDTH = 8 << 30  # bytes/s: writing memory to a local file, not a network


class Checkpoint(BaseModel):
    id: str
    vm: str
    name: str
    parent: str | None
    description: str
    created_at: float
    with_memory: bool
    method: Method
    status: str  # creating, ready, reverting, deleting
    current: bool  # the VM's state descends from this checkpoint
    spec: VMSpec


# image helpers (hvagent.drivers.storage, off the event loop)

T = TypeVar("T")


async def _offline(fn: Callable[..., T], *args: Any) -> T:
    """A storage driver call in a worker thread. Its refusal is the host failing the
    checkpoint (the request was valid), except an image that is in use."""
    try:
        return await asyncio.to_thread(fn, *args)
    except ImageInUse:
        raise
    except DiskError as e:
        raise OperationFailed(e.message) from None


async def _tags(path: str) -> set[str]:
    if not Path(path).exists():
        return set()
    return await _offline(storage.snapshot_tags, path)


async def _chain(path: str) -> list[str]:
    """The image and every backing file below it."""
    if not Path(path).exists():
        return []
    return [str(Path(i["filename"]).resolve())
            for i in await _offline(storage.backing_chain, path)]


async def _unsaveable(path: str) -> bool:
    """QEMU 7.2 saves no VM state while a VHD or VHDX image is open ("does not support
    live migration"), also as a backing file."""
    if not Path(path).exists():
        return False
    return any(i["format"] in (DiskFormat.VPC, DiskFormat.VHDX)
               for i in await _offline(storage.backing_chain, path))


# the service


class CheckpointService:
    def __init__(self, vms: VMService, metrics: OperationMetrics | None = None) -> None:
        self.vms = vms
        self.store = vms.store
        self.duration = (metrics or OperationMetrics()).checkpoint_duration
        vms.startup_hooks.append(self.recover)
        vms.delete_hooks.append(self._vm_deleted)

    # queries

    def checkpoints(self, vm: str) -> list[Checkpoint]:
        self._vm_spec(vm)
        head = self.store.checkpoints.head(vm)
        return [self._model(r, head) for r in self.store.checkpoints.for_vm(vm)]

    def get(self, vm: str, ref: str) -> Checkpoint:
        for c in self.checkpoints(vm):
            if ref in (c.id, c.name):
                return c
        raise NotFound(f"{vm}: no checkpoint {ref}")

    # operations (each returns the job doing it)

    async def create(self, vm: str, name: str | None = None, description: str = "") -> Job:
        info = await self.vms.get(vm)
        running = info.state in ACTIVE_STATES
        m = await self.vms.machine(vm) if running else None
        spec = info.spec
        if spec.pending_unplugs:
            raise Conflict(f"{vm}: pending_unplugs: a device removal is still pending; it "
                           "must complete (or the VM power-cycle) before a checkpoint")
        if not running and not spec.disks:
            raise Conflict(f"{vm}: a stopped VM without disks has nothing to checkpoint")
        method: Method = "internal" if spec.disks else "external"
        if any(d.format is not DiskFormat.QCOW2 for d in spec.disks):
            method = "external"
        elif method == "internal" and await self._unsaveable(spec, m):
            method = "external"
        existing = self.checkpoints(vm)
        name = name or f"ckpt-{len(existing) + 1}"
        if any(c.name == name for c in existing):
            raise Conflict(f"{vm}: a checkpoint named {name} already exists")
        cid = uuid.uuid4().hex[:12]
        self.vms.locks.acquire(vm, "checkpoint")
        try:
            self.store.checkpoints.add(CheckpointRow(
                id=cid, vm=vm, name=name, parent=self.store.checkpoints.head(vm),
                description=description, created_at=time.time(), with_memory=running,
                method=method, spec=spec, files={}, status=CheckpointStatus.CREATING))

            async def work(progress: Callable[[float], None]) -> Any:
                try:
                    if method == "internal":
                        await self._create_internal(vm, cid, spec, m, progress)
                    else:
                        await self._create_external(vm, cid, spec, m)
                except HVError:
                    # A failed checkpoint leaves nothing half-made: no row, no memory
                    # file, no snapshot (what an agent restart would undo, undone now).
                    await self._undo_create(vm, self.get(vm, cid), m)
                    raise
                self.store.checkpoints.set_status(cid, CheckpointStatus.READY)
                self.store.checkpoints.set_head(vm, cid)
                return self.get(vm, cid).model_dump(exclude={"spec"})

            return self._start_job("checkpoint-create", vm, work)
        except BaseException:
            self.vms.locks.release(vm)
            raise

    async def revert(self, vm: str, ref: str) -> Job:
        await self.vms.get(vm)
        cp = self.get(vm, ref)
        if cp.status != CheckpointStatus.READY:
            raise Conflict(f"{vm}: checkpoint {cp.name} is {cp.status}")
        self.vms.locks.acquire(vm, "revert")
        try:
            self.store.checkpoints.set_status(cp.id, CheckpointStatus.REVERTING)

            async def work(progress: Callable[[float], None]) -> Any:
                try:
                    state, how = await self._revert(vm, cp, progress)
                finally:
                    self.store.checkpoints.set_status(cp.id, CheckpointStatus.READY)
                return {"checkpoint": cp.id, "state": state, "how": how}

            return self._start_job("checkpoint-revert", vm, work)
        except BaseException:
            self.vms.locks.release(vm)
            raise

    async def delete(self, vm: str, ref: str) -> Job:
        info = await self.vms.get(vm)
        m = await self.vms.machine(vm) if info.state in ACTIVE_STATES else None
        cp = self.get(vm, ref)
        self.vms.locks.acquire(vm, "delete-checkpoint")
        try:
            self.store.checkpoints.set_status(cp.id, CheckpointStatus.DELETING)

            async def work(progress: Callable[[float], None]) -> Any:
                await self._delete(vm, cp, m)
                return {"checkpoint": cp.id, "deleted": True}

            return self._start_job("checkpoint-delete", vm, work)
        except BaseException:
            self.vms.locks.release(vm)
            raise

    # create

    @staticmethod
    async def _unsaveable(spec: VMSpec, m: Machine | None) -> bool:
        """Whether a disk keeps QEMU from saving the VM's state (a VHD/VHDX image in its
        chain). A running QEMU says which images it has open; else qemu-img."""
        if m is not None:
            unsaveable = (DiskFormat.VPC, DiskFormat.VHDX)
            return any(fmt in unsaveable for chain in await m.disk_formats(spec)
                       for fmt in chain)
        for d in spec.disks:
            assert d.path is not None
            if await _unsaveable(d.path):
                return True
        return False

    async def _create_internal(self, vm: str, cid: str, spec: VMSpec, m: Machine | None,
                               progress: Callable[[float], None]) -> None:
        if m is None:
            for i, d in enumerate(spec.disks):
                assert d.path is not None
                await _offline(storage.snapshot, d.path, "create", cid)
                progress((i + 1) / len(spec.disks))
            return
        await m.snapshot_save(cid, await m.disk_nodes(spec), f"save-{cid}", progress)

    async def _create_external(self, vm: str, cid: str, spec: VMSpec,
                               m: Machine | None) -> None:
        folder = self._folder(vm)
        folder.mkdir(parents=True, exist_ok=True)
        overlays = [str(folder / f"disk{i}-{cid}.qcow2") for i in range(len(spec.disks))]
        memory = str(folder / f"{cid}.vmstate") if m is not None else None
        resume = m is not None and await m.status() == "running"
        # Written first, so an interrupted creation can be undone (recover()).
        self.store.checkpoints.set_files(cid, {"overlays": overlays, "memory": memory,
                                               "resume": resume})
        new = self._on_overlays(spec, overlays)
        if m is None:
            for d, ov in zip(spec.disks, overlays, strict=True):
                assert d.path is not None and d.format is not None
                await _offline(storage.create_overlay, ov, d.path, d.format)
            self.vms.store.update_vm(vm, spec=new.model_dump_json())
            return
        assert memory is not None
        await m.pause()  # disks and memory from the same instant
        try:
            nodes = await m.disk_nodes(spec)
            for i, ov in enumerate(overlays):
                await m.snapshot_disk(nodes[i], ov, f"ov-{cid}-{i}")
            # From here on the VM writes to the overlays: the spec must say so.
            self.vms.store.update_vm(vm, spec=new.model_dump_json())
            for i, d in enumerate(spec.disks):
                assert d.path is not None
                if await _unsaveable(d.path):
                    # Copy the VHD/VHDX data up into the overlay and close the image, so
                    # that QEMU can save the memory; the image itself stays frozen.
                    await m.stream_into(f"ov-{cid}-{i}", f"stream-{cid}-{i}")
                    await m.remove_node(nodes[i])
            try:
                await m.save_memory(memory, MIGRATE_BANDWIDTH)
            except OperationFailed as e:
                # QEMU only sees its pipe break; say why when the file system is full.
                free = shutil.disk_usage(folder).free
                if free < 1 << 20:
                    raise OperationFailed(
                        f"{vm}: checkpoint memory state: no space left on device in "
                        f"{folder} ({free} bytes free)") from e
                raise
        finally:
            if resume:
                await m.cont()

    @staticmethod
    def _on_overlays(spec: VMSpec, overlays: list[str]) -> VMSpec:
        disks = [d.model_copy(update={"path": ov, "format": DiskFormat.QCOW2})
                 for d, ov in zip(spec.disks, overlays, strict=True)]
        return spec.model_copy(update={"disks": disks})

    # revert

    async def _revert(self, vm: str, cp: Checkpoint,
                      progress: Callable[[float], None]) -> tuple[str, RevertHow]:
        """Revert; returns the VM's state and how it got there (the job result says it,
        so that a client and the tests can tell an in-place load from a restart)."""
        row = self.store.get_vm(vm)
        if (row is not None and row.state in ACTIVE_STATES and cp.method == "internal"
                and cp.with_memory and self._vm_spec(vm) == cp.spec):
            # Same device layout as at the checkpoint: load into the running QEMU.
            try:
                return await self._load_in_place(vm, cp, progress), "in-place"
            except HVError as e:
                log.info("%s: loading %s in place failed (%s); restarting QEMU", vm,
                         cp.name, e.message)
        if row is not None and row.state in ACTIVE_STATES:
            await self.vms.end_qemu(vm)
            self.store.update_vm(vm, state=VMState.STOPPED, pid=None,
                                 last_error=f"reverting to checkpoint {cp.name}")
        progress(0.2)
        spec = cp.spec
        memory: str | None = None
        if cp.method == "external":
            files = self.store.checkpoints.files(cp.id)
            memory = files.get("memory")
            # A new overlay on the frozen images; the checkpoint's own stay untouched.
            folder = self._folder(vm)
            rid = uuid.uuid4().hex[:8]
            overlays = [str(folder / f"disk{i}-{cp.id}-r{rid}.qcow2")
                        for i in range(len(spec.disks))]
            for d, ov in zip(spec.disks, overlays, strict=True):
                assert d.path is not None and d.format is not None
                await _offline(storage.create_overlay, ov, d.path, d.format)
            spec = self._on_overlays(spec, overlays)
        elif not cp.with_memory:
            for d in spec.disks:
                assert d.path is not None
                await _offline(storage.snapshot, d.path, "apply", cp.id)
        self.store.update_vm(vm, spec=spec.model_dump_json())
        self.store.checkpoints.set_head(vm, cp.id)
        progress(0.4)
        if not cp.with_memory:  # the VM stays off (a running one was ended above)
            self.store.update_vm(vm, last_error=None)
            await self._collect(vm)
            return self._state(vm), "disk-only"
        extra = ("-incoming", "defer") if memory else ()
        pid = await self.vms.launch_paused(vm, spec, extra)
        try:
            m = self._attached(vm)
            if memory:
                await m.load_memory(memory)
            else:
                await m.snapshot_load(cp.id, await m.disk_nodes(spec), f"load-{cp.id}",
                                      lambda p: progress(0.4 + 0.5 * p))
            await m.cont()
        except BaseException:
            await self.vms.end_qemu(vm)
            self.store.update_vm(vm, state=VMState.STOPPED, pid=None,
                                 last_error=f"revert to checkpoint {cp.name} failed")
            raise
        self.store.update_vm(vm, state=VMState.RUNNING, pid=pid, last_error=None)
        await self._collect(vm)
        return VMState.RUNNING, "restarted"

    async def _load_in_place(self, vm: str, cp: Checkpoint,
                             progress: Callable[[float], None]) -> str:
        m = self._attached(vm)
        await m.snapshot_load(cp.id, await m.disk_nodes(cp.spec), f"load-{cp.id}", progress)
        if await m.status() != "running":
            await m.cont()
        self.store.checkpoints.set_head(vm, cp.id)
        self.store.update_vm(vm, state=VMState.RUNNING, last_error=None)
        return VMState.RUNNING

    def _attached(self, vm: str) -> Machine:
        m = self.vms.attached(vm)
        if m is None:
            raise OperationFailed(f"{vm}: no QMP connection")
        return m

    # delete

    async def _delete(self, vm: str, cp: Checkpoint, m: Machine | None) -> None:
        if cp.method == "internal":
            attached: dict[str, str] = {}
            if m is not None:
                spec = self._vm_spec(vm)
                roots = await m.disk_roots()
                for i, d in enumerate(spec.disks):
                    root = roots.get(disk_node(spec, i))
                    if d.path and root:
                        attached[d.path] = root["node-name"]
            live = []
            for d in cp.spec.disks:
                assert d.path is not None
                if cp.id not in await _tags(d.path):
                    continue
                if d.path in attached:
                    live.append(attached[d.path])
                else:
                    await _offline(storage.snapshot, d.path, "delete", cp.id)
            if live and m is not None:
                await m.snapshot_delete(cp.id, live, f"delete-{cp.id}")
        else:
            memory = self.store.checkpoints.files(cp.id).get("memory")
            if memory:
                Path(memory).unlink(missing_ok=True)
        self.store.checkpoints.remove_from_tree(cp.id, cp.parent)
        await self._collect(vm)

    async def _collect(self, vm: str) -> None:
        """Remove files in the VM's checkpoint folder no disk or checkpoint needs."""
        folder = self._folder(vm)
        if not folder.is_dir():
            return
        needed: set[str] = set()
        specs = [self._vm_spec(vm), *(c.spec for c in self.checkpoints(vm))]
        for s in specs:
            for d in s.disks:
                if d.path:
                    needed.update(await _chain(d.path))
        for c in self.store.checkpoints.for_vm(vm):
            if c.method == "external":
                memory = c.files.get("memory")
                if memory:
                    needed.add(str(Path(memory).resolve()))
        for f in folder.iterdir():
            if str(f.resolve()) not in needed:
                f.unlink(missing_ok=True)

    async def _vm_deleted(self, vm: str, keep_disks: bool) -> list[str]:
        """A VM is deleted: unless its disks are kept, its checkpoint files go too, and
        the agent-created disks its checkpoints hold (frozen under overlays)."""
        if keep_disks:
            return []
        current = {d.path for d in self._vm_spec(vm).disks if d.created}
        removed = []
        for c in self.checkpoints(vm):
            for d in c.spec.disks:
                if d.created and d.path and d.path not in current and Path(d.path).exists():
                    Path(d.path).unlink()
                    removed.append(d.path)
        folder = self._folder(vm)
        if folder.is_dir():
            removed += [str(f) for f in folder.iterdir() if str(f) not in current]
            shutil.rmtree(folder)
        return sorted(set(removed))

    # after an agent restart

    async def recover(self) -> None:
        """Bring checkpoint work an agent restart interrupted to a known state. The job
        itself is already failed (Jobs.recover): a half-made checkpoint is removed, an
        interrupted revert leaves the VM off with its disks at the checkpoint, an
        interrupted delete is finished."""
        for r in self.store.checkpoints.unfinished():
            vm, cid, status = r.vm, r.id, r.status
            try:
                with self.vms.locks.hold(vm, "recover-checkpoint"):
                    cp = self.get(vm, cid)
                    m = self._live_machine(vm)
                    if status == CheckpointStatus.CREATING:
                        await self._undo_create(vm, cp, m)
                    elif status == CheckpointStatus.REVERTING:
                        await self._undo_revert(vm, cp)
                    else:
                        await self._delete(vm, cp, m)
            except HVError as e:
                log.error("%s: checkpoint %s (%s) not recovered: %s", vm, cid, status,
                          e.message)

    def _live_machine(self, vm: str) -> Machine | None:
        row = self.store.get_vm(vm)
        return self.vms.attached(vm) if row and row.state in ACTIVE_STATES else None

    async def _undo_create(self, vm: str, cp: Checkpoint, m: Machine | None) -> None:
        log.warning("%s: removing checkpoint %s, its creation was interrupted", vm, cp.name)
        if m is not None:
            # QEMU outlives the agent: let its job end before touching its result.
            for job_id in await m.job_ids():
                if job_id.endswith(cp.id):
                    await m.finish_job(job_id)
        if cp.method == "external":
            files = self.store.checkpoints.files(cp.id)
            if m is not None:
                # Record the files QEMU really writes to, and let the guest go on.
                await m.cancel_memory_save()
                roots = await m.disk_roots()
                spec = self._vm_spec(vm)
                disks = []
                for i, d in enumerate(spec.disks):
                    root = roots.get(disk_node(spec, i))
                    if root and root["file"] in files.get("overlays", []):
                        d = DiskSpec.model_validate({**d.model_dump(), "path": root["file"],
                                                     "format": "qcow2"})
                    disks.append(d)
                self.store.update_vm(vm, spec=spec.model_copy(
                    update={"disks": disks}).model_dump_json())
                if files.get("resume") and await m.status() != "running":
                    await m.cont()
            if files.get("memory"):
                Path(files["memory"]).unlink(missing_ok=True)
            # The checkpoint goes; its frozen images stay under the disks (they are the
            # backing files of the overlays now in use).
            self.store.checkpoints.remove(cp.id)
            await self._collect(vm)
            return
        await self._delete(vm, cp, m)

    async def _undo_revert(self, vm: str, cp: Checkpoint) -> None:
        log.warning("%s: revert to %s was interrupted: leaving the VM off at the "
                    "checkpoint's disk state", vm, cp.name)
        row = self.store.get_vm(vm)
        if row is not None and row.state in ACTIVE_STATES:
            await self.vms.end_qemu(vm)
        disk_only = cp.model_copy(update={"with_memory": False})
        await self._revert(vm, disk_only, lambda p: None)
        # Off whatever was recorded before (running, or crashed: the restart saw the
        # QEMU the revert had ended).
        self.store.update_vm(vm, state=VMState.STOPPED, pid=None, last_error=(
            f"revert to checkpoint {cp.name} was interrupted by an agent restart: the VM "
            "is off, its disks are at the checkpoint"))
        self.store.checkpoints.set_status(cp.id, CheckpointStatus.READY)

    # helpers

    def _start_job(self, kind: str, vm: str, work: Any) -> Job:
        timer = self.duration.labels(operation=kind.removeprefix("checkpoint-"))

        async def timed(progress: Callable[[float], None]) -> Any:
            with timer.time():
                return await work(progress)

        return self.vms.jobs.start(kind, vm, timed, on_done=lambda: self.vms.locks.release(vm))

    def _state(self, vm: str) -> str:
        row = self.store.get_vm(vm)
        return row.state if row else "gone"

    def _vm_spec(self, vm: str) -> VMSpec:
        row = self.store.get_vm(vm)
        if row is None:
            raise NotFound(f"{vm}: no such VM")
        return VMSpec.model_validate_json(row.spec)

    def _folder(self, vm: str) -> Path:
        return self.vms.storage_dir / f"{vm}.checkpoints"

    @staticmethod
    def _model(r: CheckpointRow, head: str | None) -> Checkpoint:
        return Checkpoint(
            id=r.id, vm=r.vm, name=r.name, parent=r.parent, description=r.description,
            created_at=r.created_at, with_memory=r.with_memory, method=r.method,
            status=r.status, current=r.id == head, spec=r.spec)
