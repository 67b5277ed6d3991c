"""`hvctl net create|list|show|delete`: the host's managed networks (bridged, nat,
isolated)."""

from __future__ import annotations

import argparse
from typing import Any

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.output import show

KINDS = ("bridged", "nat", "isolated")
COLUMNS = ("NAME", "KIND", "BRIDGE", "ADDRESS", "DHCP", "VMS")


def add_parsers(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    net = top.add_parser("net", help="the host's managed networks").add_subparsers(
        dest="net_command", required=True)
    c = net.add_parser("create", help="create a bridged, nat or isolated network")
    c.add_argument("name")
    c.add_argument("--kind", choices=KINDS, required=True)
    c.add_argument("--address", metavar="ADDR/PREFIX",
                   help="nat, isolated: the host's address on it, e.g. 192.168.122.1/24")
    c.add_argument("--uplink", metavar="IFACE", help="bridged: a host NIC to enslave")
    c.add_argument("--no-dhcp", action="store_true", help="nat, isolated: no DHCP server")
    c.add_argument("--dhcp-start", metavar="IP")
    c.add_argument("--dhcp-end", metavar="IP")
    c.set_defaults(func=create)
    ls = net.add_parser("list", help="the networks")
    ls.set_defaults(func=list_networks)
    s = net.add_parser("show", help="one network")
    s.add_argument("name")
    s.set_defaults(func=show_network)
    d = net.add_parser("delete", help="delete a network no VM uses")
    d.add_argument("name")
    d.set_defaults(func=delete)


def create(args: argparse.Namespace, agent: Agent) -> None:
    body: dict[str, Any] = {"name": args.name, "kind": args.kind}
    for key in ("address", "uplink", "dhcp_start", "dhcp_end"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.no_dhcp:
        body["dhcp"] = False
    show(args, agent.post("/networks", body=body), _show)


def list_networks(args: argparse.Namespace, agent: Agent) -> None:
    show(args, agent.get("/networks"), _table)


def show_network(args: argparse.Namespace, agent: Agent) -> None:
    show(args, agent.get(f"/networks/{args.name}"), _show)


def delete(args: argparse.Namespace, agent: Agent) -> None:
    agent.delete(f"/networks/{args.name}")
    show(args, {"deleted": args.name}, lambda r: print(f"network {args.name}: deleted"))


def _dhcp(n: dict[str, Any]) -> str:
    if not n["dhcp"] or n["kind"] == "bridged":
        return "-"
    return f"{n['dhcp_start']}-{n['dhcp_end']} ({n['dhcp_server']})"


def _table(nets: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None)
    for col in COLUMNS:
        t.add_column(col)
    for n in nets:
        t.add_row(n["name"], n["kind"], n["bridge"], n["address"] or "-", _dhcp(n),
                  ",".join(n["vms"]) or "-")
    Console().print(t)


def _show(n: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [("name", n["name"]), ("kind", n["kind"]), ("bridge", n["bridge"]),
            ("uplink", n["uplink"] or "-"), ("address", n["address"] or "-"),
            ("dhcp", _dhcp(n)), ("vlan mode", n["vlan_mode"]),
            ("vlan filtering", n["vlan_filtering"]),
            ("declared", "yes (agent configuration)" if n["declared"] else "no"),
            ("vms", ", ".join(n["vms"]) or "-")]
    if n.get("error"):
        rows.append(("error", n["error"]))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
