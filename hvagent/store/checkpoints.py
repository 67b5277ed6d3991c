"""The `checkpoints` and `checkpoint_heads` tables: one row per checkpoint of a VM (its
place in the VM's tree, the VM spec of its moment, the files it made) and, per VM, the
checkpoint its current state descends from (hvagent.services.checkpoints uses them).

`spec` is stored as the VMSpec's JSON and `files` as a JSON object; both are read back
decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, cast

from hvagent.spec import VMSpec

if TYPE_CHECKING:
    from hvagent.store import Store


# internal: snapshots inside qcow2 images; external: frozen images under new overlays.
CheckpointMethod = Literal["internal", "external"]


class CheckpointStatus(StrEnum):
    CREATING = "creating"
    READY = "ready"
    REVERTING = "reverting"
    DELETING = "deleting"


@dataclass(frozen=True)
class CheckpointRow:
    id: str
    vm: str
    name: str
    parent: str | None
    description: str
    created_at: float
    with_memory: bool
    method: CheckpointMethod
    spec: VMSpec
    files: dict[str, Any]  # what an external checkpoint made: overlays, memory, resume
    status: CheckpointStatus


class CheckpointTable:
    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, row: CheckpointRow) -> None:
        self._store.execute(
            "INSERT INTO checkpoints (id, vm, name, parent, description, created_at, "
            "with_memory, method, spec, files, status) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (row.id, row.vm, row.name, row.parent, row.description, row.created_at,
             row.with_memory, row.method, row.spec.model_dump_json(), json.dumps(row.files),
             row.status))

    def for_vm(self, vm: str) -> list[CheckpointRow]:
        """The VM's checkpoints, oldest first."""
        rows = self._store.query(
            "SELECT * FROM checkpoints WHERE vm = ? ORDER BY created_at", (vm,))
        return [_row(r) for r in rows]

    def unfinished(self) -> list[CheckpointRow]:
        """Every checkpoint whose creation, revert or deletion has not ended."""
        rows = self._store.query("SELECT * FROM checkpoints WHERE status != ?",
                                 (CheckpointStatus.READY,))
        return [_row(r) for r in rows]

    def files(self, checkpoint: str) -> dict[str, Any]:
        rows = self._store.query("SELECT files FROM checkpoints WHERE id = ?", (checkpoint,))
        return json.loads(rows[0]["files"]) if rows else {}

    def set_status(self, checkpoint: str, status: CheckpointStatus) -> None:
        self._store.execute("UPDATE checkpoints SET status = ? WHERE id = ?",
                            (status, checkpoint))

    def set_files(self, checkpoint: str, files: dict[str, Any]) -> None:
        self._store.execute("UPDATE checkpoints SET files = ? WHERE id = ?",
                            (json.dumps(files), checkpoint))

    def remove(self, checkpoint: str) -> None:
        """The row only: for a checkpoint nothing hangs on (a creation undone)."""
        self._store.execute("DELETE FROM checkpoints WHERE id = ?", (checkpoint,))

    def remove_from_tree(self, checkpoint: str, parent: str | None) -> None:
        """Remove `checkpoint` (whose parent is `parent`): its children and a VM whose
        state descends from it hang on `parent` instead, so the tree stays whole."""
        with self._store.transaction() as tx:
            tx.execute("UPDATE checkpoints SET parent = ? WHERE parent = ?",
                       (parent, checkpoint))
            if parent is None:
                tx.execute("DELETE FROM checkpoint_heads WHERE checkpoint = ?", (checkpoint,))
            else:
                tx.execute("UPDATE checkpoint_heads SET checkpoint = ? WHERE checkpoint = ?",
                           (parent, checkpoint))
            tx.execute("DELETE FROM checkpoints WHERE id = ?", (checkpoint,))

    def head(self, vm: str) -> str | None:
        """The checkpoint the VM's current state descends from."""
        rows = self._store.query("SELECT checkpoint FROM checkpoint_heads WHERE vm = ?", (vm,))
        return str(rows[0]["checkpoint"]) if rows else None

    def set_head(self, vm: str, checkpoint: str) -> None:
        self._store.execute(
            "INSERT INTO checkpoint_heads (vm, checkpoint) VALUES (?, ?) "
            "ON CONFLICT(vm) DO UPDATE SET checkpoint = excluded.checkpoint", (vm, checkpoint))


def _row(r: Any) -> CheckpointRow:
    d = dict(r)
    return CheckpointRow(
        id=d["id"], vm=d["vm"], name=d["name"], parent=d["parent"],
        description=d["description"], created_at=d["created_at"],
        with_memory=bool(d["with_memory"]), method=cast(CheckpointMethod, d["method"]),
        spec=VMSpec.model_validate_json(d["spec"]), files=json.loads(d["files"] or "{}"),
        status=CheckpointStatus(d["status"]))
