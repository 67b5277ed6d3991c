"""`hvctl`'s command tree. Each command group adds its subcommands, and every subcommand
names its handler with `set_defaults(func=...)`: main() parses, builds the Agent from
the global options, calls the handler, and turns a user error into one line on stderr
and exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from hvagent.cli.hvctl import audit, checkpoints, devices, disks, host, vms
from hvagent.cli.hvctl.client import Agent
from hvagent.errors import HVError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvctl", description="Manage child VMs through hvagent.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help="agent unix socket")
    where.add_argument("--url", help="agent base URL (https://host:port)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--token", help="API token (default: $HVCTL_TOKEN; root on the local "
                   "socket needs none)")
    p.add_argument("--ca-fingerprint", metavar="SHA256",
                   help="pin the agent's CA (logged by the agent at start); remembered per URL")
    top = p.add_subparsers(dest="command", required=True)
    vm = top.add_parser("vm", help="child VMs").add_subparsers(dest="vm_command", required=True)
    vms.add_parsers(vm)
    devices.add_parsers(vm)
    disks.add_vm_parsers(vm)
    audit.add_parsers(top)
    checkpoints.add_parsers(top)
    disks.add_disk_parsers(top)
    host.add_parsers(top)
    return p


def fail(msg: str) -> NoReturn:
    print(f"hvctl: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args, Agent.from_args(args))
    except HVError as e:
        fail(e.message)
    return 0
