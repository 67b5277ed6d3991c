"""hvctl commands for resources of running VMs (`hvctl vm set-memory|add-cpu|
remove-cpu|attach-disk|detach-disk|add-nic|remove-nic`) and checkpoints (`hvctl
checkpoint create|list|revert|delete`). Checkpoint commands wait for their job: a
progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.tree import Tree

from hvagent.errors import HVError

Call = Callable[..., Any]
VM_COMMANDS = ("set-memory", "add-cpu", "remove-cpu", "attach-disk", "detach-disk",
               "add-nic", "remove-nic")
JOB_TIMEOUT = 3600.0


NIC_HELP = "user (user-mode NAT) or vlan=N[,mac=M] (a tap on VLAN N's host bridge)"


def parse_nic(value: str) -> dict[str, Any]:
    """`--nic user` | `--nic vlan=N[,mac=M]` -> the NIC's JSON body."""
    head, *rest = value.split(",")
    nic: dict[str, Any] = {}
    for part in ([] if head == "user" else [head]) + rest:
        key, sep, val = part.partition("=")
        if not sep or key not in ("vlan", "mac") or not val:
            raise argparse.ArgumentTypeError(f"{value!r}: expected {NIC_HELP}")
        if key == "vlan":
            if not val.isdigit() or not 1 <= int(val) <= 4094:
                raise argparse.ArgumentTypeError(f"{value!r}: vlan must be 1..4094")
            nic["vlan"] = int(val)
        else:
            nic["mac"] = val
    return nic if "vlan" in nic else {"network": "user", **nic}


def add_vm_parsers(vm: Any) -> None:
    s = vm.add_parser("set-memory", help="grow (hot-add a DIMM) or shrink a VM's memory")
    s.add_argument("name")
    s.add_argument("memory", type=int, metavar="MIB", help="the new total")
    _timeout(s)
    a = vm.add_parser("add-cpu", help="hot-add vCPUs")
    a.add_argument("name")
    a.add_argument("--count", type=int, default=1)
    r = vm.add_parser("remove-cpu", help="hot-remove hot-added vCPUs")
    r.add_argument("name")
    r.add_argument("--count", type=int, default=1)
    _timeout(r)
    d = vm.add_parser("attach-disk", help="attach an existing image or a new one")
    d.add_argument("name")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--disk", metavar="PATH", help="an image in the agent's storage dir")
    src.add_argument("--new-disk", metavar="SIZE", help="create a new image (e.g. 1G)")
    d.add_argument("--format", choices=["qcow2", "raw", "vhd", "vhdx"])
    dd = vm.add_parser("detach-disk", help="hot-remove a disk (the image is kept)")
    dd.add_argument("name")
    dd.add_argument("path")
    _timeout(dd)
    n = vm.add_parser("add-nic", help="hot-add a NIC")
    n.add_argument("name")
    n.add_argument("--network", choices=["user"], default="user")
    n.add_argument("--mac")
    n.add_argument("--nic", type=parse_nic, metavar="user|vlan=N[,mac=M]", help=NIC_HELP)
    rn = vm.add_parser("remove-nic", help="hot-remove a NIC")
    rn.add_argument("name")
    rn.add_argument("mac")
    _timeout(rn)


def _timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the guest to release the device (default 10); "
                        "after that the removal is reported pending")


def add_checkpoint_parser(top: Any) -> None:
    cp = top.add_parser("checkpoint", help="VM checkpoints").add_subparsers(
        dest="checkpoint_command", required=True)
    c = cp.add_parser("create", help="checkpoint a VM (memory too when it runs)")
    c.add_argument("vm")
    c.add_argument("--name")
    c.add_argument("--description", default="")
    cp.add_parser("list", help="the VM's checkpoints as a tree").add_argument("vm")
    for name, help_ in (("revert", "return the VM to a checkpoint"),
                        ("delete", "delete a checkpoint (the others stay valid)")):
        p = cp.add_parser(name, help=help_)
        p.add_argument("vm")
        p.add_argument("checkpoint", help="name or id")


