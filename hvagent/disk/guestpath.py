"""Resolving a guest path inside a guest file system, the way the guest itself would
with the file system as its root: symlinks (absolute and relative) are followed inside
the guest, and `..` at the guest root stays at the root, so no path ever leaves the
guest. A `..` in the PATH a user typed that climbs above the root is refused as a
mistake. The file system is reached through a small `Tree` interface that the ext and
FAT back ends implement with e2fsprogs and mtools.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from hvagent.disk.errors import DiskError

MAX_SYMLINKS = 40  # as Linux (ELOOP)


@dataclass(frozen=True)
class Entry:
    handle: str  # back-end reference: "<inode>" for ext, the guest path for FAT
    kind: str  # "dir", "file", "symlink" or "other"
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0


@dataclass(frozen=True)
class Resolved:
    path: str  # the canonical guest path it resolved to
    parent: Entry | None  # None only for the root itself
    name: str
    entry: Entry | None  # None when the last component does not exist


class Tree(Protocol):
    def root(self) -> Entry: ...

    def lookup(self, directory: Entry, name: str) -> Entry | None: ...

    def readlink(self, entry: Entry) -> str: ...


def split_user_path(path: str) -> list[str]:
    """Components of a PATH given on the command line; refuses NUL, empty paths and
    `..` that would climb above the guest root."""
    if not path or "\0" in path:
        raise DiskError(f"path {path!r}: empty or contains NUL")
    parts: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise DiskError(f"path {path!r}: escapes the guest root")
            parts.pop()
            continue
        parts.append(comp)
    return parts


def join(base: str, name: str) -> str:
    return (base.rstrip("/") + "/" + name) if base != "/" else "/" + name


def resolve(tree: Tree, path: str, *, follow_final: bool = True) -> Resolved:
    """Walk `path` from the guest root. Intermediate symlinks are always followed; the
    last one only with follow_final (stat/rm/lstat semantics otherwise). A missing last
    component is allowed (entry None); a missing or non-directory middle one is not."""
    root = tree.root()
    stack: list[tuple[Entry, str]] = [(root, "/")]
    pending = deque(split_user_path(path))
    links = 0
    while pending:
        comp = pending.popleft()
        if comp in ("", "."):
            continue
        if comp == "..":
            if len(stack) > 1:
                stack.pop()
            continue
        cur, cur_path = stack[-1]
        if cur.kind != "dir":
            raise DiskError(f"path {path!r}: {cur_path} is not a directory")
        entry = tree.lookup(cur, comp)
        last = not any(c not in ("", ".") for c in pending)
        if entry is None:
            if last:
                return Resolved(join(cur_path, comp), cur, comp, None)
            raise DiskError(f"path {path!r}: {join(cur_path, comp)} does not exist")
        if entry.kind == "symlink" and (follow_final or not last):
            links += 1
            if links > MAX_SYMLINKS:
                raise DiskError(f"path {path!r}: too many levels of symbolic links")
            target = tree.readlink(entry)
            if not target:
                raise DiskError(f"path {path!r}: empty symlink at {join(cur_path, comp)}")
            if target.startswith("/"):
                del stack[1:]
            pending.extendleft(reversed(target.split("/")))
            continue
        if last:
            return Resolved(join(cur_path, comp), cur, comp, entry)
        stack.append((entry, join(cur_path, comp)))
    entry, entry_path = stack[-1]
    parent = stack[-2][0] if len(stack) > 1 else None
    name = entry_path.rsplit("/", 1)[-1] or "/"
    return Resolved(entry_path, parent, name, entry)
