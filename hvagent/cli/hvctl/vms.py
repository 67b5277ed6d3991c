"""`hvctl vm create|list|show|start|pause|resume|reset|stop|delete|console`: a VM's
definition and its lifecycle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.devices import NIC_HELP, NIC_METAVAR, parse_nic
from hvagent.cli.hvctl.fleet import FleetView
from hvagent.cli.hvctl.output import show
from hvagent.errors import InvalidRequest
from hvagent.spec import DEFAULT_STOP_TIMEOUT as STOP_TIMEOUT
from hvagent.spec import Firmware


def add_parsers(vm: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = vm.add_parser("create", help="define a VM")
    c.add_argument("name")
    c.add_argument("--vcpus", type=int, required=True)
    c.add_argument("--max-vcpus", type=int)
    c.add_argument("--memory", type=int, required=True, metavar="MIB")
    c.add_argument("--max-memory", type=int, metavar="MIB")
    c.add_argument("--disk", action="append", default=[], metavar="PATH[,format=F]",
                   help="attach an existing image (inside the agent's storage dir)")
    c.add_argument("--new-disk", action="append", default=[], metavar="SIZE[,format=F]",
                   help="create a new image in the agent's storage dir")
    c.add_argument("--kernel")
    c.add_argument("--initrd")
    c.add_argument("--append")
    c.add_argument("--nic", action="append", default=[], type=parse_nic,
                   metavar=NIC_METAVAR, help=NIC_HELP)
    c.add_argument("--firmware", choices=[str(f) for f in Firmware], default=str(Firmware.BIOS))
    c.set_defaults(func=create)

    vm.add_parser("list", help="list VMs").set_defaults(func=list_vms, fleet=FLEET_LIST)
    p = vm.add_parser("show", help="show one VM")
    p.add_argument("name")
    p.set_defaults(func=show_vm)
    for name, help_ in (("start", "start"), ("pause", "pause"), ("resume", "resume"),
                        ("reset", "hard reset")):
        p = vm.add_parser(name, help=help_)
        p.add_argument("name")
        p.set_defaults(func=power)
    s = vm.add_parser("stop", help="ACPI power-off, force-off after a timeout")
    s.add_argument("name")
    s.add_argument("--force", action="store_true", help="force off at once")
    s.add_argument("--timeout", type=float,
                   help=f"seconds before forcing off (default {STOP_TIMEOUT:g})")
    s.set_defaults(func=stop)
    d = vm.add_parser("delete", help="remove a stopped VM")
    d.add_argument("name")
    d.add_argument("--keep-disks", action="store_true")
    d.set_defaults(func=delete)
    co = vm.add_parser("console", help="tail of the serial console log")
    co.add_argument("name")
    co.add_argument("--lines", type=int, default=50)
    co.set_defaults(func=console)


# commands


def create(args: argparse.Namespace, agent: Agent) -> None:
    show(args, agent.post("/vms", body=_spec(args), timeout=300), _state_line)


def list_vms(args: argparse.Namespace, agent: Agent) -> None:
    show(args, agent.get("/vms"), _vm_table)


def show_vm(args: argparse.Namespace, agent: Agent) -> None:
    show(args, agent.get(f"/vms/{args.name}"), _vm_show)


def power(args: argparse.Namespace, agent: Agent) -> None:
    """start, pause, resume, reset: the route is the command's name."""
    show(args, agent.post(f"/vms/{args.name}/{args.vm_command}", timeout=120), _state_line)


def stop(args: argparse.Namespace, agent: Agent) -> None:
    body: dict[str, Any] = {"force": args.force}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    # The agent answers once the guest is off, forced after the timeout: wait longer.
    wait = (args.timeout or STOP_TIMEOUT) + 60
    show(args, agent.post(f"/vms/{args.name}/stop", body=body, timeout=wait), _state_line)


def delete(args: argparse.Namespace, agent: Agent) -> None:
    res = agent.delete(f"/vms/{args.name}",
                       params={"keep_disks": str(args.keep_disks).lower()})
    show(args, res, lambda r: print(
        f"{r['name']}: deleted" + (f" (removed {', '.join(r['removed_disks'])})"
                                   if r["removed_disks"] else "")))


