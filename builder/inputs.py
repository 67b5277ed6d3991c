"""The input hash: one digest over everything that shapes an image, so a build whose
inputs are unchanged (and whose artifacts are intact) is skipped.

The inputs are the resolved profile, every element the image uses (with element-deps;
templates live in them), the agent's source (only for images that carry the agent) and
diskimage-builder's version. Each part is recorded beside the digest in manifest.json,
so a rebuild can say what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from builder.paths import repo_root
from builder.profile import Profile

# What goes into the corehost wheel (and so into the image).
AGENT_SOURCES = ("pyproject.toml", "README.md", "builder", "hvagent")


def hash_tree(h: hashlib._Hash, root: Path, paths: Iterable[Path],
              without_content: frozenset[Path] = frozenset()) -> None:
    """Feed file names (relative to root), modes and contents into h, in a stable order;
    of the files in without_content only names and modes."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() or f.is_symlink()]
        elif p.exists():
            files.append(p)
    for f in sorted(set(files)):
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        rel = f.relative_to(root).as_posix()
        h.update(f"{rel}\0{f.lstat().st_mode:o}\0".encode())
        if f in without_content:
            h.update(b"<laid late>")
            continue
        h.update(os.readlink(f).encode() if f.is_symlink() else f.read_bytes())
        h.update(b"\0")


def agent_source_hash() -> str:
    root = repo_root()
    h = hashlib.sha256()
    hash_tree(h, root, [root / p for p in AGENT_SOURCES])
    return h.hexdigest()


@dataclass(frozen=True)
class Inputs:
    digest: str
    parts: dict[str, Any]


def input_hash(profile: Profile, elements: list[Path], agent_hash: str | None,
               without_content: frozenset[Path] = frozenset()) -> Inputs:
    """One hash over everything that shapes the image: resolved profile, every element
    used (with element-deps; templates live in them), agent source and DIB's version
    (of the element files in without_content only names and modes)."""
    parts: dict[str, Any] = {
        "profile": hashlib.sha256(
            json.dumps(profile.to_dict(), sort_keys=True).encode()).hexdigest(),
        "elements": {},
        "agent_source": agent_hash,
        "diskimage-builder": version("diskimage-builder"),
    }
    for element in elements:
        h = hashlib.sha256()
        hash_tree(h, element, [element], without_content)
        parts["elements"][element.name] = h.hexdigest()
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return Inputs(digest, parts)


# What produced a base (builder.base) besides the profile and the elements: the builder's
# code (it renders the overlay and runs DIB) and the project file whose dependency list
# the agent's wheels in the image come from, and the agent's schemas a profile's `agent`
# and `policy` are resolved with (what templates render). The rest of the agent's
# package (hvagent/) and the README (the wheel's description) are left out: the layer
# replaces them.
BASE_SOURCES = ("builder", "pyproject.toml", "hvagent/config.py", "hvagent/access/policy.py")


def base_hash(profile: Profile, elements: list[Path], dib_command: dict[str, Any],
              with_agent: bool, late: frozenset[Path] = frozenset()) -> Inputs:
    """The key of the base an image starts from: everything that shapes what DIB writes,
    except the agent's source (see BASE_SOURCES) and the contents of the late files
    (builder.late; `late` holds their sources). dib_command is DIB's argv and environment
    with the build's own paths replaced by placeholders."""
    whole = input_hash(profile, elements, None, late)
    root = repo_root()
    h = hashlib.sha256()
    hash_tree(h, root, [root / p for p in BASE_SOURCES])
    parts = {**whole.parts, "builder_source": h.hexdigest(), "with_agent": with_agent,
             "dib_command": dib_command}
    del parts["agent_source"]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return Inputs(digest, parts)


def changed_inputs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of what differs between two input records (e.g. `element hvagent`)."""
    names = []
    for key in sorted(set(old) | set(new)):
        if key == "elements":
            a, b = old.get(key) or {}, new.get(key) or {}
            names += [f"element {e}" for e in sorted(set(a) | set(b)) if a.get(e) != b.get(e)]
        elif old.get(key) != new.get(key):
            names.append(key.replace("_", " "))
    return names or ["unknown"]
