"""`hvctl vm insert-media|eject-media|boot`: a VM's CD drive and USB stick, and its boot
override (the next boot only, or until disabled)."""

from __future__ import annotations

import argparse

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.output import show
from hvagent.spec import BootDevice, MediaSlot


def add_parsers(vm: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    slots = [str(s) for s in MediaSlot]
    i = vm.add_parser("insert-media", help="put an image (http(s) URL or file) into the "
                                           "VM's CD drive or USB stick")
    i.add_argument("name")
    i.add_argument("image", help="http(s) URL, or a file in the storage directory")
    i.add_argument("--slot", choices=slots, default="cd")
    i.add_argument("--writable", action="store_true", help="not write-protected")
    i.set_defaults(func=insert_media)
    e = vm.add_parser("eject-media", help="take the medium out of the CD drive or USB stick")
    e.add_argument("name")
    e.add_argument("--slot", choices=slots, default="cd")
    e.set_defaults(func=eject_media)
    b = vm.add_parser("boot", help="boot from a device first: the next boot only (--once, "
                                   "the default) or until --disable")
    b.add_argument("name")
    b.add_argument("target", nargs="?", choices=[str(d) for d in BootDevice])
    how = b.add_mutually_exclusive_group()
    how.add_argument("--once", dest="enabled", action="store_const", const="once")
    how.add_argument("--continuous", dest="enabled", action="store_const", const="continuous")
    how.add_argument("--disable", dest="enabled", action="store_const", const="disabled")
    b.set_defaults(func=boot)


def _summary(name: str, vm: dict[str, object]) -> None:
    spec = vm["spec"]
    assert isinstance(spec, dict)
    media = ", ".join(f"{m['slot']}: {m.get('source') or 'empty'}" for m in spec["media"])
    o = spec["boot_override"]
    print(f"{name}: media: {media or 'none'}; boot override: {o['enabled']}"
          + (f" ({o['target']})" if o["enabled"] != "disabled" else ""))


def insert_media(args: argparse.Namespace, agent: Agent) -> None:
    vm = agent.put(f"/vms/{args.name}/media/{args.slot}",
                   body={"image": args.image, "write_protected": not args.writable})
    show(args, vm, lambda r: _summary(args.name, r))


def eject_media(args: argparse.Namespace, agent: Agent) -> None:
    vm = agent.delete(f"/vms/{args.name}/media/{args.slot}")
    show(args, vm, lambda r: _summary(args.name, r))


def boot(args: argparse.Namespace, agent: Agent) -> None:
    body: dict[str, str] = {}
    if args.target:
        body["target"] = args.target
        body["enabled"] = args.enabled or "once"
    elif args.enabled:
        body["enabled"] = args.enabled
    vm = agent.put(f"/vms/{args.name}/boot", body=body)
    show(args, vm, lambda r: _summary(args.name, r))
