"""The `audit` table: entries are only ever appended; nothing here changes or removes
one (hvagent.access.audit decides what is recorded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvagent.store import Store


@dataclass(frozen=True)
class AuditRow:
    id: int
    time: float
    principal: str
    action: str
    privilege: str | None
    target: str
    result: str
    status: int
    detail: str


class AuditTable:
    def __init__(self, store: Store) -> None:
        self._store = store

    def append(self, *, time: float, principal: str, action: str, privilege: str | None,
               target: str, result: str, status: int, detail: str = "") -> None:
        self._store.execute(
            "INSERT INTO audit (time, principal, action, privilege, target, result, status,"
            " detail) VALUES (?,?,?,?,?,?,?,?)",
            (time, principal, action, privilege, target, result, status, detail))

    def list(self, since: float = 0.0, limit: int = 1000) -> list[AuditRow]:
        """Entries at or after `since` (unix time), oldest first, at most `limit` (the
        newest ones when there are more)."""
        rows = self._store.query(
            "SELECT * FROM (SELECT * FROM audit WHERE time >= ? ORDER BY id DESC LIMIT ?)"
            " ORDER BY id", (since, limit))
        return [AuditRow(**dict(r)) for r in rows]
