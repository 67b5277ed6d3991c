"""API tokens, ACL grants made on the host, and the creator (owner) of each VM: what
they mean (their rows are hvagent.store.access's).

A token is `hvt_<id>_<secret>`: the id names it in lists and revocation, the whole string
is shown once and stored only as its sha256 (enough for a 256-bit random secret; a slow
password hash would only add latency to every request). Every request looks its token up
again, so a revocation or an expiry takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

from hvagent.access.policy import AclEntry, HostPolicy
from hvagent.access.privileges import ADMINISTRATOR
from hvagent.errors import InvalidRequest, NotFound
from hvagent.store import Store
from hvagent.store.access import AclRow, TokenRow

PREFIX = "hvt_"
PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# The longest lifetime a token can have ("never" aside): far enough for any rotation
# policy, near enough that every expiry is a date clients and tools can show.
MAX_TTL_DAYS = 3650
# Who the host config's bootstrap token (AgentConfig.bootstrap_token_sha256) acts as.
BOOTSTRAP_PRINCIPAL = "admin"
BOOTSTRAP_COMMENT = "bootstrap (host config)"


class TokenStatus(StrEnum):
    VALID = "valid"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class TokenInfo:
    id: str
    principal: str
    comment: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def status(self, now: float | None = None) -> TokenStatus:
        if self.revoked_at is not None:
            return TokenStatus.REVOKED
        if self.expires_at is not None and self.expires_at <= (now or time.time()):
            return TokenStatus.EXPIRED
        return TokenStatus.VALID


def parse_duration(value: str, field: str = "expires") -> float | None:
    """Seconds from "90d", "12h", "30m", "3600" (1 s .. MAX_TTL_DAYS); "never" -> None.
    `field` names the setting in the error."""
    if value.strip().lower() == "never":
        return None
    m = _DURATION_RE.match(value.strip().lower())
    # A bounded digit count first: int() of a huge string is slow, and refused anyway.
    if not m or len(m.group(1)) > 12 or int(m.group(1)) == 0:
        raise InvalidRequest(f"{field}: {value!r} is not a duration (a positive number "
                             "with s, m, h, d or w; examples: 90d, 12h, never)")
    seconds = int(m.group(1)) * _SECONDS[m.group(2)]
    if seconds > MAX_TTL_DAYS * 86400:
        raise InvalidRequest(f"{field}: {value!r} is longer than the maximum "
                             f"{MAX_TTL_DAYS}d (or use never)")
    return float(seconds)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, store: Store) -> None:
        self.store = store

    # tokens

    def create(self, principal: str, ttl: float | None, comment: str = "") -> tuple[TokenInfo,
                                                                                     str]:
        """A new token for `principal`; returns it with its secret (shown once)."""
        if not PRINCIPAL_RE.match(principal):
            raise InvalidRequest(f"principal: {principal!r} is not a valid name "
                                 "(letters, digits, _ . @ -)")
        tid = secrets.token_hex(4)
        token = f"{PREFIX}{tid}_{secrets.token_urlsafe(32)}"
        now = time.time()
        expires = now + ttl if ttl is not None else None
        self.store.tokens.add(TokenRow(tid, principal, token_hash(token), comment, now,
                                       expires, None))
        return TokenInfo(tid, principal, comment, now, expires, None), token

    def bootstrap(self, sha256: str, policy: HostPolicy) -> TokenInfo | None:
        """The token of the host config (its hash only: the token is never on the host)
        for BOOTSTRAP_PRINCIPAL, no expiry, with the Administrator role on /. Made once:
        None when a token with this hash exists already (valid, expired or revoked: a
        revocation stands across restarts)."""
        if self.store.tokens.by_hash(sha256) is not None:
            return None
        # The grant first: a stop between the two leaves no token, so the next start
        # makes both again (granting twice changes nothing).
        self.grant(AclEntry(path="/", principal=BOOTSTRAP_PRINCIPAL, role=ADMINISTRATOR),
                   policy)
        now = time.time()
        tid = secrets.token_hex(4)
        self.store.tokens.add(TokenRow(tid, BOOTSTRAP_PRINCIPAL, sha256, BOOTSTRAP_COMMENT,
                                       now, None, None))
        return TokenInfo(tid, BOOTSTRAP_PRINCIPAL, BOOTSTRAP_COMMENT, now, None, None)

    def list_tokens(self) -> list[TokenInfo]:
        return [_info(r) for r in self.store.tokens.list()]

    def revoke(self, token_id: str) -> TokenInfo:
        changed = self.store.tokens.revoke(token_id, time.time())
        row = self.store.tokens.get(token_id)
        if row is None:
            raise NotFound(f"token {token_id}: no such token")
        if not changed:
            raise InvalidRequest(f"token {token_id}: already revoked")
        return _info(row)

    def lookup(self, token: str) -> TokenInfo | None:
        """The token a bearer string names (in any status), None when unknown."""
        # Any string is looked up by its hash: a bootstrap token (see `bootstrap`) is
        # chosen off the host and need not have the hvt_ form.
        row = self.store.tokens.by_hash(token_hash(token))
        return _info(row) if row is not None else None

    # ACL grants made with `hvagent token create --role` (the policy file holds the rest)

    def grant(self, entry: AclEntry, policy: HostPolicy) -> None:
        if policy.role(entry.role) is None:
            raise InvalidRequest(f"role: unknown role {entry.role!r}")
        self.store.acl.put(AclRow(entry.path, entry.principal, entry.role, entry.propagate))

    def grants(self) -> list[AclEntry]:
        return [AclEntry(path=r.path, principal=r.principal, role=r.role,
                         propagate=r.propagate) for r in self.store.acl.list()]

    # VM owners (the VMCreator role acts on the VMs its principal created)

    def set_owner(self, vm: str, principal: str) -> None:
        self.store.owners.set(vm, principal)

    def owner(self, vm: str) -> str | None:
        return self.store.owners.get(vm)

    def owned_by(self, principal: str) -> list[str]:
        return self.store.owners.vms_of(principal)


def _info(r: TokenRow) -> TokenInfo:
    return TokenInfo(r.id, r.principal, r.comment, r.created_at, r.expires_at, r.revoked_at)
