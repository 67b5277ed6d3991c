"""`hvctl host info`: the agent and its host — version, accelerator, VM count, where the
agent's state is and whether it survives a power-off, and the warnings an operator should
act on (each also on stderr, so a script reading the JSON still sees them)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.output import show


def add_parsers(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    host = top.add_parser("host", help="the host and its agent").add_subparsers(
        dest="host_command", required=True)
    i = host.add_parser("info", help="agent version, accelerator, VMs, state persistence")
    # Also after the subcommand; SUPPRESS keeps a global --json given before it.
    i.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print JSON for scripts")
    i.set_defaults(func=info)


def info(args: argparse.Namespace, agent: Agent) -> None:
    data = agent.get("/agent")
    show(args, data, _text)
    for w in data.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)


def _text(d: dict[str, Any]) -> None:
    print(f"version: {d['version']}")
    print(f"accelerator: {d['accel']} ({d['accel_reason']})")
    print(f"vms: {d['vms']}")
    # An agent older than the persistence report has none of these: say so, not fail.
    print(f"state dir: {d.get('state_dir', 'unknown')}")
    if "persistent" in d:
        print(f"persistent: {'yes' if d['persistent'] else 'no'} ({d.get('persistence', '')})")
    else:
        print("persistent: unknown (the agent does not report it)")
    for w in d.get("warnings", []):
        print(f"warning: {w}")
