"""Every route of an app with its full path, routers included: what the access checks
(hvagent.api.auth) and the error declarations (hvagent.api.errors) walk."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def routes(app: Any) -> Iterator[tuple[str, Any]]:
    """(full path, route) for every route of `app`."""

    def walk(found: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for route in found:
            original = getattr(route, "original_router", None)
            if original is not None:  # FastAPI >= 0.13x includes routers lazily
                yield from walk(original.routes, prefix + route.include_context.prefix)
                continue
            yield prefix + getattr(route, "path", ""), route

    yield from walk(app.routes, "")
