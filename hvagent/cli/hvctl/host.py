"""`hvctl host info`: the agent and its host — version, accelerator, VM count, where the
agent's state is and whether it survives a power-off, CPUs, memory (and how much the
running VMs hold), the storage file system, VMs by state, and the warnings an operator
should act on (each also on stderr, so a script reading the JSON still sees them). With
`--all-hosts`, one line per host."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.fleet import FleetView
from hvagent.cli.hvctl.output import show


def add_parsers(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    host = top.add_parser("host", help="the host and its agent").add_subparsers(
        dest="host_command", required=True)
    i = host.add_parser("info", help="agent version, accelerator, VMs, state persistence")
    # Also after the subcommand; SUPPRESS keeps a global --json given before it.
    i.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print JSON for scripts")
    i.set_defaults(func=info, fleet=FLEET_INFO)


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
    # The host's capacity; an agent older than this report has none of it: say so.
    if "cpu" in d:
        cpu, mem, st = d["cpu"], d["memory"], d["storage"]
        print(f"cpu: {cpu['count']} logical ({cpu['model']})")
        print(f"memory: total {mib(mem['total_bytes'])}, free {mib(mem['free_bytes'])}, "
              f"committed to VMs {mib(mem['committed_bytes'])}")
        print(f"storage: {st['dir']}: total {gib(st['total_bytes'])}, "
              f"free {gib(st['free_bytes'])}")
        print(f"vms by state: {by_state(d['vm_states'])}")
    else:
        print("cpu, memory, storage: unknown (the agent does not report them)")
    for w in d.get("warnings", []):
        print(f"warning: {w}")


def mib(n: int) -> str:
    return f"{n // 2**20} MiB"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def by_state(states: dict[str, int]) -> str:
    return ", ".join(f"{s} {n}" for s, n in states.items() if n) or "none"


def _rows(d: dict[str, Any]) -> list[list[str]]:
    if "cpu" not in d:
        return [[d["version"], d["accel"], "?", "?", "?", "?", str(d["vms"])]]
    mem, st = d["memory"], d["storage"]
    return [[d["version"], d["accel"], str(d["cpu"]["count"]),
             f"{mib(mem['free_bytes'])} / {mib(mem['total_bytes'])}",
             mib(mem["committed_bytes"]),
             f"{gib(st['free_bytes'])} / {gib(st['total_bytes'])}",
             f"{d['vms']} ({by_state(d['vm_states'])})"]]


# `hvctl --all-hosts host info`: one line per host.
FLEET_INFO = FleetView(path=lambda args: "/agent",
                       columns=("VERSION", "ACCEL", "CPUS", "MEMORY FREE/TOTAL", "COMMITTED",
                                "STORAGE FREE/TOTAL", "VMS"),
                       rows=_rows)
