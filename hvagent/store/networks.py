"""The `networks` table: one row per managed host network (hvagent.services.networks):
its spec as JSON, the number its bridges are named after (`hvn<num>`, stable for the
network's life and never reused while it exists), and whether the agent's
configuration declares it (a declared network is made at start and not deleted through
the API)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hvagent.netspec import NetworkSpec

if TYPE_CHECKING:
    from hvagent.store import Store


@dataclass(frozen=True)
class NetworkRow:
    name: str
    num: int
    spec: NetworkSpec
    declared: bool
    created_at: float


class NetworkTable:
    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, spec: NetworkSpec, declared: bool = False) -> NetworkRow:
        """Insert the network with the lowest free bridge number."""
        with self._store.transaction() as tx:
            used = {int(r[0]) for r in tx.execute("SELECT num FROM networks").fetchall()}
            num = next(i for i in range(len(used) + 1) if i not in used)
            tx.execute("INSERT INTO networks (name, num, spec, declared, created_at) "
                       "VALUES (?,?,?,?,?)",
                       (spec.name, num, spec.model_dump_json(), int(declared), time.time()))
        row = self.get(spec.name)
        assert row is not None
        return row

    def get(self, name: str) -> NetworkRow | None:
        rows = self._store.query("SELECT * FROM networks WHERE name = ?", (name,))
        return _row(rows[0]) if rows else None

    def list(self) -> list[NetworkRow]:
        return [_row(r) for r in self._store.query("SELECT * FROM networks ORDER BY name")]

    def update(self, name: str, spec: NetworkSpec, declared: bool) -> None:
        self._store.execute("UPDATE networks SET spec = ?, declared = ? WHERE name = ?",
                            (spec.model_dump_json(), int(declared), name))

    def delete(self, name: str) -> None:
        self._store.execute("DELETE FROM networks WHERE name = ?", (name,))


def _row(r: object) -> NetworkRow:
    return NetworkRow(name=r["name"], num=int(r["num"]),  # type: ignore[index]
                      spec=NetworkSpec.model_validate_json(r["spec"]),  # type: ignore[index]
                      declared=bool(r["declared"]),  # type: ignore[index]
                      created_at=float(r["created_at"]))  # type: ignore[index]
