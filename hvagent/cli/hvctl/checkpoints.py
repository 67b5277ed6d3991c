"""`hvctl checkpoint create|list|revert|delete`: VM checkpoints. All but `list` are jobs
on the agent; hvctl waits for the job's end, with a progress bar on a terminal and
plain log lines otherwise."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from typing import Any

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.fleet import FleetView
from hvagent.cli.hvctl.output import show
from hvagent.errors import HVError

JOB_TIMEOUT = 3600.0


def add_parsers(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cp = top.add_parser("checkpoint", help="VM checkpoints").add_subparsers(
        dest="checkpoint_command", required=True)
    c = cp.add_parser("create", help="checkpoint a VM (memory too when it runs)")
    c.add_argument("vm")
    c.add_argument("--name")
    c.add_argument("--description", default="")
    c.set_defaults(func=create)
    p = cp.add_parser("list", help="the VM's checkpoints as a tree")
    p.add_argument("vm")
    p.set_defaults(func=list_checkpoints, fleet=FLEET_LIST)
    for name, help_, func in (("revert", "return the VM to a checkpoint", revert),
                              ("delete", "delete a checkpoint (the others stay valid)",
                               delete)):
        p = cp.add_parser(name, help=help_)
        p.add_argument("vm")
        p.add_argument("checkpoint", help="name or id")
        p.set_defaults(func=func)


# commands


def list_checkpoints(args: argparse.Namespace, agent: Agent) -> None:
    show(args, agent.get(f"/vms/{args.vm}/checkpoints"), _tree)


def create(args: argparse.Namespace, agent: Agent) -> None:
    body = {"description": args.description, **({"name": args.name} if args.name else {})}
    _finish(args, agent, agent.post(f"/vms/{args.vm}/checkpoints", body=body))


def revert(args: argparse.Namespace, agent: Agent) -> None:
    _finish(args, agent, agent.post(f"/vms/{args.vm}/checkpoints/{args.checkpoint}/revert"))


def delete(args: argparse.Namespace, agent: Agent) -> None:
    _finish(args, agent, agent.delete(f"/vms/{args.vm}/checkpoints/{args.checkpoint}"))


def _finish(args: argparse.Namespace, agent: Agent, job: dict[str, Any]) -> None:
    cmd, vm = args.checkpoint_command, args.vm
    job = wait_job(agent, job, f"{cmd} checkpoint of {vm}", quiet=args.json)
    if job["status"] != "succeeded":
        raise HVError(f"{cmd} checkpoint of {vm} failed: {job['error']}")
    show(args, job, lambda j: print(f"{vm}: checkpoint {cmd}: done"))


def wait_job(agent: Agent, job: dict[str, Any], what: str,
             quiet: bool = False) -> dict[str, Any]:
    """Poll a job to its end, showing its progress."""
    deadline = time.monotonic() + JOB_TIMEOUT
    if sys.stderr.isatty() and not quiet:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        cols = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(what, total=1.0)
            while job["status"] == "running" and time.monotonic() < deadline:
                time.sleep(0.1)
                job = agent.get(f"/jobs/{job['id']}")
                bar.update(task, completed=job["progress"])
        return job
    last = -1.0
    while job["status"] == "running" and time.monotonic() < deadline:
        if not quiet and job["progress"] - last >= 0.25:
            print(f"{what}: {job['progress']:.0%}", file=sys.stderr)
            last = job["progress"]
        time.sleep(0.2)
        job = agent.get(f"/jobs/{job['id']}")
    return job


# views


def _tree(cps: list[dict[str, Any]]) -> None:
    if not cps:
        print("no checkpoints")
        return
    from rich.console import Console
    from rich.tree import Tree

    root = Tree("checkpoints")
    nodes: dict[str | None, Any] = {None: root}
    pending = list(cps)
    while pending:  # parents first (ordered by time, a parent is always older)
        c = pending.pop(0)
        parent = c["parent"] if c["parent"] in nodes else None
        when = _when(c)
        label = (f"[bold]{c['name']}[/bold] {when} "
                 f"{'memory+disk' if c['with_memory'] else 'disk only'} ({c['method']})"
                 + (f" - {c['description']}" if c["description"] else "")
                 + (" [green]<- now[/green]" if c["current"] else "")
                 + (f" [red]{c['status']}[/red]" if c["status"] != "ready" else ""))
        nodes[c["id"]] = nodes[parent].add(label)
    Console().print(root)


def _when(c: dict[str, Any]) -> str:
    return datetime.datetime.fromtimestamp(c["created_at"]).strftime("%Y-%m-%d %H:%M:%S")


def _rows(cps: list[dict[str, Any]]) -> list[list[str]]:
    """One host's checkpoints of the VM as flat rows (a tree per host would not line up
    in one table; PARENT keeps the shape)."""
    names = {c["id"]: c["name"] for c in cps}
    return [[c["name"], _when(c), "memory+disk" if c["with_memory"] else "disk only",
             names.get(c["parent"], "-"), "yes" if c["current"] else "", c["status"]]
            for c in cps]


# `hvctl --all-hosts checkpoint list VM`: the VM of that name on every host.
FLEET_LIST = FleetView(path=lambda args: f"/vms/{args.vm}/checkpoints",
                       columns=("CHECKPOINT", "CREATED", "KIND", "PARENT", "CURRENT",
                                "STATUS"),
                       rows=_rows)
