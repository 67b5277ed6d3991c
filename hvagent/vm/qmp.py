"""The QMP driver: one long-lived qemu.qmp connection per running VM.

The agent holds the connection (QEMU's QMP socket serves one client at a time) and
hands guest events and the loss of the connection to callbacks, so the service notices
a guest power-off or a QEMU that died without being polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from hvagent.errors import OperationFailed

log = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]


class MonitorGone(OperationFailed):
    """The QMP connection is closed (QEMU exited or is exiting)."""


class Monitor:
    def __init__(self, name: str, on_event: EventCallback | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.name = name
        self._client = QMPClient(name)
        self._on_event = on_event
        self._on_lost = on_lost
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def connect(self, path: Path, timeout: float = 10.0) -> None:
        """Connect, retrying while QEMU is still creating its socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self._client.connect(str(path))
                break
            except ConnectError as e:
                if loop.time() >= deadline:
                    raise OperationFailed(
                        f"{self.name}: cannot connect to QMP at {path}: {e}") from e
                await asyncio.sleep(0.05)
        self._tasks = [
            asyncio.create_task(self._watch_events()),
            asyncio.create_task(self._watch_connection()),
        ]

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(cmd, args)
        except ExecuteError as e:
            raise OperationFailed(f"{self.name}: {cmd}: {e}") from e  # str(e) is QEMU's desc
        except (QMPError, EOFError, OSError) as e:  # disconnected, before or during
            raise MonitorGone(f"{self.name}: QMP connection lost during {cmd}") from e

    async def status(self) -> str:
        """QEMU's run state: running, paused, shutdown, internal-error, ..."""
        return str((await self.execute("query-status"))["status"])

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _watch_events(self) -> None:
        async for event in self._client.events:
            if self._on_event is not None:
                data = event.get("data")
                self._on_event(str(event["event"]), data if isinstance(data, dict) else {})

    async def _watch_connection(self) -> None:
        while True:
            state = await self._client.runstate_changed()
            if state.name == "DISCONNECTING":
                break
        if not self._closing and self._on_lost is not None:
            self._on_lost()
