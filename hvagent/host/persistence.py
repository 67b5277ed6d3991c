"""Whether a directory survives a power-off: the mount that holds it, read from
/proc/self/mountinfo, and the file system under that mount.

tmpfs, ramfs and the initramfs' rootfs live in RAM; squashfs, iso9660, erofs and cramfs
are read-only images (a diskless host's writes to them land in RAM). An overlay keeps
what is written in its upper directory, so it is as persistent as the mount that holds
that directory. The diskless image runs its root from a squashfs under an overlay whose
upper directory is on a tmpfs under /run/corehost/; a disk labelled COREHOST-DATA
mounted on the agent's state directory is what makes the agent's state persistent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# The warning the agent gives (log, GET /api/v1/agent, `hvctl host info`) when its state
# directory does not survive a power-off.
STATE_IN_RAM_WARNING = ("agent state is in RAM and is lost at power-off: attach a disk "
                        "labelled COREHOST-DATA to keep it")
IN_RAM = frozenset({"tmpfs", "ramfs", "rootfs", "devtmpfs"})
READ_ONLY_IMAGES = frozenset({"squashfs", "iso9660", "erofs", "cramfs"})
KERNEL_VIEWS = frozenset({"proc", "sysfs", "devpts", "cgroup", "cgroup2", "securityfs",
                          "debugfs", "tracefs", "configfs", "pstore", "bpf", "mqueue",
                          "hugetlbfs", "fusectl", "efivarfs", "binfmt_misc", "autofs"})
# Overlays whose upper directory is on another overlay: a chain longer than this is a
# loop in what mountinfo says, not a real stack.
_MAX_DEPTH = 8
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Persistence:
    persistent: bool
    reason: str  # names the mount point and the file system type, for people

    @property
    def warnings(self) -> list[str]:
        return [] if self.persistent else [STATE_IN_RAM_WARNING]


@dataclass(frozen=True)
class Mount:
    id: int
    point: str
    fstype: str
    source: str
    super_options: tuple[str, ...]

    def option(self, key: str) -> str | None:
        prefix = key + "="
        for o in self.super_options:
            if o.startswith(prefix):
                return o[len(prefix):]
        return None


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline, backslash (and, in options, comma and =)
    # as \ooo octal escapes.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text, in its order (a later mount on the same point is
    on top). Lines that are not mountinfo lines are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mounts.append(Mount(
                id=int(fields[0]), point=_unescape(fields[4]), fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=tuple(_unescape(o) for o in fields[sep + 3].split(","))))
        except (ValueError, IndexError):
            continue
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds the absolute, resolved `path`: the longest mount point that
    is `path` or one of its parents; of mounts on the same point, the last (on top)."""
    best: Mount | None = None
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        if point == "/" or path == point or path.startswith(point + "/"):
            if best is None or len(point) >= len(best.point.rstrip("/") or "/"):
                best = m
    return best


def state_persistence(path: Path, mountinfo: str | None = None) -> Persistence:
    """Whether what is written under `path` survives a power-off, and why. `mountinfo`
    is the text of /proc/self/mountinfo (read when None)."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text(errors="replace")
        except OSError as e:
            return Persistence(False, f"{path}: cannot read {MOUNTINFO}: {e.strerror or e}")
    mounts = parse_mountinfo(mountinfo)
    return _judge(str(path), os.path.realpath(path), mounts, set())


def _judge(shown: str, resolved: str, mounts: list[Mount], seen: set[int]) -> Persistence:
    m = mount_of(resolved, mounts)
    if m is None:
        return Persistence(False, f"{shown}: no mount holds {resolved} (is /proc mounted?)")
    where = f"{shown} is on {m.fstype} ({m.point})"
    if m.fstype in IN_RAM:
        return Persistence(False, f"{where}: state is lost at power-off")
    if m.fstype in READ_ONLY_IMAGES:
        return Persistence(False, f"{where}, a read-only image: nothing is kept there")
    if m.fstype in KERNEL_VIEWS:
        return Persistence(False, f"{where}, a view of the kernel: no files are kept there")
    if m.fstype != "overlay":
        return Persistence(True, where)
    upper = m.option("upperdir")
    if upper is None:
        return Persistence(False, f"{where} without an upper directory: nothing is "
                           "kept there")
    seen = seen | {m.id}
    found = os.path.isabs(upper) and os.path.isdir(upper)
    below = mount_of(os.path.realpath(upper), mounts) if found else None
    if below is None or below.id in seen or len(seen) > _MAX_DEPTH:
        # e.g. an upper directory on a mount of the initramfs that was not moved into
        # the root: what holds it cannot be seen from here, so nothing vouches for it.
        return Persistence(False, f"{where}: its upper directory {upper} cannot be found "
                           "from this mount namespace, so it is taken as not persistent")
    under = _judge(shown, os.path.realpath(upper), mounts, seen)
    via = f"{shown} is on {m.fstype} ({m.point}) whose upper directory {upper} is on " \
          f"{below.fstype} ({below.point})"
    if under.persistent:
        return Persistence(True, via)
    if below.fstype in IN_RAM:
        return Persistence(False, f"{shown} is on {below.fstype} ({below.point}), the upper "
                           f"directory of the {m.fstype} at {m.point}: state is lost at "
                           "power-off")
    return Persistence(False, f"{via}; {under.reason}")
