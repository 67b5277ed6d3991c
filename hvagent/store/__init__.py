"""The agent's SQLite database: the connection, the schema migrations, and every SQL
statement the agent runs, behind typed methods. Nothing outside this package writes SQL.

How the package is laid out (follow it when a table moves in or is added):
- This module holds the connection (`Store`: one per agent, a lock for worker threads,
  `transaction()`), MIGRATIONS, and the `vms` table, whose methods are Store's own
  (`insert_vm`, `get_vm`, `list_vms`, `update_vm`, `delete_vm`): every area refers to VMs.
- Every other area's tables live in one module of this package as a small table class
  that takes the Store and runs its statements through `store.query`, `store.execute` and
  `store.transaction`: store/jobs.py (`JobTable`), store/access.py (`TokenTable`,
  `AclTable`, `OwnerTable`), store/audit.py (`AuditTable`), store/checkpoints.py
  (`CheckpointTable`), store/networks.py (`NetworkTable`). The Store hangs one instance
  of each off itself, named after the table (`store.jobs.get(job_id)`,
  `store.tokens.add(...)`): a new area is a new module and one line in `Store.__init__`.
- Table classes take and return plain typed values and frozen row dataclasses defined
  next to them (`JobRow`, `TokenRow`, ...), never sqlite3 rows; JSON columns are encoded
  and decoded here. The models of the layers above (a job as the API shows it, a
  token's status) are built from those rows up there.
- The schema of every table is in MIGRATIONS below, in one place, whatever module owns
  the statements: each entry runs once, in order, and PRAGMA user_version records how
  many ran. Never edit an entry that has shipped; append a new one, and keep the
  database dump of the schema before it (tests/fixtures/make_store_dump.py).

A file that is not a usable database, or one a newer agent migrated further than
MIGRATIONS goes, is refused with one line before anything writes to it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvagent.errors import OperationFailed
from hvagent.store.access import AclTable, OwnerTable, TokenTable
from hvagent.store.audit import AuditTable
from hvagent.store.checkpoints import CheckpointTable
from hvagent.store.jobs import JobTable
from hvagent.store.networks import NetworkTable

MIGRATIONS: list[str] = [
    # 1: VMs
    """
    CREATE TABLE vms (
        name       TEXT PRIMARY KEY,
        spec       TEXT NOT NULL,
        state      TEXT NOT NULL,
        pid        INTEGER,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 2: jobs (hvagent.store.jobs)
    """
    CREATE TABLE jobs (
        id          TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        target      TEXT NOT NULL,
        status      TEXT NOT NULL,
        progress    REAL NOT NULL DEFAULT 0,
        error       TEXT,
        result      TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX jobs_target ON jobs(target);
    """,
    # 3: access control and audit (hvagent.store.access, hvagent.store.audit)
    """
    CREATE TABLE tokens (
        id         TEXT PRIMARY KEY,
        principal  TEXT NOT NULL,
        hash       TEXT NOT NULL UNIQUE,
        comment    TEXT,
        created_at REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL
    );
    CREATE TABLE acl (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        path      TEXT NOT NULL,
        principal TEXT NOT NULL,
        role      TEXT NOT NULL,
        propagate INTEGER NOT NULL DEFAULT 1,
        UNIQUE (path, principal, role)
    );
    CREATE TABLE vm_owners (
        name  TEXT PRIMARY KEY REFERENCES vms(name) ON DELETE CASCADE,
        owner TEXT NOT NULL
    );
    CREATE TABLE audit (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        time      REAL NOT NULL,
        principal TEXT NOT NULL,
        action    TEXT NOT NULL,
        privilege TEXT,
        target    TEXT NOT NULL,
        result    TEXT NOT NULL,
        status    INTEGER NOT NULL,
        detail    TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_time ON audit(time);
    """,
    # 4: checkpoints (hvagent.store.checkpoints)
    """
    CREATE TABLE checkpoints (
        id          TEXT PRIMARY KEY,
        vm          TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        parent      TEXT,
        description TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL,
        with_memory INTEGER NOT NULL,
        method      TEXT NOT NULL,
        spec        TEXT NOT NULL,
        files       TEXT NOT NULL DEFAULT '{}',
        status      TEXT NOT NULL,
        UNIQUE (vm, name)
    );
    CREATE TABLE checkpoint_heads (
        vm         TEXT PRIMARY KEY REFERENCES vms(name) ON DELETE CASCADE,
        checkpoint TEXT NOT NULL
    );
    """,
    # 5: managed networks (hvagent.store.networks)
    """
    CREATE TABLE networks (
        name       TEXT PRIMARY KEY,
        num        INTEGER NOT NULL UNIQUE,
        spec       TEXT NOT NULL,
        declared   INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    """,
]


