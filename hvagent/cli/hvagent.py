"""`hvagent serve`: the agent daemon (REST API on a unix socket for root and group
hvagent, plus HTTPS when configured); `hvagent token`: API tokens."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import grp
import logging
import os
import socket
import sys
from pathlib import Path

import uvicorn

from hvagent.api import listeners
from hvagent.api.app import create_app
from hvagent.cli import token_cmd
from hvagent.config import AgentConfig, load_config
from hvagent.errors import HVError
from hvagent.store import Store

log = logging.getLogger("hvagent")


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket for root and group hvagent (0660; 0600 if the group does
    not exist). Peers other than uid 0 still need a token (hvagent.api.auth)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a previous agent
        else:
            raise HVError(f"{path}: another agent is already listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no window in which the socket is group/world accessible
    try:
        sock.bind(str(path))
    except OSError as e:  # e.g. a path longer than a unix socket address allows
        sock.close()
        raise HVError(f"listen: {path}: cannot listen: {e.strerror or e}") from e
    finally:
        os.umask(old)
    try:
        os.chown(path, -1, grp.getgrnam("hvagent").gr_gid)
        os.chmod(path, 0o660)
    except KeyError:
        pass  # no hvagent group on this machine: root only
    sock.listen(128)
    return sock


def lock_state_dir(state_dir: Path) -> int:
    """Hold state_dir/hvagent.lock (flock) for the life of the process; returns its fd.
    Two agents on one state directory would fight over every VM's QMP socket."""
    path = state_dir / "hvagent.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise HVError(f"state_dir: {path}: cannot open the lock file: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise HVError(f"state directory {state_dir} is in use by pid {holder} "
                      "(another hvagent)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def serve(config: AgentConfig) -> None:
    config.make_dirs()
    lock = lock_state_dir(config.state_dir)  # before anything touches the VMs
    try:
        # Open (and migrate) the database here: an unusable one is one line and exit 2,
        # not a failure inside uvicorn's start-up.
        Store(config.database).close()
        await _serve_locked(config)
    finally:
        os.close(lock)


async def _serve_locked(config: AgentConfig) -> None:
    app = create_app(config)  # before listening: a bad policy file stops it here
    # The TCP port first: taken or wrong, it stops the agent before anything listens.
    tcp = listeners.bind_tcp(config.tls.listen) if config.tls.listen else None
    try:
        sock = bind_unix(config.listen)
    except BaseException:
        if tcp is not None:
            tcp.close()
        raise
    server = listeners.AgentServer(uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on",
        http=listeners.PeerCredProtocol,  # peer uid 0 is the root principal
        timeout_graceful_shutdown=listeners.SHUTDOWN_GRACE,
    ))
    log.info("listening on %s", config.listen)
    try:
        await listeners.serve(server, sock, config, tcp)
    finally:
        sock.close()
        config.listen.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvagent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the agent")
    p.add_argument("--config", type=Path, default=None,
                   help="configuration file (default /etc/hvagent/hvagent.yaml if present)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    token_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "token":
        try:
            return token_cmd.run(args)
        except HVError as e:
            print(f"hvagent: {e.message}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        # journald adds its own timestamps
        format="%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # qemu.qmp logs every connection end at INFO; a VM stopping is not news.
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
        asyncio.run(serve(config))
    except HVError as e:
        print(f"hvagent: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
