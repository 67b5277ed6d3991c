"""Late files: an element's static and template files that nothing in the build reads.

An element lists them in its `late-files`, one path in the image per line (`#` starts a
comment); each is the element's `static/<path>` or `templates/<path>.j2`. The base key
(builder.inputs.base_hash) takes their paths and modes but not their contents, so a
change to one of them reuses the cached base (builder.base), and builder.layer writes
the new contents into the image. A file that a hook reads while the image is built must
not be listed: a unit file (`systemctl enable` reads its [Install] section), modprobe.d
(the initramfs copies it), a list a hook creates users from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from builder import render
from builder.paths import display
from builder.profile import Profile

LATE_LIST = "late-files"


class LateFilesError(Exception):
    """A late-files entry that names nothing usable: one line naming file:line."""


@dataclass(frozen=True)
class LateFile:
    element: Path
    source: Path  # static/<path> or templates/<path>.j2
    image_path: str  # relative to the image's root
    template: bool


def late_files(elements: list[Path]) -> list[LateFile]:
    """The late files the elements declare, checked: each names a regular file of its
    own element, once."""
    found: dict[str, LateFile] = {}
    for element in elements:
        listing = element / LATE_LIST
        if not listing.is_file():
            continue
        try:
            text = listing.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise LateFilesError(f"{display(listing)}: not UTF-8 text (byte at offset "
                                 f"{e.start})") from None
        for n, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            where = f"{display(listing)}:{n}: {entry}"
            rel = PurePosixPath(entry.lstrip("/"))
            if not rel.parts or ".." in rel.parts or str(rel) == "." or "\0" in entry:
                raise LateFilesError(f"{where}: not a path in the image")
            static = element / "static" / rel
            template = element / "templates" / f"{rel}.j2"
            if static.is_file() and not static.is_symlink():
                late = LateFile(element, static, str(rel), template=False)
            elif template.is_file() and not template.is_symlink():
                late = LateFile(element, template, str(rel), template=True)
            else:
                raise LateFilesError(f"{where}: neither static/{rel} nor templates/{rel}.j2 "
                                     f"of element {element.name} is a regular file")
            if str(rel) in found:
                raise LateFilesError(f"{where}: listed twice (also by "
                                     f"{display(found[str(rel)].element / LATE_LIST)})")
            found[str(rel)] = late
    return [found[k] for k in sorted(found)]


def contents(profile: Profile, files: list[LateFile]) -> dict[str, tuple[bytes, int]]:
    """What each late file is in this build's image: (bytes, permission bits)."""
    out: dict[str, tuple[bytes, int]] = {}
    for f in files:
        mode = f.source.stat().st_mode & 0o7777
        if f.template:
            out[f.image_path] = (render.render_template(f.element, f.source, profile).encode(),
                                 mode)
        else:
            out[f.image_path] = (f.source.read_bytes(), mode)
    return out


def digest(files: dict[str, tuple[bytes, int]]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        data, mode = files[path]
        h.update(f"{path}\0{mode:o}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()
