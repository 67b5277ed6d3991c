"""ext2/3/4 inside a raw view, read and changed with e2fsprogs' debugfs (never mounted).

Existing files are always addressed by inode (`<N>`) once hvagent.disk.guestpath has
resolved them, so debugfs's own path walking (which would follow symlinks its own way)
is never involved; new names are created relative to a resolved directory.
"""

from __future__ import annotations

import os
import re
import stat as st
import tempfile
import uuid
from pathlib import Path

from hvagent.disk.errors import DiskError
from hvagent.disk.guestpath import Entry, Resolved, join, resolve, split_user_path
from hvagent.disk.volume import Plan, Volume
from hvagent.drivers import storage

DEBUGFS = "debugfs"
_BANNER = re.compile(r"^debugfs \d")
ROOT_INO = 2


def _kind(mode: int) -> str:
    if st.S_ISDIR(mode):
        return "dir"
    if st.S_ISREG(mode):
        return "file"
    if st.S_ISLNK(mode):
        return "symlink"
    return "other"


def q(name: str) -> str:
    """A name quoted for debugfs's command parser."""
    if '"' in name or "\n" in name or "\0" in name:
        raise DiskError(f"name {name!r}: contains a quote or newline, not supported")
    return f'"{name}"'


class ExtFS:
    kind = "ext"

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self._dirs: dict[str, dict[str, Entry]] = {}
        # Directories created by the plan being built: handle -> (real ancestor, names).
        self._new: dict[str, tuple[str, list[str]]] = {}

    # -- reading ---------------------------------------------------------------------
    def _run(self, request: str) -> bytes:
        proc = storage.tool([DEBUGFS, "-R", request, self.vol.e2spec()],
                            "read an ext file system")
        errs = [ln for ln in proc.stderr.decode(errors="replace").splitlines()
                if ln.strip() and not _BANNER.match(ln)]
        if errs or proc.returncode:
            # The first line says why (e.g. a corrupt superblock); later ones only follow.
            msg = errs[0].removeprefix("debugfs: ") if errs else f"exit {proc.returncode}"
            raise DiskError(f"ext file system on partition {self.vol.part.number}: {msg}")
        return proc.stdout

    def root(self) -> Entry:
        return self._stat_entry(f"<{ROOT_INO}>")

    def _stat_entry(self, handle: str) -> Entry:
        info = self.inode_info(handle)
        return Entry(handle, _kind(info["mode"]), info["mode"], info["uid"], info["gid"],
                     info["size"])

    def listing(self, directory: Entry) -> dict[str, Entry]:
        if directory.handle in self._dirs:
            return self._dirs[directory.handle]
        out: dict[str, Entry] = {}
        for line in self._run(f"ls -p {directory.handle}").decode(
                errors="surrogateescape").splitlines():
            if not line.startswith("/") or not line.endswith("/"):
                continue
            fields = line[1:-1].split("/")
            if len(fields) < 6:
                continue
            ino, mode, uid, gid = fields[:4]
            name, size = "/".join(fields[4:-1]), fields[-1]
            if name in (".", "..") or ino == "0":
                continue
            m = int(mode, 8)
            out[name] = Entry(f"<{ino}>", _kind(m), m, int(uid), int(gid),
                              int(size) if size.isdigit() else 0)
        self._dirs[directory.handle] = out
        return out

    def lookup(self, directory: Entry, name: str) -> Entry | None:
        return self.listing(directory).get(name)

    def readlink(self, entry: Entry) -> str:
        text = self._run(f"stat {entry.handle}").decode(errors="surrogateescape")
        m = re.search(r'Fast link dest: "(.*)"\s*$', text, re.MULTILINE)
        if m:
            return m.group(1)
        # A long target lives in a data block.
        return self._run(f"cat {entry.handle}").decode(errors="surrogateescape")[: entry.size]

    def inode_info(self, handle: str) -> dict[str, int]:
        text = self._run(f"stat {handle}").decode(errors="replace")

        def num(pattern: str, base: int = 10) -> int:
            m = re.search(pattern, text)
            return int(m.group(1), base) if m else 0

        perm = num(r"Mode:\s+(\d+)", 8)
        kind = re.search(r"Type:\s+(\S+)", text)
        tbits = {"regular": st.S_IFREG, "directory": st.S_IFDIR, "symlink": st.S_IFLNK,
                 "FIFO": st.S_IFIFO, "socket": st.S_IFSOCK, "character": st.S_IFCHR,
                 "block": st.S_IFBLK}.get(kind.group(1) if kind else "", 0)
        return {
            "mode": tbits | perm, "uid": num(r"User:\s+(\d+)"), "gid": num(r"Group:\s+(\d+)"),
            "size": num(r"Size:\s+(\d+)"), "links": num(r"Links:\s+(\d+)"),
            "mtime": num(r"mtime:\s+0x([0-9a-f]+)", 16),
        }

    def resolve(self, path: str, follow: bool = True) -> Resolved:
        return resolve(self, path, follow_final=follow)

    def stat(self, path: str, follow: bool = False) -> dict[str, object]:
        r = self._existing(path, follow)
        assert r.entry is not None
        info = self.inode_info(r.entry.handle)
        out: dict[str, object] = {
            "path": r.path, "type": _kind(info["mode"]), "mode": f"{info['mode'] & 0o7777:04o}",
            "uid": info["uid"], "gid": info["gid"], "size": info["size"],
            "links": info["links"], "mtime": info["mtime"], "inode": r.entry.handle[1:-1],
        }
        if r.entry.kind == "symlink":
            out["target"] = self.readlink(r.entry)
        return out

    def ls(self, path: str) -> list[dict[str, object]]:
        r = self._existing(path, True)
        assert r.entry is not None
        if r.entry.kind != "dir":
            return [self._row(r.name, r.entry)]
        return [self._row(n, e) for n, e in sorted(self.listing(r.entry).items())]

    @staticmethod
    def _row(name: str, e: Entry) -> dict[str, object]:
        return {"name": name, "type": e.kind, "mode": f"{e.mode & 0o7777:04o}",
                "uid": e.uid, "gid": e.gid, "size": e.size}

    def _existing(self, path: str, follow: bool) -> Resolved:
        r = resolve(self, path, follow_final=follow)
        if r.entry is None:
            raise DiskError(f"{path}: no such file or directory in the guest")
        return r

    def _file(self, path: str) -> Entry:
        r = self._existing(path, True)
        assert r.entry is not None
        if r.entry.kind != "file":
            raise DiskError(f"{path}: is a {r.entry.kind}, not a regular file")
        return r.entry

    def cat(self, path: str) -> bytes:
        return self._run(f"cat {self._file(path).handle}")

    def get(self, path: str, dest: Path) -> None:
        entry = self._file(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent or ".")
        os.close(fd)
        try:
            self._run(f"dump {entry.handle} {q(tmp)}")
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    # -- planning writes --------------------------------------------------------------
    def _cd(self, handle: str) -> list[str]:
        if handle in self._new:
            base, names = self._new[handle]
            return [f"cd {base}", *(f"cd {q(n)}" for n in names)]
        return [f"cd {handle}"]

    def _add_new_dir(self, parent: Entry, name: str, plan: Plan, mode: int, uid: int,
                     gid: int, guest_path: str) -> Entry:
        plan.steps += [*self._cd(parent.handle), f"mkdir {q(name)}",
                       f"sif {q(name)} mode 0{st.S_IFDIR | mode:o}",
                       f"sif {q(name)} uid {uid}", f"sif {q(name)} gid {gid}"]
        handle = f"new:{guest_path}"
        base, names = self._new.get(parent.handle, (parent.handle, []))
        self._new[handle] = (base, [*names, name])
        entry = Entry(handle, "dir", st.S_IFDIR | mode, uid, gid)
        self.listing(parent)[name] = entry
        self._dirs[handle] = {}
        plan.new_inodes += 1
        plan.file_sizes.append(0)  # its first directory block is counted below
        plan.changes.append(f"mkdir {guest_path}")
        return entry

    def plan_put(self, src: Path, path: str, plan: Plan, *, mode: int | None = None,
                 uid: int | None = None, gid: int | None = None, into_dir: bool = True) -> None:
        if not src.is_file():
            raise DiskError(f"{src}: not a regular file on the host")
        q(str(src))
        r = resolve(self, path, follow_final=True)
        if r.entry is not None and r.entry.kind == "dir" and not into_dir:
            raise DiskError(f"{path}: is a directory in the guest")
        if r.entry is not None and r.entry.kind == "dir":
            r = resolve(self, join(r.path, src.name), follow_final=True)
        if r.parent is None:
            raise DiskError(f"{path}: cannot replace the guest root")
        if r.entry is not None and r.entry.kind != "file":
            raise DiskError(f"{r.path}: exists as a {r.entry.kind} in the guest")
        old = r.entry
        new_mode = mode if mode is not None else (old.mode & 0o7777 if old else 0o644)
        new_uid = uid if uid is not None else (old.uid if old else 0)
        new_gid = gid if gid is not None else (old.gid if old else 0)
        # A replacement is written under a temporary name, then swapped in: a kill
        # mid-way leaves either the old file or the new one under the real name. (`ln`
        # cannot grow a full directory, but it reuses the slot `rm` just freed; `write`
        # grows the directory itself.)
        name = f".hvdisk-{uuid.uuid4().hex[:12]}" if old is not None else q(r.name)
        steps = [*self._cd(r.parent.handle), f"write {q(str(src))} {name}",
                 f"sif {name} mode 0{st.S_IFREG | new_mode:o}",
                 f"sif {name} uid {new_uid}", f"sif {name} gid {new_gid}"]
        if old is not None:
            steps += [f"rm {q(r.name)}", f"ln {name} {q(r.name)}", f"unlink {name}"]
        plan.steps += steps
        plan.file_sizes.append(src.stat().st_size)
        plan.new_inodes += 1
        self.listing(r.parent)[r.name] = Entry(f"new:{r.path}", "file", st.S_IFREG | new_mode,
                                               new_uid, new_gid, src.stat().st_size)
        plan.changes.append(f"write {r.path} ({src.stat().st_size} bytes)")

    def plan_symlink(self, target: str, path: str, plan: Plan, *, uid: int = 0,
                     gid: int = 0) -> None:
        r = resolve(self, path, follow_final=False)
        if r.parent is None:
            raise DiskError(f"{path}: cannot replace the guest root")
        if r.entry is not None and r.entry.kind == "dir":
            raise DiskError(f"{r.path}: exists as a directory in the guest")
        steps = self._cd(r.parent.handle)
        if r.entry is not None:
            steps.append(f"rm {q(r.name)}")
        steps += [f"symlink {q(r.name)} {q(target)}", f"sif {q(r.name)} uid {uid}",
                  f"sif {q(r.name)} gid {gid}"]
        plan.steps += steps
        plan.new_inodes += 1
        plan.file_sizes.append(len(target.encode()))
        self.listing(r.parent)[r.name] = Entry(f"new:{r.path}", "symlink", st.S_IFLNK | 0o777)
        plan.changes.append(f"symlink {r.path} -> {target}")

    def plan_mkdir(self, path: str, plan: Plan, *, parents: bool = False, mode: int = 0o755,
                   uid: int = 0, gid: int = 0) -> Entry:
        comps = split_user_path(path)
        if not comps:
            if parents:
                return self.root()
            raise DiskError(f"{path}: exists")
        cur = "/"
        entry = self.root()
        for i, comp in enumerate(comps):
            r = resolve(self, join(cur, comp), follow_final=True)
            last = i == len(comps) - 1
            if r.entry is None:
                if not parents and not last:
                    raise DiskError(f"{path}: {r.path} does not exist (use -p)")
                assert r.parent is not None
                entry = self._add_new_dir(r.parent, r.name, plan, mode, uid, gid, r.path)
            elif r.entry.kind != "dir":
                raise DiskError(f"{path}: {r.path} exists and is not a directory")
            elif last and not parents:
                raise DiskError(f"{path}: already exists")
            else:
                entry = r.entry
            cur = r.path
        return entry

    def plan_rm(self, path: str, plan: Plan, *, recursive: bool = False) -> None:
        r = resolve(self, path, follow_final=False)
        if r.entry is None:
            raise DiskError(f"{path}: no such file or directory in the guest")
        if r.parent is None:
            raise DiskError(f"{path}: refusing to remove the guest root")
        if r.entry.kind == "dir":
            if self.listing(r.entry) and not recursive:
                raise DiskError(f"{r.path}: directory not empty (use -r)")
            self._plan_rm_tree(r.entry, plan)
            plan.steps += [*self._cd(r.parent.handle), f"rmdir {q(r.name)}"]
        else:
            plan.steps += [*self._cd(r.parent.handle), f"rm {q(r.name)}"]
        self.listing(r.parent).pop(r.name, None)
        plan.changes.append(f"remove {r.path}")

    def _plan_rm_tree(self, directory: Entry, plan: Plan) -> None:
        for name, e in self.listing(directory).items():
            if e.kind == "dir":
                self._plan_rm_tree(e, plan)
                plan.steps += [f"cd {directory.handle}", f"rmdir {q(name)}"]
            else:
                plan.steps += [f"cd {directory.handle}", f"rm {q(name)}"]

    def plan_chmod(self, path: str, mode: int, plan: Plan) -> None:
        e = self._existing(path, True).entry
        assert e is not None
        plan.steps.append(f"sif {e.handle} mode 0{(e.mode & ~0o7777) | mode:o}")
        plan.changes.append(f"chmod {mode:04o} {path}")

    def plan_chown(self, path: str, uid: int | None, gid: int | None, plan: Plan) -> None:
        e = self._existing(path, True).entry
        assert e is not None
        if uid is not None:
            plan.steps.append(f"sif {e.handle} uid {uid}")
        if gid is not None:
            plan.steps.append(f"sif {e.handle} gid {gid}")
        plan.changes.append(f"chown {uid if uid is not None else ''}:"
                            f"{gid if gid is not None else ''} {path}")

    def check_space(self, plan: Plan) -> None:
        """Refuse a plan that cannot fit, before anything is written: the data blocks
        of every file, their extent/indirect blocks, a block per new inode for
        directory growth, and a margin. (A replaced file's old blocks are freed only
        after the new copy is written, so they do not count as free.)"""
        if not plan.file_sizes and not plan.new_inodes:
            return
        text = self._run("stats -h").decode(errors="replace")

        def num(label: str) -> int:
            m = re.search(rf"^{label}:\s+(\d+)", text, re.MULTILINE)
            return int(m.group(1)) if m else 0

        bs, free, free_inodes = num("Block size"), num("Free blocks"), num("Free inodes")
        if not bs:
            return
        need = 16 + plan.new_inodes
        for size in plan.file_sizes:
            blocks = -(-size // bs)
            need += blocks + blocks // (bs // 4) + 1
        if need > free:
            raise DiskError(
                f"not enough space in the ext file system on partition "
                f"{self.vol.part.number}: the change needs about {need * bs >> 10} KiB, "
                f"{free * bs >> 10} KiB are free; nothing written")
        if plan.new_inodes > free_inodes:
            raise DiskError(
                f"not enough inodes in the ext file system on partition "
                f"{self.vol.part.number}: {plan.new_inodes} needed, {free_inodes} free; "
                "nothing written")

    # -- writing ------------------------------------------------------------------------
    def apply(self, plan: Plan) -> None:
        with tempfile.NamedTemporaryFile("w", prefix="hvdisk-", suffix=".debugfs") as script:
            script.write("\n".join(plan.steps) + "\n")
            script.flush()
            proc = storage.tool([DEBUGFS, "-w", "-f", script.name, self.vol.e2spec()],
                                "write an ext file system", timeout=storage.WHOLE_DISK)
        errs = [ln for ln in proc.stderr.decode(errors="replace").splitlines()
                if ln.strip() and not _BANNER.match(ln)]
        if errs or proc.returncode:
            raise DiskError(f"debugfs failed while writing: {errs[0] if errs else proc.returncode}")

    def problems(self) -> str | None:
        """None when `e2fsck -fn` finds the file system clean, else what it said."""
        proc = storage.tool(["e2fsck", "-fn", self.vol.e2spec()], "check an ext file system",
                            timeout=storage.WHOLE_DISK)
        if proc.returncode == 0:
            return None
        lines = [ln for ln in proc.stdout.decode(errors="replace").splitlines()
                 if ln and not ln.startswith(("Pass ", "e2fsck "))]
        return "; ".join(lines[:3]) or f"e2fsck exit {proc.returncode}"

    def check_clean(self) -> None:
        problem = self.problems()
        if problem:
            raise DiskError("the ext file system has errors (an interrupted edit?); nothing "
                            f"written; repair it with `hvdisk fsck --repair`: {problem}")

    def verify(self) -> None:
        problem = self.problems()
        if problem:
            raise DiskError(f"e2fsck -n reports errors after the write: {problem}")

    def repair(self) -> str:
        proc = storage.tool(["e2fsck", "-fy", self.vol.e2spec()], "repair an ext file system",
                            timeout=storage.WHOLE_DISK)
        if proc.returncode & ~3:  # 1 and 2: errors corrected
            raise DiskError(f"e2fsck -fy could not repair the file system (exit "
                            f"{proc.returncode})")
        return "repaired" if proc.returncode else "clean"
