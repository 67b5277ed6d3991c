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
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from hvagent.disk.image import QEMU_IMG
from hvagent.drivers import machine
from hvagent.drivers.qmp import Monitor
from hvagent.errors import Conflict, HVError, NotFound, OperationFailed
from hvagent.services.devices import disk_node
from hvagent.services.jobs import Job
from hvagent.spec import DiskFormat, DiskSpec, VMSpec, VMState

if TYPE_CHECKING:
    from hvagent.services.vms import VMService

log = logging.getLogger(__name__)

Method = Literal["internal", "external"]
# How a revert brought the checkpoint back: memory loaded into the running QEMU, a new
# QEMU started from the checkpoint's layout and memory, or the disks only (VM left off).
RevertHow = Literal["in-place", "restarted", "disk-only"]
_ACTIVE = (VMState.RUNNING, VMState.PAUSED, VMState.UNRESPONSIVE)  # QEMU runs
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


# QEMU and qemu-img helpers


async def _qemu_job(mon: Monitor, cmd: str, job_id: str, args: dict[str, Any],
                    progress: Callable[[float], None] | None = None) -> None:
    """Run a QMP job command to its end; dismiss it; raise its error."""
    await mon.execute(cmd, {"job-id": job_id, **args})
    await _await_job(mon, job_id, progress)