def run_vm(args: argparse.Namespace, call: Call, out: Callable[..., None]) -> None:
    cmd, name = args.vm_command, args.name
    if cmd == "set-memory":
        res = call(args, "PUT", f"/vms/{name}/memory", body={"memory_mib": args.memory},
                   params={"timeout": args.timeout}, timeout=args.timeout + 60)
    elif cmd in ("add-cpu", "remove-cpu"):
        if args.count < 1:
            raise HVError("--count: must be 1 or more")
        now = call(args, "GET", f"/vms/{name}")["spec"]["vcpus"]
        want = now + args.count if cmd == "add-cpu" else now - args.count
        params = {} if cmd == "add-cpu" else {"timeout": args.timeout}
        res = call(args, "PUT", f"/vms/{name}/vcpus", body={"vcpus": want}, params=params,
                   timeout=getattr(args, "timeout", 10) * args.count + 60)
    elif cmd == "attach-disk":
        body: dict[str, Any] = ({"path": str(Path(args.disk).absolute())} if args.disk
                                else {"size": args.new_disk})
        if args.format:
            body["format"] = args.format
        res = call(args, "POST", f"/vms/{name}/disks", body=body, timeout=300)
    elif cmd == "detach-disk":
        res = call(args, "DELETE", f"/vms/{name}/disks",
                   params={"path": str(Path(args.path).absolute()), "timeout": args.timeout},
                   timeout=args.timeout + 60)
    elif cmd == "add-nic":
        nic = args.nic or {"network": args.network}
        nic = {**nic, **({"mac": args.mac} if args.mac else {})}
        res = call(args, "POST", f"/vms/{name}/nics", body=nic)
    else:
        res = call(args, "DELETE", f"/vms/{name}/nics/{args.mac}",
                   params={"timeout": args.timeout}, timeout=args.timeout + 60)
    out(args, res, lambda r: print(f"{name}: {r['status']}: {r['detail']}"))


def run_checkpoint(args: argparse.Namespace, call: Call, out: Callable[..., None]) -> None:
    cmd, vm = args.checkpoint_command, args.vm
    if cmd == "list":
        out(args, call(args, "GET", f"/vms/{vm}/checkpoints"), _tree)
        return
    if cmd == "create":
        body = {"description": args.description, **({"name": args.name} if args.name else {})}
        job = call(args, "POST", f"/vms/{vm}/checkpoints", body=body)
    elif cmd == "revert":
        job = call(args, "POST", f"/vms/{vm}/checkpoints/{args.checkpoint}/revert")
    else:
        job = call(args, "DELETE", f"/vms/{vm}/checkpoints/{args.checkpoint}")
    job = wait_job(args, call, job, f"{cmd} checkpoint of {vm}", quiet=args.json)
    if job["status"] != "succeeded":
        raise HVError(f"{cmd} checkpoint of {vm} failed: {job['error']}")
    out(args, job, lambda j: print(f"{vm}: checkpoint {cmd}: done"))


def wait_job(args: argparse.Namespace, call: Call, job: dict[str, Any], what: str,
             quiet: bool = False) -> dict[str, Any]:
    """Poll a job to its end, showing its progress."""
    deadline = time.monotonic() + JOB_TIMEOUT
    if sys.stderr.isatty() and not quiet:
        cols = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(what, total=1.0)
            while job["status"] == "running" and time.monotonic() < deadline:
                time.sleep(0.1)
                job = call(args, "GET", f"/jobs/{job['id']}")
                bar.update(task, completed=job["progress"])
        return job
    last = -1.0
    while job["status"] == "running" and time.monotonic() < deadline:
        if not quiet and job["progress"] - last >= 0.25:
            print(f"{what}: {job['progress']:.0%}", file=sys.stderr)
            last = job["progress"]
        time.sleep(0.2)
        job = call(args, "GET", f"/jobs/{job['id']}")
    return job


def _tree(cps: list[dict[str, Any]]) -> None:
    if not cps:
        print("no checkpoints")
        return
    root = Tree("checkpoints")
    nodes: dict[str | None, Any] = {None: root}
    pending = list(cps)
    while pending:  # parents first (ordered by time, a parent is always older)
        c = pending.pop(0)
        parent = c["parent"] if c["parent"] in nodes else None
        when = datetime.datetime.fromtimestamp(c["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
        label = (f"[bold]{c['name']}[/bold] {when} "
                 f"{'memory+disk' if c['with_memory'] else 'disk only'} ({c['method']})"
                 + (f" - {c['description']}" if c["description"] else "")
                 + (" [green]<- now[/green]" if c["current"] else "")
                 + (f" [red]{c['status']}[/red]" if c["status"] != "ready" else ""))
        nodes[c["id"]] = nodes[parent].add(label)
    Console().print(root)