def console(args: argparse.Namespace, agent: Agent) -> None:
    res = agent.get(f"/vms/{args.name}/console", params={"lines": args.lines})
    show(args, res, lambda r: sys.stdout.write(r["text"]))


# the VM spec from the command line


def _kv(item: str, option: str) -> tuple[str, dict[str, str]]:
    """`VALUE[,key=v]...` as used by --disk and --new-disk."""
    head, *rest = item.split(",")
    opts = {}
    for r in rest:
        k, sep, v = r.partition("=")
        if not sep or k != "format":
            raise InvalidRequest(f"{option} {item}: unknown option {r!r} (only format=F)")
        opts[k] = v
    if not head:
        raise InvalidRequest(f"{option} {item}: empty value")
    return head, opts


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    disks: list[dict[str, Any]] = []
    for d in args.disk:
        path, opts = _kv(d, "--disk")
        disks.append({"path": str(Path(path).absolute()), **opts})
    for d in args.new_disk:
        size, opts = _kv(d, "--new-disk")
        disks.append({"size": size, **opts})
    spec: dict[str, Any] = {
        "name": args.name, "vcpus": args.vcpus, "memory_mib": args.memory,
        "firmware": args.firmware, "disks": disks,
        "nics": args.nic,
    }
    optional = {"max_vcpus": args.max_vcpus, "max_memory_mib": args.max_memory,
                "append": args.append,
                "kernel": str(Path(args.kernel).absolute()) if args.kernel else None,
                "initrd": str(Path(args.initrd).absolute()) if args.initrd else None}
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


# views


def _state_line(vm: dict[str, Any]) -> None:
    print(f"{vm['name']}: {vm['state']}")


VM_COLUMNS = ("NAME", "STATE", "VCPUS", "MEMORY", "DISKS", "PID", "OPERATION")


def _vm_rows(vms: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for vm in vms:
        s = vm["spec"]
        rows.append([vm["name"], vm["state"], f"{s['vcpus']}/{s['max_vcpus']}",
                     f"{s['memory_mib']}/{s['max_memory_mib']} MiB", str(len(s["disks"])),
                     str(vm["pid"] or "-"), vm["operation"] or "-"])
    return rows


def _vm_table(vms: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None)
    for col in VM_COLUMNS:
        t.add_column(col)
    for row in _vm_rows(vms):
        t.add_row(*row)
    Console().print(t)


# `hvctl --all-hosts vm list`: the same columns, after HOST.
FLEET_LIST = FleetView(path=lambda args: "/vms", columns=VM_COLUMNS, rows=_vm_rows)


def _vm_show(vm: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = vm["spec"]
    t = Table(box=None, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("name", vm["name"]), ("state", vm["state"]), ("pid", str(vm["pid"] or "-")),
        ("vcpus", f"{s['vcpus']} (max {s['max_vcpus']})"),
        ("memory", f"{s['memory_mib']} MiB (max {s['max_memory_mib']} MiB, "
                   f"{s['memory_slots']} slots)"),
        ("firmware", s["firmware"]),
        *[(f"disk{i}", f"{d['path']} ({d['format']}, {d.get('bus', 'virtio')})")
          for i, d in enumerate(s["disks"])],
        *[(f"nic{i}", f"{n['model']} {n['mac']} ({n['network']}"
                      + (f", VLAN {n['vlan']})" if n.get("vlan") else ")"))
          for i, n in enumerate(s["nics"])],
        ("kernel", s["kernel"] or "-"), ("serial log", vm["serial_log"]),
    ]
    if vm["operation"]:
        rows.append(("operation", vm["operation"]))
    if vm["last_error"]:
        rows.append(("last error", vm["last_error"]))
    if s.get("pending_unplugs"):
        rows.append(("pending unplug", ", ".join(f"{p['kind']} {p['device']}"
                                                 for p in s["pending_unplugs"])))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
