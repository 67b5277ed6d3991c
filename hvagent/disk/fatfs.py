"""FAT (an EFI system partition, say) inside a raw view, read and changed with mtools
(`-i file@@offset`), never mounted. FAT has no symlinks, owners or permission bits;
names match case-insensitively, as on the guest."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hvagent.disk.errors import DiskError
from hvagent.disk.guestpath import Entry, Resolved, join, resolve, split_user_path
from hvagent.disk.volume import Plan, Volume
from hvagent.drivers import storage

IMG = "{IMG}"  # stands for the volume in planned commands
_ENV = {**os.environ, "MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1"}


class FatFS:
    kind = "fat"

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self._dirs: dict[str, dict[str, Entry]] = {}

    def _run(self, argv: list[str], what: str) -> bytes:
        argv = [self.vol.mspec() if a == IMG else a for a in argv]
        proc = storage.tool(argv, what, env=_ENV, timeout=storage.WHOLE_DISK)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise DiskError(f"FAT file system on partition {self.vol.part.number}: {what}: "
                            f"{err[-1] if err else f'{argv[0]} exit {proc.returncode}'}")
        return proc.stdout

    def root(self) -> Entry:
        return Entry("/", "dir", 0o40755)

    def listing(self, directory: Entry) -> dict[str, Entry]:
        if directory.handle in self._dirs:
            return self._dirs[directory.handle]
        text = self._run(["mdir", "-a", "-i", IMG, "::" + directory.handle],
                         f"list {directory.handle}").decode(errors="replace")
        out: dict[str, Entry] = {}
        for line in text.splitlines():
            # "NAME8    EXT   <DIR>|SIZE DATE TIME [LONG NAME]"
            if len(line) < 13 or line.startswith((" ", "Directory for")):
                continue
            fields = line[12:].split(None, 3)
            if len(fields) < 3 or not (fields[0] == "<DIR>" or fields[0].isdigit()):
                continue
            short = line[:8].strip() + ("." + line[9:12].strip() if line[9:12].strip() else "")
            name = fields[3].strip() if len(fields) == 4 and fields[3].strip() else short
            if name in (".", ".."):
                continue
            is_dir = fields[0] == "<DIR>"
            out[name] = Entry(join(directory.handle, name), "dir" if is_dir else "file",
                              0o40755 if is_dir else 0o100644, 0, 0,
                              0 if is_dir else int(fields[0]))
        self._dirs[directory.handle] = out
        return out

    def lookup(self, directory: Entry, name: str) -> Entry | None:
        items = self.listing(directory)
        if name in items:
            return items[name]
        low = name.lower()
        return next((e for n, e in items.items() if n.lower() == low), None)

    def readlink(self, entry: Entry) -> str:
        raise DiskError(f"{entry.handle}: FAT has no symbolic links")

    def resolve(self, path: str, follow: bool = True) -> Resolved:
        return resolve(self, path, follow_final=follow)

    def _existing(self, path: str) -> Resolved:
        r = resolve(self, path)
        if r.entry is None:
            raise DiskError(f"{path}: no such file or directory in the guest")
        return r

    @staticmethod
    def _row(name: str, e: Entry) -> dict[str, object]:
        return {"name": name, "type": e.kind, "mode": f"{e.mode & 0o7777:04o}",
                "uid": 0, "gid": 0, "size": e.size}

    def stat(self, path: str, follow: bool = False) -> dict[str, object]:
        r = self._existing(path)
        assert r.entry is not None
        return {"path": r.path, **self._row(r.name, r.entry)}

    def ls(self, path: str) -> list[dict[str, object]]:
        r = self._existing(path)
        assert r.entry is not None
        if r.entry.kind != "dir":
            return [self._row(r.name, r.entry)]
        return [self._row(n, e) for n, e in sorted(self.listing(r.entry).items())]

    def _file(self, path: str) -> Entry:
        e = self._existing(path).entry
        assert e is not None
        if e.kind != "file":
            raise DiskError(f"{path}: is a directory, not a regular file")
        return e

    def cat(self, path: str) -> bytes:
        e = self._file(path)
        return self._run(["mcopy", "-n", "-i", IMG, "::" + e.handle, "-"], f"read {path}")

    def get(self, path: str, dest: Path) -> None:
        data = self.cat(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)

    @staticmethod
    def _check_name(name: str) -> None:
        if any(c in name for c in '*?"<>|\\:') or not name.strip(" ."):
            raise DiskError(f"name {name!r}: not valid on FAT")

    def plan_put(self, src: Path, path: str, plan: Plan, *, mode: int | None = None,
                 uid: int | None = None, gid: int | None = None, into_dir: bool = True) -> None:
        if not src.is_file():
            raise DiskError(f"{src}: not a regular file on the host")
        if uid or gid:
            raise DiskError("FAT file systems have no owners")
        r = resolve(self, path)
        if r.entry is not None and r.entry.kind == "dir" and not into_dir:
            raise DiskError(f"{path}: is a directory in the guest")
        if r.entry is not None and r.entry.kind == "dir":
            r = resolve(self, join(r.path, src.name))
        if r.parent is None:
            raise DiskError(f"{path}: cannot replace the guest root")
        if r.entry is not None and r.entry.kind != "file":
            raise DiskError(f"{r.path}: exists as a directory in the guest")
        self._check_name(r.name)
        target = r.entry.handle if r.entry else join(r.parent.handle, r.name)
        plan.commands.append(["mcopy", "-o", "-m", "-i", IMG, str(src), "::" + target])
        self.listing(r.parent)[r.name] = Entry(target, "file", 0o100644, 0, 0,
                                               src.stat().st_size)
        plan.changes.append(f"write {target} ({src.stat().st_size} bytes)")

    def plan_symlink(self, target: str, path: str, plan: Plan, *, uid: int = 0,
                     gid: int = 0) -> None:
        raise DiskError(f"{path}: FAT cannot hold symbolic links")

    def plan_mkdir(self, path: str, plan: Plan, *, parents: bool = False, mode: int = 0o755,
                   uid: int = 0, gid: int = 0) -> Entry:
        comps = split_user_path(path)
        cur, entry = "/", self.root()
        for i, comp in enumerate(comps):
            r = resolve(self, join(cur, comp))
            last = i == len(comps) - 1
            if r.entry is None:
                if not parents and not last:
                    raise DiskError(f"{path}: {r.path} does not exist (use -p)")
                assert r.parent is not None
                self._check_name(r.name)
                handle = join(r.parent.handle, r.name)
                plan.commands.append(["mmd", "-i", IMG, "::" + handle])
                entry = Entry(handle, "dir", 0o40755)
                self.listing(r.parent)[r.name] = entry
                self._dirs[handle] = {}
                plan.changes.append(f"mkdir {handle}")
            elif r.entry.kind != "dir":
                raise DiskError(f"{path}: {r.path} exists and is not a directory")
            elif last and not parents:
                raise DiskError(f"{path}: already exists")
            else:
                entry = r.entry
            cur = r.path
        return entry

    def plan_rm(self, path: str, plan: Plan, *, recursive: bool = False) -> None:
        r = resolve(self, path)
        if r.entry is None:
            raise DiskError(f"{path}: no such file or directory in the guest")
        if r.parent is None:
            raise DiskError(f"{path}: refusing to remove the guest root")
        if r.entry.kind == "dir":
            if self.listing(r.entry) and not recursive:
                raise DiskError(f"{r.path}: directory not empty (use -r)")
            plan.commands.append(["mdeltree", "-i", IMG, "::" + r.entry.handle])
        else:
            plan.commands.append(["mdel", "-i", IMG, "::" + r.entry.handle])
        self.listing(r.parent).pop(r.name, None)
        plan.changes.append(f"remove {r.entry.handle}")

    def plan_chmod(self, path: str, mode: int, plan: Plan) -> None:
        raise DiskError(f"{path}: FAT file systems have no permission bits")

    def plan_chown(self, path: str, uid: int | None, gid: int | None, plan: Plan) -> None:
        raise DiskError(f"{path}: FAT file systems have no owners")

    def check_space(self, plan: Plan) -> None:
        """Nothing to check ahead: mcopy refuses a file that does not fit before it
        writes, and the edit is rolled back as a whole anyway (hvagent.disk.fs)."""

    def apply(self, plan: Plan) -> None:
        for argv in plan.commands:
            self._run(argv, "write")

    def verify(self) -> None:
        """fsck.fat -n; it takes no offset, so an offset volume is checked on a copy."""
        if self.vol.offset == 0:
            self._fsck(self.vol.path)
            return
        with tempfile.TemporaryDirectory(prefix="hvdisk-fat-") as work:
            copy = Path(work) / "part.raw"
            with self.vol.path.open("rb") as src, copy.open("wb") as dst:
                src.seek(self.vol.offset)
                left = self.vol.part.size
                while left > 0:
                    chunk = src.read(min(left, 1 << 22))
                    if not chunk:
                        break
                    dst.write(chunk)
                    left -= len(chunk)
            self._fsck(copy)

    def check_clean(self) -> None:
        # FAT keeps no journal an interrupted edit could leave half-replayed; checking
        # it needs a copy (fsck.fat takes no offset), so it is checked after writes only.
        return None

    def repair(self) -> str:
        if self.vol.offset:
            raise DiskError("repairing FAT needs the FUSE export (no --no-fuse)")
        fsck = shutil.which("fsck.fat") or "/usr/sbin/fsck.fat"
        proc = storage.tool([fsck, "-a", str(self.vol.path)], "repair a FAT file system",
                            timeout=storage.WHOLE_DISK)
        if proc.returncode not in (0, 1):
            raise DiskError(f"fsck.fat -a could not repair the file system "
                            f"(exit {proc.returncode})")
        return "repaired" if proc.returncode else "clean"

    @staticmethod
    def _fsck(path: Path) -> None:
        fsck = shutil.which("fsck.fat") or "/usr/sbin/fsck.fat"
        proc = storage.tool([fsck, "-n", str(path)], "check a FAT file system",
                            timeout=storage.WHOLE_DISK)
        if proc.returncode != 0:
            out = proc.stdout.decode(errors="replace").strip().splitlines()
            raise DiskError("fsck.fat -n reports errors after the write: "
                            + (out[-1] if out else f"exit {proc.returncode}"))
