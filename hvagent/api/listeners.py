"""How the agent listens: the unix socket (the peer's uid comes from SO_PEERCRED and
reaches the request as `scope["state"]["peer_uid"]`) and, when configured, an HTTPS-only
TCP listener (TLS 1.2+) serving the same app next to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from hvagent import tls
from hvagent.config import AgentConfig
from hvagent.errors import HVError, InvalidRequest

log = logging.getLogger("hvagent")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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
    return tls.ensure_server_cert(config.state_dir / "tls", t.hostnames)


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
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, int(port)), family=family, backlog=128)
    except OSError as e:
        raise HVError(f"tls.listen: cannot listen on {listen}: {e.strerror}") from e


class _FollowerServer(uvicorn.Server):
    """The TLS server: the unix-socket server owns signals and the app's lifespan."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(server: uvicorn.Server, unix_sock: socket.socket, config: AgentConfig) -> None:
    """Run `server` on the unix socket and, if configured, the same app over HTTPS."""
    if config.tls.listen is None:
        await server.serve(sockets=[unix_sock])
        return
    cert = server_cert(config)
    ctx = tls.server_context(cert.cert, cert.key)
    tcp = bind_tcp(config.tls.listen)
    cfg = uvicorn.Config(server.config.app, log_config=None, access_log=False,
                         lifespan="off", http=PeerCredProtocol)
    cfg.load()
    cfg.ssl = ctx
    follower = _FollowerServer(cfg)
    main = asyncio.create_task(server.serve(sockets=[unix_sock]))
    while not server.started and not main.done():
        await asyncio.sleep(0.05)
    if main.done():
        tcp.close()
        await main
        return
    if cert.ca is not None:
        log.info("TLS CA fingerprint (sha256) %s (%s)",
                 tls.fingerprint(Path(cert.ca).read_bytes()), cert.ca)
    log.info("listening on https://%s", config.tls.listen)
    second = asyncio.create_task(follower.serve(sockets=[tcp]))
    try:
        while not main.done():
            if server.should_exit or second.done():
                follower.should_exit = server.should_exit = True
            await asyncio.wait({main}, timeout=0.1)
    finally:
        follower.should_exit = True
        await asyncio.gather(second, return_exceptions=True)
        tcp.close()
    await main
