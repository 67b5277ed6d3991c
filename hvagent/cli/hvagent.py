"""`hvagent serve`: the agent daemon (REST API on a unix socket for root and group
hvagent, plus HTTPS when configured); `hvagent token`: API tokens."""

from __future__ import annotations

import argparse
import asyncio
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

log = logging.getLogger("hvagent")


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket for root and group hvagent (0660; 0600 if the group does
    not exist). Peers other than uid 0 still need a token (hvagent.auth)."""
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
    finally:
        os.umask(old)
    try:
        os.chown(path, -1, grp.getgrnam("hvagent").gr_gid)
        os.chmod(path, 0o660)
    except KeyError:
        pass  # no hvagent group on this machine: root only
    sock.listen(128)
    return sock


async def serve(config: AgentConfig) -> None:
    sock = bind_unix(config.listen)
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), log_config=None, access_log=False, lifespan="on",
        http=listeners.PeerCredProtocol,  # peer uid 0 is the root principal
    ))
    log.info("listening on %s", config.listen)
    try:
        await listeners.serve(server, sock, config)
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
