"""The tables of access control: `tokens` (API tokens, by the sha256 of their string),
`acl` (grants made on the host with `hvagent token create --role`) and `vm_owners` (the
principal that created each VM). What the rows mean is hvagent.access's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvagent.store import Store


@dataclass(frozen=True)
class TokenRow:
    id: str
    principal: str
    hash: str
    comment: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class AclRow:
    path: str
    principal: str
    role: str
    propagate: bool


class TokenTable:
    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, row: TokenRow) -> None:
        """A new token; a revoked_at in `row` is not stored (see `revoke`)."""
        self._store.execute(
            "INSERT INTO tokens (id, principal, hash, comment, created_at, expires_at) "
            "VALUES (?,?,?,?,?,?)",
            (row.id, row.principal, row.hash, row.comment, row.created_at, row.expires_at))

    def list(self) -> list[TokenRow]:
        """Oldest first."""
        return [_token(r) for r in self._store.query("SELECT * FROM tokens ORDER BY created_at")]

    def get(self, token_id: str) -> TokenRow | None:
        rows = self._store.query("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return _token(rows[0]) if rows else None

    def by_hash(self, token_hash: str) -> TokenRow | None:
        rows = self._store.query("SELECT * FROM tokens WHERE hash = ?", (token_hash,))
        return _token(rows[0]) if rows else None

    def revoke(self, token_id: str, at: float) -> bool:
        """Mark the token revoked at `at`; False when there is no such token or it was
        revoked already (the first revocation's time stays)."""
        return self._store.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (at, token_id)) > 0


class AclTable:
    def __init__(self, store: Store) -> None:
        self._store = store

    def put(self, row: AclRow) -> None:
        """Add the grant; granting one that exists again changes nothing but its
        `propagate`."""
        self._store.execute(
            "INSERT OR REPLACE INTO acl (path, principal, role, propagate) VALUES (?,?,?,?)",
            (row.path, row.principal, row.role, int(row.propagate)))

    def list(self) -> list[AclRow]:
        """In the order they were granted."""
        return [AclRow(str(r["path"]), str(r["principal"]), str(r["role"]),
                       bool(r["propagate"]))
                for r in self._store.query("SELECT * FROM acl ORDER BY id")]


class OwnerTable:
    """Who created each VM; a row goes with its VM (ON DELETE CASCADE)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def set(self, vm: str, principal: str) -> None:
        self._store.execute("INSERT OR REPLACE INTO vm_owners (name, owner) VALUES (?,?)",
                            (vm, principal))

    def get(self, vm: str) -> str | None:
        rows = self._store.query("SELECT owner FROM vm_owners WHERE name = ?", (vm,))
        return str(rows[0][0]) if rows else None

    def vms_of(self, principal: str) -> list[str]:
        """The names of the VMs `principal` created, sorted."""
        return [str(r[0]) for r in self._store.query(
            "SELECT name FROM vm_owners WHERE owner = ? ORDER BY name", (principal,))]


def _time(value: object) -> float | None:
    """A timestamp column as read: None stays None; anything else that is not a finite
    number (a damaged row) becomes 0, which reads as long past: expiry and revocation
    fail closed."""
    if value is None:
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return 0.0


def _token(r: Any) -> TokenRow:
    return TokenRow(str(r["id"]), str(r["principal"]), str(r["hash"]), str(r["comment"] or ""),
                    _time(r["created_at"]) or 0.0, _time(r["expires_at"]),
                    _time(r["revoked_at"]))
