"""`hvctl vm set-memory|add-cpu|remove-cpu|attach-disk|detach-disk|add-nic|set-nic-vlan|remove-nic`:
resources of a running VM, added and removed live; and `--nic`, the NIC syntax these
and `vm create` share."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.output import show
from hvagent.errors import HVError
from hvagent.host.formats import DISK_FORMAT_LABELS
from hvagent.spec import DEFAULT_UNPLUG_TIMEOUT as UNPLUG_TIMEOUT
from hvagent.spec import NAME_RE, VLAN_MAX, VLAN_MIN, VLAN_RULE

NIC_METAVAR = "[NETWORK][,vlan=N][,trunk=N:N...][,mac=M]"
NIC_HELP = ("NETWORK: user (user-mode NAT), a host network (hvctl net list) or nothing (the "
            "host's default network); vlan=N alone: a tap on VLAN N's host bridge; "
            "trunk=10:20: VLANs carried tagged (bridged networks)")
ANSWER_MARGIN = 60.0  # how much longer than the guest's time hvctl waits for the answer


def parse_nic(value: str) -> dict[str, Any]:
    """`--nic user` | `--nic NETWORK[,vlan=N][,mac=M]` | `--nic vlan=N[,mac=M]` -> the
    NIC's JSON body (no network: the agent's default)."""
    head, *rest = value.split(",")
    nic: dict[str, Any] = {}
    if head and "=" not in head:
        if not re.fullmatch(NAME_RE, head):
            raise argparse.ArgumentTypeError(f"{value!r}: {head!r} is not a network name")
        nic["network"] = head
    else:
        rest = [head, *rest]
    for part in rest:
        key, sep, val = part.partition("=")
        if not sep or key not in ("vlan", "mac", "trunk") or not val:
            raise argparse.ArgumentTypeError(f"{value!r}: expected {NIC_METAVAR}: {NIC_HELP}")
        if key == "vlan":
            if not val.isdigit() or not VLAN_MIN <= int(val) <= VLAN_MAX:
                raise argparse.ArgumentTypeError(f"{value!r}: vlan must be {VLAN_RULE}")
            nic["vlan"] = int(val)
        elif key == "trunk":
            nic["trunk"] = [_vlan(v) for v in val.split(":")]
        else:
            nic["mac"] = val
    return nic


def add_parsers(vm: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = vm.add_parser("set-memory", help="grow (hot-add a DIMM) or shrink a VM's memory")
    s.add_argument("name")
    s.add_argument("memory", type=int, metavar="MIB", help="the new total")
    _timeout(s)
    s.set_defaults(func=set_memory)
    a = vm.add_parser("add-cpu", help="hot-add vCPUs")
    a.add_argument("name")
    a.add_argument("--count", type=int, default=1)
    a.set_defaults(func=add_cpu)
    r = vm.add_parser("remove-cpu", help="hot-remove hot-added vCPUs")
    r.add_argument("name")
    r.add_argument("--count", type=int, default=1)
    _timeout(r)
    r.set_defaults(func=remove_cpu)
    d = vm.add_parser("attach-disk", help="attach an existing image or a new one")
    d.add_argument("name")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--disk", metavar="PATH", help="an image in the agent's storage dir")
    src.add_argument("--new-disk", metavar="SIZE", help="create a new image (e.g. 1G)")
    d.add_argument("--format", choices=DISK_FORMAT_LABELS)
    d.set_defaults(func=attach_disk)
    dd = vm.add_parser("detach-disk", help="hot-remove a disk (the image is kept)")
    dd.add_argument("name")
    dd.add_argument("path")
    _timeout(dd)
    dd.set_defaults(func=detach_disk)
    n = vm.add_parser("add-nic", help="hot-add a NIC")
    n.add_argument("name")
    n.add_argument("--network", help="user or a host network (default: the host's)")
    n.add_argument("--mac")
    n.add_argument("--nic", type=parse_nic, metavar=NIC_METAVAR, help=NIC_HELP)
    n.set_defaults(func=add_nic)
    sv = vm.add_parser("set-nic-vlan", help="move a NIC to another VLAN (live when it runs)")
    sv.add_argument("name")
    sv.add_argument("mac")
    sv.add_argument("vlan", type=_vlan, metavar="VLAN", nargs="?",
                    help=f"access or native VLAN id ({VLAN_RULE}); omitted: unchanged")
    sv.add_argument("--trunk", type=lambda v: [_vlan(x) for x in v.split(",") if x],
                    metavar="N,N...", help="the VLANs the NIC carries tagged ('' for none)")
    sv.set_defaults(func=set_nic_vlan)
    rn = vm.add_parser("remove-nic", help="hot-remove a NIC")
    rn.add_argument("name")
    rn.add_argument("mac")
    _timeout(rn)
    rn.set_defaults(func=remove_nic)


def _timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=UNPLUG_TIMEOUT,
                   help=f"seconds to wait for the guest to release the device (default "
                        f"{UNPLUG_TIMEOUT:g}); after that the removal is reported pending")


# commands


def set_memory(args: argparse.Namespace, agent: Agent) -> None:
    _done(args, agent.put(f"/vms/{args.name}/memory", body={"memory_mib": args.memory},
                          params={"timeout": args.timeout},
                          timeout=args.timeout + ANSWER_MARGIN))


def add_cpu(args: argparse.Namespace, agent: Agent) -> None:
    want = _vcpus(args, agent) + args.count
    _done(args, agent.put(f"/vms/{args.name}/vcpus", body={"vcpus": want},
                          timeout=UNPLUG_TIMEOUT * args.count + ANSWER_MARGIN))


def remove_cpu(args: argparse.Namespace, agent: Agent) -> None:
    want = _vcpus(args, agent) - args.count
    _done(args, agent.put(f"/vms/{args.name}/vcpus", body={"vcpus": want},
                          params={"timeout": args.timeout},
                          timeout=args.timeout * args.count + ANSWER_MARGIN))


def attach_disk(args: argparse.Namespace, agent: Agent) -> None:
    body: dict[str, Any] = ({"path": str(Path(args.disk).absolute())} if args.disk
                            else {"size": args.new_disk})
    if args.format:
        body["format"] = args.format
    _done(args, agent.post(f"/vms/{args.name}/disks", body=body, timeout=300))


def detach_disk(args: argparse.Namespace, agent: Agent) -> None:
    _done(args, agent.delete(f"/vms/{args.name}/disks",
                             params={"path": str(Path(args.path).absolute()),
                                     "timeout": args.timeout},
                             timeout=args.timeout + ANSWER_MARGIN))


def add_nic(args: argparse.Namespace, agent: Agent) -> None:
    nic = args.nic or ({"network": args.network} if args.network else {})
    nic = {**nic, **({"mac": args.mac} if args.mac else {})}
    _done(args, agent.post(f"/vms/{args.name}/nics", body=nic))


def _vlan(value: str) -> int:
    if not value.isdigit() or not VLAN_MIN <= int(value) <= VLAN_MAX:
        raise argparse.ArgumentTypeError(f"{value!r}: a VLAN id is {VLAN_RULE}")
    return int(value)


def set_nic_vlan(args: argparse.Namespace, agent: Agent) -> None:
    body = {k: v for k, v in (("vlan", args.vlan), ("trunk", args.trunk)) if v is not None}
    if not body:
        raise HVError("set-nic-vlan: give VLAN, --trunk or both")
    _done(args, agent.put(f"/vms/{args.name}/nics/{args.mac}", body=body))


def remove_nic(args: argparse.Namespace, agent: Agent) -> None:
    _done(args, agent.delete(f"/vms/{args.name}/nics/{args.mac}",
                             params={"timeout": args.timeout},
                             timeout=args.timeout + ANSWER_MARGIN))


def _vcpus(args: argparse.Namespace, agent: Agent) -> int:
    """The VM's vCPU count now (add-cpu and remove-cpu are relative to it)."""
    if args.count < 1:
        raise HVError("--count: must be 1 or more")
    return int(agent.get(f"/vms/{args.name}")["spec"]["vcpus"])


def _done(args: argparse.Namespace, change: dict[str, Any]) -> None:
    show(args, change, lambda r: print(f"{args.name}: {r['status']}: {r['detail']}"))
