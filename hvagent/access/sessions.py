"""Login sessions (Redfish SessionService): a client logs in once with a principal's
name and one of its API tokens as the password, and gets a session token to send as
`X-Auth-Token`. A session acts with its token's principal and grants; it ends on logout,
after `timeout` seconds without a request, or when its token stops being valid (revoked,
expired). Sessions live in memory: an agent restart logs everyone out, as a BMC reboot
does.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field

from hvagent.access.principal import Principal
from hvagent.access.tokens import Tokens, TokenStatus

DEFAULT_TIMEOUT = 1800  # seconds; Redfish's SessionTimeout range is 30..86400
MIN_TIMEOUT, MAX_TIMEOUT = 30, 86400
MAX_SESSIONS = 1000  # a login flood ends the oldest sessions, not the agent's memory


@dataclass
class Session:
    id: str
    principal: Principal
    created_at: float
    last_used: float = field(default=0.0)
    client: str = ""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Sessions:
    def __init__(self, tokens: Tokens, timeout: int = DEFAULT_TIMEOUT) -> None:
        self.tokens = tokens
        self.timeout = timeout
        self._by_hash: dict[str, Session] = {}
        self._lock = threading.Lock()

    def login(self, user: str, password: str, client: str = "") -> tuple[Session, str] | None:
        """A new session for `user` when `password` is a valid token of theirs."""
        principal = self.check_password(user, password)
        if principal is None:
            return None
        secret = "hvs_" + secrets.token_urlsafe(32)
        now = time.time()
        s = Session(id=secrets.token_hex(8), principal=principal, created_at=now,
                    last_used=now, client=client)
        with self._lock:
            self._expire(now)
            if len(self._by_hash) >= MAX_SESSIONS:
                oldest = min(self._by_hash, key=lambda h: self._by_hash[h].last_used)
                del self._by_hash[oldest]
            self._by_hash[_hash(secret)] = s
        return s, secret

    def check_password(self, user: str, password: str) -> Principal | None:
        """The principal `user` when `password` is one of its valid API tokens."""
        info = self.tokens.lookup(password)
        if info is None or info.principal != user or info.status() is not TokenStatus.VALID:
            return None
        return Principal(info.principal, info.id)

    def lookup(self, secret: str) -> Session | None:
        """The live session `secret` opens (its idle time restarts), None otherwise."""
        now = time.time()
        with self._lock:
            s = self._by_hash.get(_hash(secret))
            if s is None:
                return None
            if now - s.last_used > self.timeout or not self._token_valid(s):
                self._by_hash.pop(_hash(secret), None)
                return None
            s.last_used = now
            return s

    def list(self) -> list[Session]:
        with self._lock:
            self._expire(time.time())
            return sorted(self._by_hash.values(), key=lambda s: s.created_at)

    def get(self, session_id: str) -> Session | None:
        return next((s for s in self.list() if s.id == session_id), None)

    def logout(self, session_id: str) -> bool:
        with self._lock:
            for h, s in list(self._by_hash.items()):
                if s.id == session_id:
                    del self._by_hash[h]
                    return True
        return False

    def set_timeout(self, seconds: int) -> None:
        self.timeout = seconds

    def _token_valid(self, s: Session) -> bool:
        if s.principal.token_id is None:
            return True
        row = self.tokens.store.tokens.get(s.principal.token_id)
        return row is not None and row.revoked_at is None and (
            row.expires_at is None or row.expires_at > time.time())

    def _expire(self, now: float) -> None:
        for h, s in list(self._by_hash.items()):
            if now - s.last_used > self.timeout:
                del self._by_hash[h]


__all__ = ["DEFAULT_TIMEOUT", "MAX_TIMEOUT", "MIN_TIMEOUT", "Session", "Sessions",
           "TokenStatus"]
