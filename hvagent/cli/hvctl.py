"""`hvctl`: the command line over the agent's REST API (local unix socket by default,
`--url` for a remote agent). Tables for people, `--json` for scripts; on failure one
line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import httpx
from rich.console import Console
from rich.table import Table

from hvagent.cli import hvctl_audit, hvctl_devices, hvctl_disks, pinning
from hvagent.config import load_config
from hvagent.errors import HVError

API = "/api/v1"
FALLBACK_SOCKET = Path("/run/hvagent/hvagent.sock")


class CLIError(Exception):
    pass


def default_socket() -> Path:
    """The agent's socket as its config file says, else the built-in default."""
    try:
        return load_config(None).listen
    except HVError:
        return FALLBACK_SOCKET


def _client(args: argparse.Namespace, timeout: float | None) -> httpx.Client:
    token = args.token or os.environ.get("HVCTL_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if args.url:
        try:
            verify = pinning.ssl_context(args.url, args.ca_fingerprint)
        except HVError as e:
            raise CLIError(e.message) from e
        return httpx.Client(base_url=args.url.rstrip("/"), timeout=timeout, headers=headers,
                            verify=verify)
    sock = args.socket or default_socket()
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                        base_url="http://hvagent", timeout=timeout, headers=headers)


def call(args: argparse.Namespace, method: str, path: str, *, body: Any = None,
         params: dict[str, Any] | None = None, timeout: float | None = 30.0,
         content: bytes | None = None, raw: bool = False) -> Any:
    """One API request: `body` is sent as JSON, `content` as raw bytes; the answer is
    decoded JSON, or its bytes with raw=True."""
    where = args.url or str(args.socket or default_socket())
    try:
        with _client(args, timeout) as c:
            r = c.request(method, API + path, json=body, params=params, content=content)
    except httpx.TransportError as e:
        raise CLIError(f"cannot reach the agent at {where}: {e}") from e
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise CLIError(f"{detail} (HTTP {r.status_code})")
    return r.content if raw else r.json()


def _kv(item: str, option: str) -> tuple[str, dict[str, str]]:
    """`VALUE[,key=v]...` as used by --disk and --new-disk."""
    head, *rest = item.split(",")
    opts = {}
    for r in rest:
        k, sep, v = r.partition("=")
        if not sep or k != "format":
            raise CLIError(f"{option} {item}: unknown option {r!r} (only format=F)")
        opts[k] = v
    if not head:
        raise CLIError(f"{option} {item}: empty value")
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


# output


def _out(args: argparse.Namespace, data: Any, human: Any) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        human(data)


def _vm_table(vms: list[dict[str, Any]]) -> None:
    t = Table(box=None)
    for col in ("NAME", "STATE", "VCPUS", "MEMORY", "DISKS", "PID", "OPERATION"):
        t.add_column(col)
    for vm in vms:
        s = vm["spec"]
        t.add_row(vm["name"], vm["state"], f"{s['vcpus']}/{s['max_vcpus']}",
                  f"{s['memory_mib']}/{s['max_memory_mib']} MiB", str(len(s["disks"])),
                  str(vm["pid"] or "-"), vm["operation"] or "-")
    Console().print(t)


def _vm_show(vm: dict[str, Any]) -> None:
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


def _state_line(vm: dict[str, Any]) -> None:
    print(f"{vm['name']}: {vm['state']}")


# commands


def run(args: argparse.Namespace) -> None:
    # Errors of the subcommand groups (HVError) end as one line in main(), like CLIError.
    if args.command == "audit":
        hvctl_audit.run(args, call)
        return
    vm_command = getattr(args, "vm_command", None)
    if args.command == "disk":
        hvctl_disks.run_disk(args, call, _out)
        return
    if vm_command in hvctl_disks.VM_COMMANDS:
        hvctl_disks.run_vm(args, call, _out)
        return
    if args.command == "checkpoint":
        hvctl_devices.run_checkpoint(args, call, _out)
        return
    if vm_command in hvctl_devices.VM_COMMANDS:
        hvctl_devices.run_vm(args, call, _out)
        return
    cmd = args.vm_command
    if cmd == "create":
        vm = call(args, "POST", "/vms", body=_spec(args), timeout=300)
        _out(args, vm, _state_line)
    elif cmd == "list":
        _out(args, call(args, "GET", "/vms"), _vm_table)
    elif cmd == "show":
        _out(args, call(args, "GET", f"/vms/{args.name}"), _vm_show)
    elif cmd == "stop":
        body = {"force": args.force}
        if args.timeout is not None:
            body["timeout"] = args.timeout
        wait = (args.timeout or 60) + 60
        _out(args, call(args, "POST", f"/vms/{args.name}/stop", body=body, timeout=wait),
             _state_line)
    elif cmd in ("start", "pause", "resume", "reset"):
        _out(args, call(args, "POST", f"/vms/{args.name}/{cmd}", timeout=120), _state_line)
    elif cmd == "delete":
        res = call(args, "DELETE", f"/vms/{args.name}",
                   params={"keep_disks": str(args.keep_disks).lower()})
        _out(args, res, lambda r: print(
            f"{r['name']}: deleted" + (f" (removed {', '.join(r['removed_disks'])})"
                                       if r["removed_disks"] else "")))
    elif cmd == "console":
        res = call(args, "GET", f"/vms/{args.name}/console", params={"lines": args.lines})
        _out(args, res, lambda r: sys.stdout.write(r["text"]))


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
    hvctl_audit.add_parser(top)
    hvctl_devices.add_checkpoint_parser(top)
    hvctl_disks.add_disk_parser(top)

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
    c.add_argument("--nic", action="append", default=[], type=hvctl_devices.parse_nic,
                   metavar="user|vlan=N[,mac=M]", help=hvctl_devices.NIC_HELP)
    c.add_argument("--firmware", choices=["bios", "uefi"], default="bios")

    vm.add_parser("list", help="list VMs")
    for name, help_ in (("show", "show one VM"), ("start", "start"), ("pause", "pause"),
                        ("resume", "resume"), ("reset", "hard reset")):
        vm.add_parser(name, help=help_).add_argument("name")
    s = vm.add_parser("stop", help="ACPI power-off, force-off after a timeout")
    s.add_argument("name")
    s.add_argument("--force", action="store_true", help="force off at once")
    s.add_argument("--timeout", type=float, help="seconds before forcing off (default 60)")
    d = vm.add_parser("delete", help="remove a stopped VM")
    d.add_argument("name")
    d.add_argument("--keep-disks", action="store_true")
    co = vm.add_parser("console", help="tail of the serial console log")
    co.add_argument("name")
    co.add_argument("--lines", type=int, default=50)
    hvctl_devices.add_vm_parsers(vm)
    hvctl_disks.add_vm_parsers(vm)
    return p


def fail(msg: str) -> NoReturn:
    print(f"hvctl: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except CLIError as e:
        fail(str(e))
    except HVError as e:
        fail(e.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
