"""`hvdisk`: VHD/VHDX/qcow2/raw image tooling, offline editing of the file systems inside
a VM's disk (never mounted on the host, no appliance VM), and P2V.

Exit status: 0 success; 1 `check` found problems or `compare` found a difference;
2 a refused or failed request (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hvagent.cli.listing import ls_line
from hvagent.disk import image
from hvagent.disk.errors import DiskError
from hvagent.disk.progress import progress_display
from hvagent.errors import HVError
from hvagent.host.formats import DISK_FORMAT_LABELS, DiskFormat

if TYPE_CHECKING:
    from hvagent.disk import fs

# The guest file system and P2V modules are imported by the commands that use them:
# image commands (convert above all) should cost no more than qemu-img itself.

FORMATS = list(DISK_FORMAT_LABELS)


def _emit(args: argparse.Namespace, data: object, text: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        import json

        print(json.dumps(data, indent=2, default=str))
    else:
        out = text()
        if out:
            print(out)


def _guest(args: argparse.Namespace) -> fs.GuestImage:
    from hvagent.disk import fs

    path, part = fs.parse_target(args.target)
    fuse = False if getattr(args, "no_fuse", False) else None
    return fs.GuestImage(path, part, fuse=fuse, force=getattr(args, "force", False))


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise DiskError(f"mode {text!r}: expected octal, e.g. 0644") from None
    if not 0 <= mode <= 0o7777:
        raise DiskError(f"mode {text!r}: out of range")
    return mode


def _owner(text: str) -> tuple[int | None, int | None]:
    uid, _, gid = text.partition(":")
    try:
        return (int(uid) if uid else None, int(gid) if gid else None)
    except ValueError:
        raise DiskError(f"owner {text!r}: expected numeric UID[:GID]") from None


_VIA = {"fuse": "a FUSE export", "copy": "a raw copy", "direct": "the raw image itself"}


def _via(args: argparse.Namespace, gi: fs.GuestImage) -> None:
    """--verbose: say how the disk was reached (an edit of a raw copy behaves, and
    costs, differently from one through a FUSE export)."""
    if getattr(args, "verbose", False) and gi.via:
        print(f"hvdisk: {gi.image}: via {_VIA[gi.via]}", file=sys.stderr)


def _changes(args: argparse.Namespace, plan: fs.Plan, gi: fs.GuestImage) -> None:
    _via(args, gi)
    _emit(args, {"changes": plan.changes, "via": gi.via},
          lambda: "\n".join(plan.changes) if plan.changes else "nothing to change")


def _size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# -- image commands ----------------------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> int:
    info = image.image_info(Path(a.image), force_share=a.force_share)
    _emit(a, info.to_dict(), lambda: "\n".join([
        f"image: {info.path}",
        f"format: {info.format.label}" + (f" ({info.subformat})" if info.subformat else ""),
        f"virtual size: {_size_text(info.virtual_size)} ({info.virtual_size} bytes)",
        f"disk size: {_size_text(info.actual_size)}",
        *( [f"backing file: {info.backing_file}"] if info.backing_file else []),
        *( [f"snapshots: {', '.join(info.snapshots)}"] if info.snapshots else []),
    ]))
    return 0


def cmd_create(a: argparse.Namespace) -> int:
    info = image.create(Path(a.image), DiskFormat(a.format), image.parse_size(a.size),
                        fixed=a.fixed, overwrite=a.force)
    _emit(a, info.to_dict(), lambda: f"created {info.path}: {info.format.label}, "
                                     f"{info.virtual_size} bytes")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    with progress_display(f"convert {Path(a.src).name}", enabled=not a.quiet) as prog:
        info = image.convert(Path(a.src), Path(a.dst), DiskFormat(a.to), fixed=a.fixed,
                             overwrite=a.force, progress=prog, compress=a.compress)
    _emit(a, info.to_dict(), lambda: f"wrote {info.path}: {info.format.label}, "
                                     f"{info.virtual_size} bytes")
    return 0


def cmd_resize(a: argparse.Namespace) -> int:
    path = Path(a.image)
    size_text = a.size
    if size_text.startswith("+"):
        size = image.image_info(path).virtual_size + image.parse_size(size_text[1:])
    else:
        size = image.parse_size(size_text)
    with progress_display(f"resize {path.name}", enabled=not a.quiet) as prog:
        info = image.resize(path, size, shrink=a.shrink, progress=prog)
    _emit(a, info.to_dict(), lambda: f"{info.path}: virtual size {info.virtual_size} bytes")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    res = image.check(Path(a.image))
    _emit(a, res.to_dict(), lambda: "\n".join(
        [f"{res.path}: {'ok' if res.ok else 'ERRORS'} ({res.format.label})"
         + (f"; {res.note}" if res.note else ""), *(f"  {e}" for e in res.errors)]))
    return 0 if res.ok else 1


def cmd_compare(a: argparse.Namespace) -> int:
    same, why = image.compare(Path(a.a), Path(a.b), strict=a.strict)
    _emit(a, {"identical": same, "detail": why}, lambda: why)
    return 0 if same else 1


def cmd_parts(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    scheme, parts = fs.GuestImage(Path(a.image)).layout()
    _emit(a, {"scheme": scheme, "partitions": [p.to_dict() for p in parts]},
          lambda: "\n".join([f"partition table: {scheme}"] + [
              f"{p.number:>3} start={p.start:<12} size={p.size:<12} fs={p.fs or '-':<6}"
              f" {'ESP ' if p.is_esp else ''}type={p.type}" for p in parts]))
    return 0


# -- guest file commands --------------------------------------------------------------------
def cmd_ls(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    gi = _guest(a)
    rows = fs.ls(gi, a.path)
    _via(a, gi)
    _emit(a, rows, lambda: "\n".join(ls_line(r) if a.long else str(r["name"]) for r in rows))
    return 0


def cmd_stat(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    gi = _guest(a)
    info = fs.stat(gi, a.path, follow=a.follow)
    _via(a, gi)
    _emit(a, info, lambda: "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def cmd_cat(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    gi = _guest(a)
    data = fs.cat(gi, a.path)
    _via(a, gi)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def cmd_get(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    dest = Path(a.dest)
    if dest.is_dir():
        dest = dest / Path(a.path).name
    gi = _guest(a)
    fs.get(gi, a.path, dest)
    _via(a, gi)
    return 0


def cmd_put(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    uid, gid = _owner(a.owner) if a.owner else (None, None)
    gi = _guest(a)
    plan = fs.put(gi, Path(a.src), a.path, mode=_mode(a.mode) if a.mode else None,
                  uid=uid, gid=gid)
    _changes(a, plan, gi)
    return 0


def cmd_rm(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    gi = _guest(a)
    _changes(a, fs.rm(gi, a.path, recursive=a.recursive), gi)
    return 0


def cmd_mkdir(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    uid, gid = _owner(a.owner) if a.owner else (0, 0)
    gi = _guest(a)
    _changes(a, fs.mkdir(gi, a.path, parents=a.parents, mode=_mode(a.mode),
                         uid=uid or 0, gid=gid or 0), gi)
    return 0


def cmd_chmod(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    gi = _guest(a)
    _changes(a, fs.chmod(gi, a.path, _mode(a.mode)), gi)
    return 0


def cmd_chown(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    uid, gid = _owner(a.owner)
    gi = _guest(a)
    _changes(a, fs.chown(gi, a.path, uid, gid), gi)
    return 0


def cmd_fsck(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    gi = _guest(a)
    if a.repair:
        result = gi.repair()
    else:
        problem = gi.read(lambda f: f.problems() if isinstance(f, fs.ExtFS) else None)
        result = "clean" if problem is None else f"errors: {problem}"
    _via(a, gi)
    _emit(a, {"result": result, "via": gi.via}, lambda: result)
    return 0 if not result.startswith("errors") else 1


def cmd_apply(a: argparse.Namespace) -> int:
    from hvagent.disk import fs

    owner: tuple[int, int] | None
    if a.keep_owner:
        owner = None
    else:
        uid, gid = _owner(a.owner)
        owner = (uid or 0, gid or 0)
    gi = _guest(a)
    _changes(a, fs.apply_tree(gi, Path(a.tree), a.dest, owner=owner), gi)
    return 0


# -- P2V -------------------------------------------------------------------------------------
def cmd_p2v(a: argparse.Namespace) -> int:
    from hvagent.disk import p2v

    with progress_display(f"p2v {Path(a.source).name}", enabled=not a.quiet) as prog:
        res = p2v.p2v(Path(a.source), Path(a.out), DiskFormat(a.to), progress=prog,
                      overwrite=a.force)
    _emit(a, res.to_dict(), lambda: "\n".join([
        f"read {res.bytes_read} bytes from {res.source}", f"sha256: {res.sha256}",
        f"wrote {res.output}: {res.format}, {_size_text(res.actual_size)} on disk"]))
    return 0


def cmd_detect(a: argparse.Namespace) -> int:
    from hvagent.disk import p2v

    det = p2v.detect_boot(Path(a.image))
    _emit(a, det.to_dict(), lambda: "\n".join(
        [f"firmware: {det.firmware}", f"disk bus: {det.disk_bus}",
         f"partition table: {det.partition_table}",
         f"initramfs: {det.initramfs or '-'}",
         f"virtio drivers: {', '.join(det.virtio_drivers) or '-'}",
         *(f"warning: {w}" for w in det.warnings)]))
    return 0


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, with the terminal width found without shutil (whose
    import, with its compressors, costs every hvdisk run ~5 ms)."""

    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size().columns
        except (ValueError, OSError):
            width = 80
        super().__init__(prog, width=width - 2)


