"""`hvctl vm import` (define a VM from a P2V or other imported image; the agent picks
firmware and disk bus from the disk) and `hvctl disk ls|cat|put|rm|mkdir` (files on a
stopped VM's disk, edited by the agent: Disk.Read / Disk.Write)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.output import show
from hvagent.errors import HVError

# Offline edits of a large disk run e2fsck afterwards: allow them time.
EDIT_TIMEOUT = 600.0


def add_vm_parsers(vm: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = vm.add_parser("import", help="define a VM from a disk image (e.g. `hvdisk p2v` "
                                     "output); firmware and disk bus come from the disk")
    i.add_argument("name")
    i.add_argument("image", help="a path, or a file name in the agent's storage dir")
    i.add_argument("--vcpus", type=int, default=1)
    i.add_argument("--memory", type=int, default=1024, metavar="MIB")
    i.set_defaults(func=import_vm)


def add_disk_parsers(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = top.add_parser("disk", help="files on a stopped VM's disk").add_subparsers(
        dest="disk_command", required=True)

    def cmd(name: str, help_: str, local: str | None = None) -> argparse.ArgumentParser:
        p = d.add_parser(name, help=help_)
        p.add_argument("vm")
        p.add_argument("--disk", type=int, default=0, metavar="I",
                       help="which of the VM's disks (default 0)")
        p.add_argument("--partition", type=int, metavar="N",
                       help="partition number (default: the root file system)")
        p.add_argument("path", help="path inside the guest")
        if local == "optional":
            p.add_argument("local", nargs="?", help="host file to write (default: stdout)")
        elif local == "required":
            p.add_argument("local", help="host file to copy in ('-': stdin)")
        return p

    cmd("ls", "list a guest directory").set_defaults(func=ls)
    cmd("cat", "print a guest file, or save it to LOCAL", "optional").set_defaults(func=cat)
    p = cmd("put", "copy the host file LOCAL to PATH in the guest", "required")
    p.add_argument("--mode", help="octal; default: keep the replaced file's, else 0644")
    p.set_defaults(func=put)
    p = cmd("rm", "remove a guest file or directory")
    p.add_argument("-r", "--recursive", action="store_true")
    p.set_defaults(func=rm)
    p = cmd("mkdir", "create a guest directory")
    p.add_argument("-p", "--parents", action="store_true")
    p.set_defaults(func=mkdir)


# commands


def import_vm(args: argparse.Namespace, agent: Agent) -> None:
    image = Path(args.image)
    # A file the caller can see is sent as an absolute path; anything else is a name
    # the agent resolves inside its storage directory.
    body = {"name": args.name, "image": str(image.absolute()) if image.exists()
            else args.image, "vcpus": args.vcpus, "memory_mib": args.memory}
    res = agent.post("/vms/import", body=body, timeout=300)
    if not args.json:
        for w in res["warnings"]:
            print(f"hvctl: warning: {w}", file=sys.stderr)
    show(args, res, lambda r: print(f"{r['vm']['name']}: {r['vm']['state']} "
                                    f"(firmware {r['firmware']}, disk bus {r['disk_bus']})"))


def ls(args: argparse.Namespace, agent: Agent) -> None:
    show(args, agent.get(f"{_disk(args)}/ls", params=_where(args)), _ls)


def cat(args: argparse.Namespace, agent: Agent) -> None:
    data = agent.get(f"{_disk(args)}/files", params=_where(args), raw=True,
                     timeout=EDIT_TIMEOUT)
    if args.local:
        _save(Path(args.local), data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def put(args: argparse.Namespace, agent: Agent) -> None:
    params = _where(args)
    if args.mode is not None:
        params["mode"] = args.mode
    _changes(args, agent.put(f"{_disk(args)}/files", params=params,
                             content=_read(args.local), timeout=EDIT_TIMEOUT))


def rm(args: argparse.Namespace, agent: Agent) -> None:
    params = {**_where(args), "recursive": str(args.recursive).lower()}
    _changes(args, agent.delete(f"{_disk(args)}/files", params=params, timeout=EDIT_TIMEOUT))


def mkdir(args: argparse.Namespace, agent: Agent) -> None:
    params = {**_where(args), "parents": str(args.parents).lower()}
    _changes(args, agent.post(f"{_disk(args)}/dirs", params=params, timeout=EDIT_TIMEOUT))


def _disk(args: argparse.Namespace) -> str:
    return f"/vms/{args.vm}/disks/{args.disk}"


def _where(args: argparse.Namespace) -> dict[str, Any]:
    """The guest path (and partition) every disk command names."""
    params: dict[str, Any] = {"path": args.path}
    if args.partition is not None:
        params["partition"] = args.partition
    return params


# local files


def _read(local: str) -> bytes:
    if local == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(local).read_bytes()
    except OSError as e:
        raise HVError(f"{local}: cannot read: {e.strerror}") from e


def _save(dest: Path, data: bytes) -> None:
    """Write through a temporary file beside `dest`: no half-written file on failure."""
    if dest.is_dir():
        raise HVError(f"{dest}: is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent.absolute())
    except OSError as e:
        raise HVError(f"{dest}: cannot write: {e.strerror}") from e
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.fchmod(fd, 0o666 & ~mask)  # as a plain open() would (mkstemp makes 0600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


# views


def _changes(args: argparse.Namespace, res: dict[str, Any]) -> None:
    show(args, res, lambda r: print("\n".join(r["changes"]) or "nothing to change"))


def _ls(rows: list[dict[str, Any]]) -> None:
    # The same `ls -l` line as `hvdisk ls -l` prints offline.
    from hvagent.cli.listing import ls_line

    for r in rows:
        print(ls_line(r))
