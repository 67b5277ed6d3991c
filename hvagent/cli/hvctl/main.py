"""`hvctl`'s command tree. Each command group adds its subcommands, and every subcommand
names its handler with `set_defaults(func=...)`: main() parses, builds the Agent from
the global options (or the hosts file: `--host`, its `default`), calls the handler, and
turns a user error into one line on stderr and exit status 2. A command that can run on
every host also names its `fleet` view (hvagent.cli.hvctl.fleet), used by `--all-hosts`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from hvagent.cli.hvctl import (
    audit,
    checkpoints,
    devices,
    disks,
    fleet,
    host,
    hosts,
    media,
    networks,
    vms,
)
from hvagent.cli.hvctl.client import Agent
from hvagent.errors import HVError, InvalidRequest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvctl", description="Manage child VMs through hvagent.",
                                epilog=fleet.EXIT_CODES_HELP)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, help="agent unix socket")
    where.add_argument("--url", help="agent base URL (https://host:port)")
    where.add_argument("--host", metavar="NAME", help="a host of the hosts file (default: "
                       "its `default`, else the local socket)")
    where.add_argument("--all-hosts", action="store_true",
                       help="every host of the hosts file (vm list, host info, "
                       "checkpoint list)")
    p.add_argument("--hosts-file", type=Path, metavar="PATH",
                   help=f"the hosts file (default: $HVCTL_CONFIG_DIR/{hosts.HOSTS_FILE}, "
                   f"else ~/.config/hvctl/{hosts.HOSTS_FILE})")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--token", help="API token (default: $HVCTL_TOKEN; root on the local "
                   "socket needs none)")
    p.add_argument("--ca-fingerprint", metavar="SHA256",
                   help="pin the agent's CA (logged by the agent at start); remembered per URL")
    top = p.add_subparsers(dest="command", required=True)
    vm = top.add_parser("vm", help="child VMs").add_subparsers(dest="vm_command", required=True)
    vms.add_parsers(vm)
    devices.add_parsers(vm)
    media.add_parsers(vm)
    disks.add_vm_parsers(vm)
    audit.add_parsers(top)
    checkpoints.add_parsers(top)
    disks.add_disk_parsers(top)
    host.add_parsers(top)
    networks.add_parsers(top)
    return p


def fail(msg: str) -> NoReturn:
    print(f"hvctl: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.all_hosts:
            return _all_hosts(args)
        args.func(args, _agent(args))
    except HVError as e:
        fail(e.message)
    return 0


def _agent(args: argparse.Namespace) -> Agent:
    """The one agent the global options name: --socket/--url as always; --host, or the
    hosts file's `default`, from the file; else the local socket."""
    if args.socket is not None or args.url is not None:
        if args.hosts_file is not None:
            raise InvalidRequest("--hosts-file: not with --socket or --url")
        return Agent.from_args(args)
    path = hosts.hosts_path(args.hosts_file)
    if args.host is None and args.hosts_file is None and not path.exists():
        return Agent.from_args(args)  # no hosts file: the local socket, as before
    hosts_file = hosts.load(path)
    name = args.host or hosts_file.default
    if name is None:
        return Agent.from_args(args)
    if args.ca_fingerprint is not None:
        raise InvalidRequest(f"--ca-fingerprint: host {name} is pinned by its "
                             f"ca_fingerprint in {path}")
    # An explicit --token replaces the file's; $HVCTL_TOKEN does not (the file says).
    return hosts_file.host(name).agent(args.token)


def _all_hosts(args: argparse.Namespace) -> int:
    view: fleet.FleetView | None = getattr(args, "fleet", None)
    if view is None:
        raise InvalidRequest("--all-hosts: only vm list, host info and checkpoint list run "
                             "on all hosts")
    for option, given in (("--token", args.token), ("--ca-fingerprint", args.ca_fingerprint)):
        if given is not None:
            raise InvalidRequest(f"{option}: not with --all-hosts (the hosts file gives each "
                                 "host's)")
    return fleet.run(args, view, hosts.load(hosts.hosts_path(args.hosts_file)))