class DatabaseError(OperationFailed):
    """The database file cannot be used (damaged, not a database, or too new)."""


def _check_before_open(path: Path) -> None:
    """Refuse, read-only, what must not be written to: a non-file, a damaged file, a
    schema newer than this code knows."""
    if not path.exists():
        return
    if not path.is_file():
        raise DatabaseError(f"{path}: not a database file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise DatabaseError(f"{path}: not a usable agent database: {e}") from e
    if version > len(MIGRATIONS):
        raise DatabaseError(
            f"{path}: written by a newer hvagent (schema version {version}; this one knows "
            f"up to {len(MIGRATIONS)}): refusing to open it; run the newer hvagent")


@dataclass
class VMRow:
    name: str
    spec: str  # JSON of hvagent.spec.VMSpec
    state: str
    pid: int | None
    last_error: str | None
    created_at: float
    updated_at: float


class Store:
    """One connection shared by the agent; a lock keeps writes from worker threads safe."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        _check_before_open(Path(path))
        try:
            self.conn = sqlite3.connect(self.path, check_same_thread=False,
                                        isolation_level=None)
        except sqlite3.Error as e:
            raise DatabaseError(f"{path}: cannot open: {e}") from e
        try:
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            # A truncated or damaged file can still open; its first real read would fail.
            check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise DatabaseError(f"{path}: damaged database: {check}")
            self.migrate()
        except sqlite3.Error as e:
            self.conn.close()
            raise DatabaseError(f"{path}: not a usable agent database: {e}") from e
        except BaseException:
            self.conn.close()
            raise
        self.jobs = JobTable(self)
        self.tokens = TokenTable(self)
        self.acl = AclTable(self)
        self.owners = OwnerTable(self)
        self.audit = AuditTable(self)
        self.checkpoints = CheckpointTable(self)
        self.networks = NetworkTable(self)

    def close(self) -> None:
        self.conn.close()

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        with self._lock:
            for version in range(self.schema_version, len(MIGRATIONS)):
                with self.transaction() as c:
                    c.executescript_in_tx(MIGRATIONS[version])
                    c.execute(f"PRAGMA user_version = {version + 1}")

    @contextmanager
    def transaction(self) -> Iterator[_Tx]:
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self.conn)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self.conn.execute(sql, args))

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        """One statement in its own transaction; returns the number of changed rows."""
        with self.transaction() as c:
            return c.execute(sql, args).rowcount

    # VMs

    def insert_vm(self, name: str, spec_json: str, state: str) -> None:
        now = time.time()
        self.execute(
            "INSERT INTO vms (name, spec, state, created_at, updated_at) VALUES (?,?,?,?,?)",
            (name, spec_json, state, now, now),
        )

    def get_vm(self, name: str) -> VMRow | None:
        rows = self.query("SELECT * FROM vms WHERE name = ?", (name,))
        return VMRow(**dict(rows[0])) if rows else None

    def list_vms(self, owned_by: str | None = None) -> list[VMRow]:
        """All VMs by name, or those the principal `owned_by` created (vm_owners)."""
        if owned_by is None:
            rows = self.query("SELECT * FROM vms ORDER BY name")
        else:
            rows = self.query("SELECT v.* FROM vms v JOIN vm_owners o ON o.name = v.name "
                              "WHERE o.owner = ? ORDER BY v.name", (owned_by,))
        return [VMRow(**dict(r)) for r in rows]

    def update_vm(self, name: str, **fields: Any) -> None:
        allowed = {"spec", "state", "pid", "last_error"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown VM fields: {sorted(unknown)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.execute(
            f"UPDATE vms SET {cols}, updated_at = ? WHERE name = ?",
            (*fields.values(), time.time(), name),
        )

    def delete_vm(self, name: str) -> None:
        self.execute("DELETE FROM vms WHERE name = ?", (name,))


class _Tx:
    """The statements of one open transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, args)

    def executescript_in_tx(self, script: str) -> None:
        # sqlite3.executescript() would COMMIT first; run statement by statement instead.
        for stmt in script.split(";"):
            if stmt.strip():
                self._conn.execute(stmt)