class _Unused:
    """Stands for the parser of a command this run does not use (see build_parser)."""

    def add_argument(self, *args: object, **kwargs: object) -> None:
        return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line. With `only` (a command name), just that command is built:
    argparse spends ~1 ms per subcommand, which `hvdisk convert` pays on every run. An
    `only` that names no command gets the whole parser (its list of commands, its error)."""
    built: list[str] = []
    p = argparse.ArgumentParser(prog="hvdisk", description=__doc__.split("\n\n")[0],
                                formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str,
            json_out: bool = True) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Unused()  # type: ignore[return-value]
        built.append(name)
        sp = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        sp.set_defaults(fn=fn)
        if json_out:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    sp = add("info", cmd_info, "format, sizes, backing file, snapshots of an image")
    sp.add_argument("image")
    sp.add_argument("-U", "--force-share", action="store_true",
                    help="read even while a VM holds the image (values may be stale)")
    sp = add("create", cmd_create, "create an empty image (VHD sizes are exact)")
    sp.add_argument("image")
    sp.add_argument("size", help="e.g. 10G, 512M or bytes")
    sp.add_argument("-f", "--format", choices=FORMATS, required=True)
    sp.add_argument("--fixed", action="store_true", help="fixed VHD/VHDX, preallocated")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp = add("convert", cmd_convert, "convert an image to another format (sparse)")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.add_argument("-t", "--to", choices=FORMATS, required=True)
    sp.add_argument("--fixed", action="store_true", help="fixed VHD/VHDX output")
    sp.add_argument("--compress", action="store_true", help="compressed qcow2 output")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    sp = add("resize", cmd_resize, "change the virtual size (VHD and VHDX too)")
    sp.add_argument("image")
    sp.add_argument("size", help="new size, or +SIZE to grow by")
    sp.add_argument("--shrink", action="store_true", help="allow cutting the end of the disk")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    sp = add("check", cmd_check, "check image metadata (qcow2, VHDX, and VHD)")
    sp.add_argument("image")
    sp = add("compare", cmd_compare, "compare the guest-visible content of two images")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--strict", action="store_true", help="sizes must match too")
    sp = add("parts", cmd_parts, "partition table and file systems of an image")
    sp.add_argument("image")

    def guest(name: str, fn: Callable[[argparse.Namespace], int], help: str,
              write: bool, json_out: bool = True) -> argparse.ArgumentParser:
        sp = add(name, fn, help, json_out)
        sp.add_argument("target", metavar="IMAGE[@PARTITION]")
        sp.add_argument("--no-fuse", action="store_true",
                        help="edit through a raw copy instead of a FUSE export")
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="say on stderr how the disk was reached (FUSE export or copy)")
        if write:
            sp.add_argument("--force", action="store_true",
                            help="without FUSE: accept losing snapshots / backing chain")
        return sp

    sp = guest("ls", cmd_ls, "list a guest directory", False)
    sp.add_argument("path", nargs="?", default="/")
    sp.add_argument("-l", "--long", action="store_true")
    sp = guest("stat", cmd_stat, "show a guest file's inode data", False)
    sp.add_argument("path")
    sp.add_argument("-L", "--follow", action="store_true", help="follow a final symlink")
    sp = guest("cat", cmd_cat, "print a guest file", False, json_out=False)
    sp.add_argument("path")
    sp = guest("get", cmd_get, "copy a guest file to the host", False, json_out=False)
    sp.add_argument("path")
    sp.add_argument("dest")
    sp = guest("put", cmd_put, "copy a host file into the guest", True)
    sp.add_argument("src")
    sp.add_argument("path")
    sp.add_argument("--mode", help="octal; default: keep the replaced file's, else 0644")
    sp.add_argument("--owner", help="UID[:GID]; default: keep, else 0:0")
    sp = guest("rm", cmd_rm, "remove a guest file or directory", True)
    sp.add_argument("path")
    sp.add_argument("-r", "--recursive", action="store_true")
    sp = guest("mkdir", cmd_mkdir, "create a guest directory", True)
    sp.add_argument("path")
    sp.add_argument("-p", "--parents", action="store_true")
    sp.add_argument("--mode", default="0755")
    sp.add_argument("--owner", help="UID[:GID], default 0:0")
    sp = guest("chmod", cmd_chmod, "change a guest file's mode", True)
    sp.add_argument("mode")
    sp.add_argument("path")
    sp = guest("chown", cmd_chown, "change a guest file's owner (numeric)", True)
    sp.add_argument("owner", metavar="UID[:GID]")
    sp.add_argument("path")
    sp = guest("fsck", cmd_fsck, "check (or --repair) the guest file system", True)
    sp.add_argument("--repair", action="store_true", help="e2fsck -fy / fsck.fat -a")
    sp = guest("apply", cmd_apply, "copy a host directory tree into the guest", True)
    sp.add_argument("--tree", required=True, help="host directory to copy")
    sp.add_argument("--dest", default="/", help="guest directory (default /)")
    sp.add_argument("--owner", default="0:0", help="owner of what is copied (default 0:0)")
    sp.add_argument("--keep-owner", action="store_true", help="use the host files' owners")

    sp = add("p2v", cmd_p2v, "copy a physical disk (block device or raw dump) into an image")
    sp.add_argument("source")
    sp.add_argument("out")
    sp.add_argument("-t", "--to", choices=FORMATS, required=True)
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    sp = add("detect", cmd_detect, "firmware and disk bus a VM needs to boot this disk")
    sp.add_argument("image")
    if only is not None and not built:
        return build_parser()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except HVError as exc:  # DiskError, and a tool that hung (hvagent.host.run)
        print(f"hvdisk: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("hvdisk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
