"""The QMP driver: one long-lived qemu.qmp connection per running VM.

The agent holds the connection (QEMU's QMP socket serves one client at a time) and
hands guest events and the loss of the connection to callbacks, so the service notices
a guest power-off or a QEMU that died without being polled.

Every connect and every command has a deadline (QMP_TIMEOUT): a monitor that does not
answer (another client holds the socket, QEMU is stopped or wedged) raises
MonitorUnresponsive instead of blocking the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from hvagent.errors import Conflict, OperationFailed

log = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]

# QEMU answers a command in milliseconds (long work runs as jobs with events), so a
# monitor silent this long is not going to answer: the one deadline for QMP. Generous,
# because a TCG host under load can stall a healthy QEMU for seconds.
QMP_TIMEOUT = 15.0
# A QEMU just launched (TCG, a loaded host) may take longer to serve its first client.
LAUNCH_QMP_TIMEOUT = 4 * QMP_TIMEOUT
# How QEMU words a refused image lock ('Failed to get "write" lock', '... "consistent
# read" lock').
_IMAGE_LOCKED = 'Failed to get "'


class MonitorGone(OperationFailed):
    """The QMP connection is closed (QEMU exited or is exiting)."""


class MonitorUnresponsive(OperationFailed):
    """QEMU's monitor did not answer within QMP_TIMEOUT (the process may still run)."""


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

    async def connect(self, path: Path, timeout: float = QMP_TIMEOUT) -> None:
        """Connect, retrying while QEMU is still creating its socket; at most `timeout`
        seconds in all (QEMU's chardev serves one client: while another holds it, our
        connection is queued and no greeting ever comes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await asyncio.wait_for(self._client.connect(str(path)),
                                       max(deadline - loop.time(), 0.01))
                break
            except TimeoutError as e:
                await self._reset()
                raise MonitorUnresponsive(
                    f"{self.name}: QMP at {path} did not answer within {timeout:g}s "
                    "(another client may hold the monitor, or QEMU is stuck)") from e
            except ConnectError as e:
                if loop.time() >= deadline:
                    raise OperationFailed(
                        f"{self.name}: cannot connect to QMP at {path}: {e}") from e
                await asyncio.sleep(0.05)
        self._tasks = [
            asyncio.create_task(self._watch_events()),
            asyncio.create_task(self._watch_connection()),
        ]

    async def command(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = QMP_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(cmd, args), timeout)
        except TimeoutError as e:
            # The connection stays: a late answer is dropped by its unknown id.
            raise MonitorUnresponsive(
                f"{self.name}: QMP did not answer {cmd} within {timeout:g}s") from e
        except ExecuteError as e:  # str(e) is QEMU's desc
            if _IMAGE_LOCKED in str(e):
                # An image another process holds (QEMU's image locking): the state of the
                # host, not a failure of it.
                raise Conflict(f"{self.name}: {cmd}: {e}: the image is in use by another "
                               "process") from e
            raise OperationFailed(f"{self.name}: {cmd}: {e}") from e
        except (QMPError, EOFError, OSError) as e:  # disconnected, before or during
            raise MonitorGone(f"{self.name}: QMP connection lost during {cmd}") from e

    async def status(self) -> str:
        """QEMU's run state: running, paused, shutdown, internal-error, ..."""
        return str((await self.command("query-status"))["status"])

    async def close(self) -> None:
        """Disconnect; bounded, as a stuck QEMU may never read what is still queued."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await self._reset()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, QMP_TIMEOUT)

    async def _reset(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), QMP_TIMEOUT)

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


# One-shot commands for a QEMU this process did not launch through the agent (the image
# builder's test boots): a short synchronous connection, no event handling. False when
# there is no monitor to talk to, which means QEMU is already going away.


def _once(path: Path, command: str) -> bool:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    try:
        mon = QEMUMonitorProtocol(str(path))
        mon.connect()
        try:
            mon.cmd(command)
        finally:
            mon.close()
        return True
    except Exception:  # any failure to reach the monitor means QEMU is ending
        return False


def press_power_button(path: Path) -> bool:
    """ACPI power button (the guest shuts itself down)."""
    return _once(path, "system_powerdown")


def quit_now(path: Path) -> bool:
    """End QEMU at once, as a host pulling the plug would."""
    return _once(path, "quit")
