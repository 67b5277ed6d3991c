"""Who sends a request: a principal, and the one of the running request.

The principal of the running request is in the context variable `current_principal`
(set by hvagent.api.auth for each request), so the services need not pass it around; no
principal in context means the agent itself.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

ROOT = "root"  # the built-in principal of a uid-0 peer on the unix socket


@dataclass(frozen=True)
class Principal:
    """`root` (uid-0 peer on the unix socket) or a token's owner."""

    name: str
    token_id: str | None = None

    @property
    def is_root(self) -> bool:
        return self.name == ROOT and self.token_id is None


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None)
