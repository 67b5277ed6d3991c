"""A file system's location inside a raw view of a disk, and the change plan type that
the ext and FAT back ends produce while reading and carry out while writing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hvagent.disk.parttable import Partition


@dataclass(frozen=True)
class Volume:
    path: Path  # a raw file: a FUSE export, a raw image or a raw copy
    offset: int  # where the file system starts inside `path`
    part: Partition

    @property
    def fs(self) -> str:
        assert self.part.fs is not None
        return self.part.fs

    def e2spec(self) -> str:
        # e2fsprogs' unix I/O manager reads "file?offset=BYTES".
        return f"{self.path}?offset={self.offset}" if self.offset else str(self.path)

    def mspec(self) -> str:
        # mtools reads "file@@BYTES".
        return f"{self.path}@@{self.offset}" if self.offset else str(self.path)


@dataclass
class Plan:
    """Changes worked out against a read-only view, applied later in one go, so that
    anything refused is refused before the image is opened for writing."""

    steps: list[str] = field(default_factory=list)  # debugfs script lines (ext)
    commands: list[list[str]] = field(default_factory=list)  # mtools argv, "{IMG}" = volume
    changes: list[str] = field(default_factory=list)  # what a human is told
    file_sizes: list[int] = field(default_factory=list)  # bytes of each file written
    new_inodes: int = 0  # files, directories and symlinks created

    def __bool__(self) -> bool:
        return bool(self.steps or self.commands)
