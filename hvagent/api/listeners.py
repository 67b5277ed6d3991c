"""How the agent listens: the unix socket (the peer's uid comes from SO_PEERCRED and
reaches the request as `scope["state"]["peer_uid"]`) and, when configured, an HTTPS-only
TCP listener (TLS 1.2+) serving the same app next to it; and how the agent stops: within
a bound, whatever is stuck."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from hvagent.api import tls
from hvagent.config import AgentConfig, parse_listen
from hvagent.drivers.qmp import QMP_TIMEOUT
from hvagent.errors import HVError, InvalidRequest

log = logging.getLogger("hvagent")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# On SIGTERM/SIGINT: requests get SHUTDOWN_GRACE seconds to finish (then they are
# cancelled), detaching from the VMs as long again; past EXIT_DEADLINE a watchdog ends
# the process, whatever is stuck (a thread in a system call cannot be cancelled). The
# grace outlasts one QMP deadline, so a request waiting on a silent monitor still gets
# its answer (the VM is unresponsive) before the agent exits.
SHUTDOWN_GRACE = int(QMP_TIMEOUT) + 5
EXIT_DEADLINE = 3 * SHUTDOWN_GRACE


class AgentServer(uvicorn.Server):
    """uvicorn's server whose exit on a signal is bounded by EXIT_DEADLINE."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            timer = threading.Timer(EXIT_DEADLINE, _force_exit, (sig,))
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def _force_exit(sig: int) -> None:
    log.error("shutdown did not finish within %ds of signal %d: exiting now",
              EXIT_DEADLINE, sig)
    os._exit(1)


class PeerCredProtocol(H11Protocol):
    """uvicorn's h11 protocol that records the peer's uid of a unix-socket connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        uid = None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
        # app_state is copied into every request's scope["state"]: one copy per connection.
        self.app_state = {**self.app_state, "peer_uid": uid}


def server_cert(config: AgentConfig) -> tls.ServerCert:
    t = config.tls
    if (t.cert is None) != (t.key is None):
        raise InvalidRequest("tls: give both cert and key, or neither")
    if t.cert is not None and t.key is not None:
        return tls.ServerCert(t.cert, t.key, None)
    try:
        return tls.ensure_server_cert(config.state_dir / "tls", t.hostnames)
    except (OSError, ValueError) as e:  # unwritable, or a damaged certificate or key
        raise InvalidRequest(f"tls: {config.state_dir / 'tls'}: cannot use the agent's "
                             f"CA and certificate: {getattr(e, 'strerror', None) or e}") from e


def add_ca_route(app: FastAPI, config: AgentConfig) -> None:
    """GET /ca.pem: the CA certificate (public) that hvctl checks against its pinned
    fingerprint before trusting it."""

    @app.get("/ca.pem", include_in_schema=False)
    async def ca_pem() -> Response:
        ca = config.state_dir / "tls" / "ca.pem"
        if config.tls.cert is not None or not ca.exists():
            return Response("no agent-made CA\n", status_code=404, media_type="text/plain")
        return Response(ca.read_bytes(), media_type="application/x-pem-file")


def bind_tcp(listen: str) -> socket.socket:
    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        raise InvalidRequest(f"tls.listen: {e}") from e
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except (OSError, OverflowError, ValueError) as e:  # in use, no such address/name
        errno = getattr(e, "errno", None)
        reason = os.strerror(errno) if isinstance(e, OSError) and errno else str(e)
        raise HVError(f"tls.listen: cannot listen on {listen}: {reason}") from e
    # Accepted connections inherit it. Without it a TLS answer written as two records
    # (headers, then body) waits for the client's delayed ACK: ~40 ms per request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _FollowerServer(uvicorn.Server):
    """The TLS server: the unix-socket server owns signals and the app's lifespan."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def notify_ready() -> None:
    """Tell systemd the agent serves (sd_notify READY=1; the unit is Type=notify), so
    `hvagent.service` is active only once its sockets answer. Outside systemd: nothing."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(b"READY=1\nSTATUS=serving")
    except OSError as e:
        log.warning("cannot tell systemd the agent is ready (%s): %s", addr, e.strerror)


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> bool:
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    return server.started


async def serve(server: uvicorn.Server, unix_sock: socket.socket, config: AgentConfig,
                tcp: socket.socket | None = None) -> None:
    """Run `server` on the unix socket and, if configured, the same app over HTTPS (on
    `tcp` when the caller bound it already); systemd hears READY once both serve."""
    if config.tls.listen is None:
        main = asyncio.create_task(server.serve(sockets=[unix_sock]))
        if await _started(server, main):
            notify_ready()
        await main
        return
    if tcp is None:
        tcp = bind_tcp(config.tls.listen)
    try:
        cert = server_cert(config)
        ctx = tls.server_context(cert.cert, cert.key)
    except BaseException:
        tcp.close()
        raise
    cfg = uvicorn.Config(server.config.app, log_config=None, access_log=False,
                         lifespan="off", http=PeerCredProtocol,
                         timeout_graceful_shutdown=SHUTDOWN_GRACE)
    cfg.load()
    cfg.ssl = ctx
    follower = _FollowerServer(cfg)
    main = asyncio.create_task(server.serve(sockets=[unix_sock]))
    if not await _started(server, main):
        tcp.close()
        await main
        return
    if cert.ca is not None:
        log.info("TLS CA fingerprint (sha256) %s (%s)",
                 tls.fingerprint(Path(cert.ca).read_bytes()), cert.ca)
    log.info("listening on https://%s", config.tls.listen)
    second = asyncio.create_task(follower.serve(sockets=[tcp]))
    try:
        if await _started(follower, second):
            notify_ready()
        while not main.done():
            if server.should_exit or second.done():
                follower.should_exit = server.should_exit = True
            await asyncio.wait({main}, timeout=0.1)
    finally:
        follower.should_exit = True
        await asyncio.gather(second, return_exceptions=True)
        tcp.close()
    await main