async def _await_job(mon: Monitor, job_id: str,
                     progress: Callable[[float], None] | None = None) -> None:
    while True:
        job = next((j for j in await mon.execute("query-jobs") if j["id"] == job_id), None)
        if job is None:
            return
        if progress is not None and job.get("total-progress"):
            progress(job["current-progress"] / job["total-progress"])
        if job["status"] == "concluded":
            await mon.execute("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise OperationFailed(f"{job['type']}: {job['error']}")
            return
        await asyncio.sleep(0.02)


async def _migration_done(mon: Monitor) -> None:
    while True:
        status = (await mon.execute("query-migrate")).get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise OperationFailed(f"memory state transfer {status}")
        await asyncio.sleep(0.02)


async def _qemu_img(*args: str) -> str:
    rc, out, err = await machine._run(QEMU_IMG, *args)
    if rc != 0:
        raise OperationFailed(f"qemu-img {args[0]} {args[-1]}: {err.strip()}")
    return out


async def _tags(path: str) -> set[str]:
    if not Path(path).exists():
        return set()
    info = json.loads(await _qemu_img("info", "-U", "--output=json", path))
    return {s["name"] for s in info.get("snapshots", [])}


async def _chain(path: str) -> list[str]:
    """The image and every backing file below it."""
    if not Path(path).exists():
        return []
    out = await _qemu_img("info", "-U", "--backing-chain", "--output=json", path)
    return [str(Path(i["filename"]).resolve()) for i in json.loads(out)]


async def _unsaveable(path: str) -> bool:
    """QEMU 7.2 saves no VM state while a VHD or VHDX image is open ("does not support
    live migration"), also as a backing file."""
    if not Path(path).exists():
        return False
    out = await _qemu_img("info", "-U", "--backing-chain", "--output=json", path)
    return any(i["format"] in ("vpc", "vhdx") for i in json.loads(out))


async def _root_nodes(mon: Monitor) -> dict[str, dict[str, Any]]:
    """Device id -> the top block node QEMU has for it (changes with overlays)."""
    out = {}
    for b in await mon.execute("query-block"):
        qdev = str(b.get("qdev", ""))
        if qdev.startswith("/machine/peripheral/") and b.get("inserted"):
            out[qdev.split("/")[3]] = b["inserted"]
    return out


# the service


class CheckpointService:
    def __init__(self, vms: VMService) -> None:
        self.vms = vms
        vms.startup_hooks.append(self.recover)
        vms.delete_hooks.append(self._vm_deleted)

    @property
    def store(self) -> Any:
        return self.vms.store

    # queries

    def checkpoints(self, vm: str) -> list[Checkpoint]:
        self._vm_spec(vm)
        rows = self.store.query(
            "SELECT * FROM checkpoints WHERE vm = ? ORDER BY created_at", (vm,))
        head = self._head(vm)
        return [self._model(r, head) for r in rows]

    def get(self, vm: str, ref: str) -> Checkpoint:
        for c in self.checkpoints(vm):
            if ref in (c.id, c.name):
                return c
        raise NotFound(f"{vm}: no checkpoint {ref}")

    # operations (each returns the job doing it)

    async def create(self, vm: str, name: str | None = None, description: str = "") -> Job:
        info = await self.vms.get(vm)
        running = info.state in _ACTIVE
        mon = await self.vms.monitor(vm) if running else None
        spec = info.spec
        if spec.pending_unplugs:
            raise Conflict(f"{vm}: pending_unplugs: a device removal is still pending; it "
                           "must complete (or the VM power-cycle) before a checkpoint")
        if not running and not spec.disks:
            raise Conflict(f"{vm}: a stopped VM without disks has nothing to checkpoint")
        method: Method = "internal" if spec.disks else "external"
        for d in spec.disks:
            assert d.path is not None
            if d.format is not DiskFormat.QCOW2 or await _unsaveable(d.path):
                method = "external"
        existing = self.checkpoints(vm)
        name = name or f"ckpt-{len(existing) + 1}"
        if any(c.name == name for c in existing):
            raise Conflict(f"{vm}: a checkpoint named {name} already exists")
        cid = uuid.uuid4().hex[:12]
        self.vms.locks.acquire(vm, "checkpoint")
        try:
            self.store.execute(
                "INSERT INTO checkpoints (id, vm, name, parent, description, created_at, "
                "with_memory, method, spec, status) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (cid, vm, name, self._head(vm), description, time.time(), running, method,
                 spec.model_dump_json(), "creating"))

            async def work(progress: Callable[[float], None]) -> Any:
                try:
                    if method == "internal":
                        await self._create_internal(vm, cid, spec, mon, progress)
                    else:
                        await self._create_external(vm, cid, spec, mon)
                except HVError:
                    # A failed checkpoint leaves nothing half-made: no row, no memory
                    # file, no snapshot (what an agent restart would undo, undone now).
                    await self._undo_create(vm, self.get(vm, cid), mon)
                    raise
                self._set(cid, status="ready")
                self._set_head(vm, cid)
                return self.get(vm, cid).model_dump(exclude={"spec"})

            return self._start_job("checkpoint-create", vm, work)
        except BaseException:
            self.vms.locks.release(vm)
            raise

    async def revert(self, vm: str, ref: str) -> Job:
        await self.vms.get(vm)
        cp = self.get(vm, ref)
        if cp.status != "ready":
            raise Conflict(f"{vm}: checkpoint {cp.name} is {cp.status}")
        self.vms.locks.acquire(vm, "revert")
        try:
            self._set(cp.id, status="reverting")

            async def work(progress: Callable[[float], None]) -> Any:
                try:
                    state, how = await self._revert(vm, cp, progress)
                finally:
                    self._set(cp.id, status="ready")
                return {"checkpoint": cp.id, "state": state, "how": how}

            return self._start_job("checkpoint-revert", vm, work)
        except BaseException:
            self.vms.locks.release(vm)
            raise

    async def delete(self, vm: str, ref: str) -> Job:
        info = await self.vms.get(vm)
        mon = await self.vms.monitor(vm) if info.state in _ACTIVE else None
        cp = self.get(vm, ref)
        self.vms.locks.acquire(vm, "delete-checkpoint")
        try:
            self._set(cp.id, status="deleting")

            async def work(progress: Callable[[float], None]) -> Any:
                await self._delete(vm, cp, mon)
                return {"checkpoint": cp.id, "deleted": True}

            return self._start_job("checkpoint-delete", vm, work)
        except BaseException:
            self.vms.locks.release(vm)
            raise

    # create

    async def _create_internal(self, vm: str, cid: str, spec: VMSpec, mon: Monitor | None,
                               progress: Callable[[float], None]) -> None:
        if mon is None:
            for i, d in enumerate(spec.disks):
                assert d.path is not None
                await _qemu_img("snapshot", "-c", cid, d.path)
                progress((i + 1) / len(spec.disks))
            return
        roots = await _root_nodes(mon)
        nodes = [roots[disk_node(spec, i)]["node-name"] for i in range(len(spec.disks))]
        await _qemu_job(mon, "snapshot-save", f"save-{cid}",
                        {"tag": cid, "vmstate": nodes[0], "devices": nodes}, progress)

    async def _create_external(self, vm: str, cid: str, spec: VMSpec,
                               mon: Monitor | None) -> None:
        folder = self._folder(vm)
        folder.mkdir(parents=True, exist_ok=True)
        overlays = [str(folder / f"disk{i}-{cid}.qcow2") for i in range(len(spec.disks))]
        memory = str(folder / f"{cid}.vmstate") if mon is not None else None
        resume = mon is not None and await mon.status() == "running"
        # Written first, so an interrupted creation can be undone (recover()).
        self._set(cid, files=json.dumps({"overlays": overlays, "memory": memory,
                                         "resume": resume}))
        new = self._on_overlays(spec, overlays)
        if mon is None:
            for d, ov in zip(spec.disks, overlays, strict=True):
                assert d.path is not None and d.format is not None
                await _qemu_img("create", "-q", "-f", "qcow2", "-b", d.path, "-F",
                                str(d.format), ov)
            self.vms.store.update_vm(vm, spec=new.model_dump_json())
            return
        assert memory is not None
        await mon.execute("stop")  # disks and memory from the same instant
        try:
            roots = await _root_nodes(mon)
            for i, ov in enumerate(overlays):
                await mon.execute("blockdev-snapshot-sync", {
                    "node-name": roots[disk_node(spec, i)]["node-name"],
                    "snapshot-file": ov, "snapshot-node-name": f"ov-{cid}-{i}",
                    "format": "qcow2"})
            # From here on the VM writes to the overlays: the spec must say so.
            self.vms.store.update_vm(vm, spec=new.model_dump_json())
            for i, d in enumerate(spec.disks):
                assert d.path is not None
                if await _unsaveable(d.path):
                    # Copy the VHD/VHDX data up into the overlay and close the image, so
                    # that QEMU can save the memory; the image itself stays frozen.
                    await _qemu_job(mon, "block-stream", f"stream-{cid}-{i}",
                                    {"device": f"ov-{cid}-{i}", "auto-dismiss": False})
                    await mon.execute("blockdev-del",
                                      {"node-name": roots[disk_node(spec, i)]["node-name"]})
            await mon.execute("migrate-set-parameters", {"max-bandwidth": MIGRATE_BANDWIDTH})
            await mon.execute("migrate", {"uri": f"exec:cat > {shlex.quote(memory)}"})
            try:
                await _migration_done(mon)
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
                await mon.execute("cont")

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
        if (row is not None and row.state in _ACTIVE and cp.method == "internal"
                and cp.with_memory and self._vm_spec(vm) == cp.spec):
            # Same device layout as at the checkpoint: load into the running QEMU.
            try:
                return await self._load_in_place(vm, cp, progress), "in-place"
            except HVError as e:
                log.info("%s: loading %s in place failed (%s); restarting QEMU", vm,
                         cp.name, e.message)
        if row is not None and row.state in _ACTIVE:
            await self.vms.end_qemu(vm)
            self.store.update_vm(vm, state=VMState.STOPPED, pid=None,
                                 last_error=f"reverting to checkpoint {cp.name}")
        progress(0.2)
        spec = cp.spec
        memory: str | None = None
        if cp.method == "external":
            files = self._files(cp.id)
            memory = files.get("memory")
            # A new overlay on the frozen images; the checkpoint's own stay untouched.
            folder = self._folder(vm)
            rid = uuid.uuid4().hex[:8]
            overlays = [str(folder / f"disk{i}-{cp.id}-r{rid}.qcow2")
                        for i in range(len(spec.disks))]
            for d, ov in zip(spec.disks, overlays, strict=True):
                assert d.path is not None and d.format is not None
                await _qemu_img("create", "-q", "-f", "qcow2", "-b", d.path, "-F",
                                str(d.format), ov)
            spec = self._on_overlays(spec, overlays)
        elif not cp.with_memory:
            for d in spec.disks:
                assert d.path is not None
                await _qemu_img("snapshot", "-a", cp.id, d.path)
        self.store.update_vm(vm, spec=spec.model_dump_json())
        self._set_head(vm, cp.id)
        progress(0.4)
        if not cp.with_memory:  # the VM stays off (a running one was ended above)
            self.store.update_vm(vm, last_error=None)
            await self._collect(vm)
            return self._state(vm), "disk-only"
        extra = ("-incoming", "defer") if memory else ()
        pid = await self.vms.launch_paused(vm, spec, extra)
        try:
            mon = await self._monitor(vm)
            if memory:
                await mon.execute("migrate-incoming",
                                  {"uri": f"exec:cat {shlex.quote(memory)}"})
                await _migration_done(mon)
            else:
                roots = await _root_nodes(mon)
                nodes = [roots[disk_node(spec, i)]["node-name"] for i in range(len(spec.disks))]
                await _qemu_job(mon, "snapshot-load", f"load-{cp.id}",
                                {"tag": cp.id, "vmstate": nodes[0], "devices": nodes},
                                lambda p: progress(0.4 + 0.5 * p))
            await mon.execute("cont")
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
        mon = await self._monitor(vm)
        roots = await _root_nodes(mon)
        nodes = [roots[disk_node(cp.spec, i)]["node-name"] for i in range(len(cp.spec.disks))]
        await _qemu_job(mon, "snapshot-load", f"load-{cp.id}",
                        {"tag": cp.id, "vmstate": nodes[0], "devices": nodes}, progress)
        if await mon.status() != "running":
            await mon.execute("cont")
        self._set_head(vm, cp.id)
        self.store.update_vm(vm, state=VMState.RUNNING, last_error=None)
        return VMState.RUNNING

    async def _monitor(self, vm: str) -> Monitor:
        return self.vms._mon(vm)

    # delete

    async def _delete(self, vm: str, cp: Checkpoint, mon: Monitor | None) -> None:
        if cp.method == "internal":
            attached: dict[str, str] = {}
            if mon is not None:
                spec = self._vm_spec(vm)
                roots = await _root_nodes(mon)
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
                    await _qemu_img("snapshot", "-d", cp.id, d.path)
            if live and mon is not None:
                await _qemu_job(mon, "snapshot-delete", f"delete-{cp.id}",
                                {"tag": cp.id, "devices": live})
        else:
            memory = self._files(cp.id).get("memory")
            if memory:
                Path(memory).unlink(missing_ok=True)
        with self.store.transaction() as tx:
            # Children hang on the deleted checkpoint's parent; the tree stays whole.
            tx.execute("UPDATE checkpoints SET parent = ? WHERE parent = ?", (cp.parent, cp.id))
            if cp.parent is None:
                tx.execute("DELETE FROM checkpoint_heads WHERE checkpoint = ?", (cp.id,))
            else:
                tx.execute("UPDATE checkpoint_heads SET checkpoint = ? WHERE checkpoint = ?",
                           (cp.parent, cp.id))
            tx.execute("DELETE FROM checkpoints WHERE id = ?", (cp.id,))
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
        for c in self.checkpoints(vm):
            if c.method == "external":
                memory = self._files(c.id).get("memory")
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
        rows = self.store.query("SELECT id, vm, status FROM checkpoints WHERE status != ?",
                                ("ready",))
        for r in rows:
            vm, cid, status = r["vm"], r["id"], r["status"]
            try:
                with self.vms.locks.hold(vm, "recover-checkpoint"):
                    cp = self.get(vm, cid)
                    mon = await self._live_monitor(vm)
                    if status == "creating":
                        await self._undo_create(vm, cp, mon)
                    elif status == "reverting":
                        await self._undo_revert(vm, cp)
                    else:
                        await self._delete(vm, cp, mon)
            except HVError as e:
                log.error("%s: checkpoint %s (%s) not recovered: %s", vm, cid, status,
                          e.message)

    async def _live_monitor(self, vm: str) -> Monitor | None:
        row = self.store.get_vm(vm)
        return self.vms._monitors.get(vm) if row and row.state in _ACTIVE else None

    async def _undo_create(self, vm: str, cp: Checkpoint, mon: Monitor | None) -> None:
        log.warning("%s: removing checkpoint %s, its creation was interrupted", vm, cp.name)
        if mon is not None:
            # QEMU outlives the agent: let its job end before touching its result.
            for j in await mon.execute("query-jobs"):
                if j["id"].endswith(cp.id):
                    await _await_job(mon, j["id"])
        if cp.method == "external":
            files = self._files(cp.id)
            if mon is not None:
                # Record the files QEMU really writes to, and let the guest go on.
                status = (await mon.execute("query-migrate")).get("status")
                if status in ("active", "setup"):
                    await mon.execute("migrate_cancel")
                roots = await _root_nodes(mon)
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
                if files.get("resume") and await mon.status() != "running":
                    await mon.execute("cont")
            if files.get("memory"):
                Path(files["memory"]).unlink(missing_ok=True)
            # The checkpoint goes; its frozen images stay under the disks (they are the
            # backing files of the overlays now in use).
            self.store.execute("DELETE FROM checkpoints WHERE id = ?", (cp.id,))
            await self._collect(vm)
            return
        await self._delete(vm, cp, mon)

    async def _undo_revert(self, vm: str, cp: Checkpoint) -> None:
        log.warning("%s: revert to %s was interrupted: leaving the VM off at the "
                    "checkpoint's disk state", vm, cp.name)
        row = self.store.get_vm(vm)
        if row is not None and row.state in _ACTIVE:
            await self.vms.end_qemu(vm)
        disk_only = cp.model_copy(update={"with_memory": False})
        await self._revert(vm, disk_only, lambda p: None)
        # Off whatever was recorded before (running, or crashed: the restart saw the
        # QEMU the revert had ended).
        self.store.update_vm(vm, state=VMState.STOPPED, pid=None, last_error=(
            f"revert to checkpoint {cp.name} was interrupted by an agent restart: the VM "
            "is off, its disks are at the checkpoint"))
        self._set(cp.id, status="ready")

    # store

    def _start_job(self, kind: str, vm: str, work: Any) -> Job:
        return self.vms.jobs.start(kind, vm, work, on_done=lambda: self.vms.locks.release(vm))

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

    def _head(self, vm: str) -> str | None:
        rows = self.store.query("SELECT checkpoint FROM checkpoint_heads WHERE vm = ?", (vm,))
        return str(rows[0]["checkpoint"]) if rows else None

    def _set_head(self, vm: str, cid: str) -> None:
        self.store.execute("INSERT INTO checkpoint_heads (vm, checkpoint) VALUES (?, ?) "
                           "ON CONFLICT(vm) DO UPDATE SET checkpoint = excluded.checkpoint",
                           (vm, cid))

    def _set(self, cid: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.store.execute(f"UPDATE checkpoints SET {cols} WHERE id = ?",
                           (*fields.values(), cid))

    def _files(self, cid: str) -> dict[str, Any]:
        rows = self.store.query("SELECT files FROM checkpoints WHERE id = ?", (cid,))
        return json.loads(rows[0]["files"]) if rows else {}

    @staticmethod
    def _model(r: Any, head: str | None) -> Checkpoint:
        return Checkpoint(
            id=r["id"], vm=r["vm"], name=r["name"], parent=r["parent"],
            description=r["description"], created_at=r["created_at"],
            with_memory=bool(r["with_memory"]), method=r["method"], status=r["status"],
            current=r["id"] == head, spec=VMSpec.model_validate_json(r["spec"]))
