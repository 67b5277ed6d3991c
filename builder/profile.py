"""Image profiles: load profiles/NAME.yaml, resolve `extends:`, validate into a frozen Profile.

One table, FIELDS, drives parsing, validation, inheritance and the docs: a new setting is
one row. Every user error is a ProfileError that reads `FILE:LINE: FIELD: message`, with
the line taken from the YAML node marks.

Inheritance (single, cycles detected): scalars and `outputs` are overridden by the
child; `elements` are appended (deduplicated, order kept); `packages` add/remove lists
are concatenated and the resolved list is adds minus removes; `agent` is merged key by
key; `users` are merged by name (a child's keys override the parent's for that user).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from builder.paths import display, profiles_dir
from hvagent.config import AgentConfig
from hvagent.host.kvm import Accel

LinePath = tuple[str | int, ...]


class ProfileError(Exception):
    """A mistake in a profile file, located as file:line: field."""

    def __init__(self, file: Path | str, line: int, fieldname: str, message: str) -> None:
        self.file = display(Path(file))
        self.line = line
        self.field = fieldname
        self.message = message
        where = f"{self.file}:{line}" if line > 0 else self.file
        super().__init__(f"{where}: {fieldname}: {message}")


class OutputFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    VHD = "vhd"
    VHDX = "vhdx"
    USB = "usb"
    PXE = "pxe"


# Elements an output needs, appended to the profile's own: the pxe bundle needs the
# diskless boot script in the initramfs and the squashfs written at the end of the build.
OUTPUT_ELEMENTS: dict[OutputFormat, tuple[str, ...]] = {OutputFormat.PXE: ("pxe",)}


class Merge(StrEnum):
    OWN = "own"  # never inherited (name, extends)
    OVERRIDE = "override"  # child replaces parent
    APPEND = "append"  # parent + child, deduplicated, order kept
    PACKAGES = "packages"  # add/remove lists concatenated
    KEYWISE = "keywise"  # dict merged key by key
    BY_NAME = "by_name"  # list of dicts merged by their `name`


@dataclass(frozen=True)
class User:
    name: str
    ssh_keys: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    sudo: bool = False


# The agent settings an image profile may choose. hvagent.config.AgentConfig owns them,
# their types and their defaults; the rest of its settings (TLS, tokens) belong to a host.
AGENT_KEYS = ("accel", "listen", "state_dir", "storage_dir", "run_dir", "log_dir")


@dataclass(frozen=True)
class AgentSettings:
    """The image's agent configuration: the profile's `agent:` block validated into
    hvagent.config.AgentConfig, the agent's own defaults filling the unset keys.
    Templates read each setting as text (`profile.agent.storage_dir`)."""

    config: AgentConfig

    def __getattr__(self, key: str) -> str:
        if key in AGENT_KEYS:
            return str(getattr(self.config, key))
        raise AttributeError(key)

    def to_dict(self) -> dict[str, str]:
        return {key: str(getattr(self.config, key)) for key in AGENT_KEYS}

    @property
    def writable_dirs(self) -> tuple[str, ...]:
        """Every directory the agent writes (its unit's ReadWritePaths), each once."""
        return tuple(dict.fromkeys(str(d) for _, d in self.config.writable_dirs()))

    @property
    def policy_dir(self) -> str:
        """The policy file's directory: PUT /api/v1/policy renames a new file into it
        (writable for the unit, but not made or re-moded by tmpfiles.d like the rest)."""
        return str(self.config.policy.parent)


@dataclass(frozen=True)
class Profile:
    """A resolved profile: what the image is made of. Templates see it as `profile`."""

    name: str
    description: str
    path: Path
    extends_chain: tuple[str, ...]  # ancestors, nearest first
    release: str
    elements: tuple[str, ...]
    packages: tuple[str, ...]
    packages_removed: tuple[str, ...]
    kernel_modules: tuple[str, ...]  # entries added to server-core's module allow-list
    image_size: str | None
    outputs: tuple[OutputFormat, ...]
    users: tuple[User, ...]
    kernel_cmdline: str
    agent: AgentSettings
    policy: Mapping[str, Any]
    test_access: bool
    # Where each top-level field got its value: (file, line), for later error messages.
    locations: Mapping[str, tuple[Path, int]] = field(compare=False, repr=False)

    @property
    def build_elements(self) -> tuple[str, ...]:
        """The profile's elements plus what its outputs need (OUTPUT_ELEMENTS)."""
        extra = [e for fmt in self.outputs for e in OUTPUT_ELEMENTS.get(fmt, ())]
        return tuple(dict.fromkeys([*self.elements, *extra]))

    @property
    def image_size_gb(self) -> str | None:
        """The size as DIB's --image-size wants it: a number of GB."""
        return None if self.image_size is None else size_to_gb(self.image_size)

    def error(self, fieldname: str, message: str) -> ProfileError:
        file, line = self.locations.get(fieldname.split(".")[0], (self.path, 1))
        return ProfileError(file, line, fieldname, message)

    def to_dict(self) -> dict[str, Any]:
        """The resolved profile as plain data (for --dry-run, manifest.json, input hash)."""
        d = asdict(self)
        d.pop("locations")
        d["agent"] = self.agent.to_dict()
        d["path"] = display(self.path)
        d["outputs"] = [str(o) for o in self.outputs]
        for key in ("extends_chain", "elements", "packages", "packages_removed",
                    "kernel_modules"):
            d[key] = list(d[key])
        d["users"] = [
            {**u, "ssh_keys": list(u["ssh_keys"]), "groups": list(u["groups"])} for u in d["users"]
        ]
        return d


# ---------------------------------------------------------------- YAML with line numbers


@dataclass
class _Doc:
    file: Path
    data: dict[str, Any]
    lines: dict[LinePath, int]

    def line(self, path: LinePath) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: LinePath, message: str) -> ProfileError:
        name = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path)
        return ProfileError(self.file, self.line(path), name.replace(".[", "["), message)


# Limits on a profile file, stated once. Profiles are a few dozen lines; the caps keep a
# hostile file (an alias "billion laughs", a deep nest, /dev/zero) from costing more than
# a moment and a few MB before it is refused.
MAX_PROFILE_BYTES = 256 * 1024
MAX_ALIASES = 100  # *alias references in one file
MAX_NODES = 20_000  # values in the document once aliases are expanded
MAX_DEPTH = 32  # nesting of mappings and lists
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Limit(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses documents nested too deep or with too many aliases while
    composing (PyYAML's composer recurses and resolves aliases by reference)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Limit(line,
                             f"more than {MAX_ALIASES} aliases; write the values out or use "
                             "extends:")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Limit(line, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _what_file(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _read_profile(file: Path) -> str:
    """The file's text: a regular file of at most MAX_PROFILE_BYTES, in UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProfileError(file, 0, "profile", "no such profile file") from None
    except OSError as e:
        raise ProfileError(file, 0, "profile", f"cannot read: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ProfileError(file, 0, "profile", f"is {_what_file(mode)}, expected a YAML file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise ProfileError(file, 0, "profile", f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(file, 0, "profile",
                           f"larger than {MAX_PROFILE_BYTES // 1024} KiB; not a profile")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ProfileError(file, line, "yaml",
                           f"not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def _load_yaml(file: Path) -> _Doc:
    text = _read_profile(file)
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except _Limit as e:
        raise ProfileError(file, e.line, "yaml", str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        if context and problem.startswith("but "):  # "expected ..., but found ..."
            problem = f"{context}, {problem}"
        raise ProfileError(file, line, "yaml", f"invalid YAML: {problem}") from None
    lines: dict[LinePath, int] = {}
    constructor = yaml.constructor.SafeConstructor()
    nodes = 0
    active: set[int] = set()  # nodes being converted: an alias back to one is a cycle

    def dotted(path: LinePath) -> str:
        name = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path)
        return name.replace(".[", "[") or "yaml"

    def scalar(node: yaml.Node, path: LinePath) -> Any:
        try:
            return constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            problem = (getattr(e, "problem", None) or str(e)).split(";")[0]
            raise ProfileError(file, node.start_mark.line + 1, dotted(path),
                               f"invalid value: {problem}") from None

    def convert(node: yaml.Node, path: LinePath) -> Any:
        nonlocal nodes
        nodes += 1
        line = node.start_mark.line + 1
        if nodes > MAX_NODES:  # named at the top-level setting whose expansion is too big
            raise ProfileError(file, lines.get(path[:1], line), "yaml",
                               f"more than {MAX_NODES} values once aliases are expanded")
        if id(node) in active:
            # The node's own mark is its anchor's; the key or item naming the alias is here.
            raise ProfileError(file, lines.get(path, line), dotted(path),
                               "an alias refers to itself (recursive anchor)")
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            return scalar(node, path)
        if node.tag not in _PLAIN_TAGS:
            raise ProfileError(file, line, dotted(path), f"unsupported YAML tag {node.tag!r}")
        active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    lines[(*path, i)] = item.start_mark.line + 1
                    items.append(convert(item, (*path, i)))
                return items
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                kline = knode.start_mark.line + 1
                if knode.tag == _MERGE_TAG:
                    raise ProfileError(file, kline, dotted(path), "merge keys (<<) are not "
                                       "supported; use extends: to build on another profile")
                key = scalar(knode, path) if isinstance(knode, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    shown = repr(key) if key is not None or isinstance(
                        knode, yaml.ScalarNode) else "a " + knode.id
                    raise ProfileError(file, kline, dotted(path),
                                       f"keys must be strings, got {shown}")
                if key in out:
                    raise ProfileError(file, kline, dotted((*path, key)), "duplicate key")
                lines[(*path, key)] = kline
                out[key] = convert(vnode, (*path, key))
            return out
        finally:
            active.discard(id(node))

    if root is None:
        raise ProfileError(file, 1, "yaml", "empty file, expected a mapping of settings")
    if not isinstance(root, yaml.MappingNode):
        raise ProfileError(file, root.start_mark.line + 1, "yaml",
                           "expected a mapping of settings at the top level")
    return _Doc(file, convert(root, ()), lines)


# ---------------------------------------------------------------- value parsers

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
ELEMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([MGT])$")
# A host image's disk: DIB writes it whole (raw) before converting, so a size beyond any
# real host's disk only fails late; 2T is far above what a host OS needs.
MAX_IMAGE_SIZE = "2T"
MAX_POLICY_INT = 2**31 - 1
SSH_KEY_RE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+")

Parser = Callable[[_Doc, LinePath, Any], Any]


def size_to_gb(size: str) -> str:
    m = SIZE_RE.match(size)
    assert m, size
    gb = float(m.group(1)) * {"M": 1 / 1024, "G": 1, "T": 1024}[m.group(2)]
    return f"{gb:.3f}".rstrip("0").rstrip(".")


def _str(pattern: re.Pattern[str] | None = None, what: str = "") -> Parser:
    def parse(doc: _Doc, path: LinePath, v: Any) -> str:
        if not isinstance(v, str):
            raise doc.error(path, f"expected a string, got {_kind(v)}")
        if pattern is not None and not pattern.match(v):
            raise doc.error(path, f"{v!r} is not {what}")
        return v
    return parse


def _bool(doc: _Doc, path: LinePath, v: Any) -> bool:
    if not isinstance(v, bool):
        raise doc.error(path, f"expected true or false, got {_kind(v)}")
    return v


def _str_list(pattern: re.Pattern[str] | None = None, what: str = "") -> Parser:
    def parse(doc: _Doc, path: LinePath, v: Any) -> list[str]:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise doc.error(path, "expected a list of strings")
        if pattern is not None:
            for i, x in enumerate(v):
                if not pattern.match(x):
                    raise doc.error((*path, i), f"{x!r} is not {what}")
        return list(v)
    return parse


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", bytes: "binary data", date: "a date",
            datetime: "a date and time"}.get(type(v), type(v).__name__)


def _mapping(doc: _Doc, path: LinePath, v: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise doc.error(path, f"expected a mapping with keys {', '.join(allowed)}, got {_kind(v)}")
    for k in v:
        if k not in allowed:
            raise doc.error((*path, k), f"unknown key (allowed: {', '.join(allowed)})")
    return v


def _packages(doc: _Doc, path: LinePath, v: Any) -> dict[str, list[str]]:
    names = _str_list(PACKAGE_RE, "a Debian package name")
    if isinstance(v, list):  # shorthand: a plain list means `add`
        return {"add": names(doc, path, v), "remove": []}
    if not isinstance(v, dict):
        raise doc.error(path, "expected a list of strings or a mapping {add: [...], remove: [...]}")
    _mapping(doc, path, v, ("add", "remove"))
    return {k: names(doc, (*path, k), v.get(k, [])) for k in ("add", "remove")}


# An entry of server-core's kernel-modules.allow: a path below /lib/modules/<v>/kernel/,
# globs * and ? allowed; the same rule its kernel-modules-rules applies to the list.
MODULE_PATH_RE = re.compile(r"^[A-Za-z0-9_.*?+,-]+(/[A-Za-z0-9_.*?+,-]+)*/?$")


def _kernel_modules(doc: _Doc, path: LinePath, v: Any) -> list[str]:
    entries = _str_list()(doc, path, v)
    for i, entry in enumerate(entries):
        if entry.startswith("/"):
            raise doc.error((*path, i), f"{entry!r} must be a path below kernel/, without a "
                            "leading / (e.g. drivers/net/ethernet/intel/ice)")
        if not MODULE_PATH_RE.match(entry):
            raise doc.error((*path, i), f"{entry!r} is not a module path (letters, digits, "
                            ". _ - + , / and the globs * ?)")
        if {".", ".."} & set(entry.rstrip("/").split("/")):
            raise doc.error((*path, i), f"{entry!r} must not contain . or .. components")
    return entries


def _image_size(doc: _Doc, path: LinePath, v: Any) -> str:
    if not isinstance(v, str) or not SIZE_RE.match(v):
        raise doc.error(path, f"expected a size like 3G or 512M, got {v!r}")
    gb = float(size_to_gb(v))
    if gb <= 0:
        raise doc.error(path, "must be larger than zero")
    if gb > float(size_to_gb(MAX_IMAGE_SIZE)):
        raise doc.error(path, f"{v} is larger than the limit of {MAX_IMAGE_SIZE}")
    return v


def _outputs(doc: _Doc, path: LinePath, v: Any) -> list[OutputFormat]:
    names = _str_list()(doc, path, v)
    if not names:
        raise doc.error(path, "expected at least one output format")
    out: list[OutputFormat] = []
    for i, n in enumerate(names):
        try:
            fmt = OutputFormat(n)
        except ValueError:
            raise doc.error((*path, i), f"unknown output {n!r} (choose from "
                            f"{', '.join(o.value for o in OutputFormat)})") from None
        if fmt not in out:
            out.append(fmt)
    return out


def _users(doc: _Doc, path: LinePath, v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise doc.error(path, f"expected a list of users, got {_kind(v)}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, u in enumerate(v):
        p = (*path, i)
        _mapping(doc, p, u, ("name", "ssh_keys", "groups", "sudo"))
        if "name" not in u:
            raise doc.error(p, "each user needs a name")
        user: dict[str, Any] = {"name": _str(USER_RE, "a valid user name")(doc, (*p, "name"),
                                                                             u["name"])}
        if user["name"] in seen:
            raise doc.error((*p, "name"), f"user {user['name']!r} listed twice")
        seen.add(user["name"])
        if "ssh_keys" in u:
            user["ssh_keys"] = _str_list(SSH_KEY_RE, "an OpenSSH public key")(
                doc, (*p, "ssh_keys"), u["ssh_keys"])
        if "groups" in u:
            user["groups"] = _str_list(USER_RE, "a valid group name")(doc, (*p, "groups"),
                                                                      u["groups"])
        if "sudo" in u:
            user["sudo"] = _bool(doc, (*p, "sudo"), u["sudo"])
        out.append(user)
    return out


def _cmdline(doc: _Doc, path: LinePath, v: Any) -> str:
    s = _str()(doc, path, v)
    # It ends up inside a double-quoted GRUB_CMDLINE_LINUX_DEFAULT.
    if any(c in s for c in '"\n\\$`'):
        raise doc.error(path, "must not contain quotes, backslashes, $, ` or newlines")
    # The PXE bundle puts it unquoted on a GRUB `linux` line and an iPXE `kernel` line,
    # where these separate or redirect commands.
    if any(ord(c) < 32 or ord(c) == 127 or c in "';&|<>{}" for c in s):
        raise doc.error(path, "must not contain control characters or any of ' ; & | < > { }")
    return s.strip()


def _schema_error(doc: _Doc, path: LinePath, e: ValidationError) -> ProfileError:
    """The first error of the agent's own schema, located at its key in the profile."""
    err = e.errors()[0]
    loc = tuple(str(x) if isinstance(x, str) else x for x in err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    return doc.error((*path, *loc), msg.removeprefix("Value error, "))


PATH_MAX = 4095  # bytes of a path the kernel accepts (PATH_MAX less the NUL)


def _agent(doc: _Doc, path: LinePath, v: Any) -> dict[str, str]:
    """The agent settings, checked with the agent's own schema (AgentConfig). Paths must
    be absolute here: the image's agent has no working directory to resolve them from."""
    _mapping(doc, path, v, AGENT_KEYS)
    accels = [a.value for a in Accel]
    out: dict[str, str] = {}
    for k, val in v.items():
        s = _str()(doc, (*path, k), val)
        if k == "accel":
            if s not in accels:
                raise doc.error((*path, k), f"expected {', '.join(accels[:-1])} or "
                                f"{accels[-1]}, got {s!r}")
        elif not s.startswith("/"):
            raise doc.error((*path, k), f"expected an absolute path, got {s!r}")
        elif len(s.encode()) > PATH_MAX or any(c.isspace() or not c.isprintable() for c in s):
            # The paths are written into the unit (ReadWritePaths) and tmpfiles.d, whose
            # lines split on whitespace: a space, a newline or a NUL would change them.
            raise doc.error((*path, k), f"expected a path of printable characters without "
                            f"spaces, at most {PATH_MAX} bytes, got {s[:60]!r}")
        out[k] = s
    try:
        AgentConfig.model_validate(out)
    except ValidationError as e:
        raise _schema_error(doc, path, e) from None
    return out


def _policy(doc: _Doc, path: LinePath, v: Any) -> dict[str, Any]:
    """The agent's host policy, checked now with the agent's own schema so a mistake
    fails the build (naming the profile line), not the agent's start on the host."""
    from hvagent.access.policy import HostPolicy

    if not isinstance(v, dict):
        raise doc.error(path, f"expected a mapping (hvagent host policy), got {_kind(v)}")

    def plain(x: Any, p: LinePath) -> None:
        # The rendered policy is read back by the agent: only JSON-like values, and whole
        # numbers within MAX_POLICY_INT (a larger quota is no quota).
        if isinstance(x, dict):
            for k, val in x.items():
                plain(val, (*p, k))
        elif isinstance(x, list):
            for i, val in enumerate(x):
                plain(val, (*p, i))
        elif isinstance(x, bool) or x is None or isinstance(x, str | float):
            return
        elif isinstance(x, int):
            if abs(x) > MAX_POLICY_INT:
                raise doc.error(p, f"{x} is out of range (at most {MAX_POLICY_INT})")
        else:
            raise doc.error(p, f"expected a string, number, list or mapping, got {_kind(x)}")

    plain(v, path)
    try:
        # strict: true is not 1 and 4.0 is not 4 (pydantic's lax mode would accept both).
        HostPolicy.model_validate_json(json.dumps(v), strict=True)
    except ValidationError as e:
        raise _schema_error(doc, path, e) from None
    return v


@dataclass(frozen=True)
class Field:
    key: str
    parse: Parser
    merge: Merge
    default: Any
    doc: str


FIELDS: tuple[Field, ...] = (
    Field("name", _str(NAME_RE, "a profile name ([a-z0-9_-])"), Merge.OWN, None,
          "Profile name; must equal the file name without .yaml."),
    Field("description", _str(), Merge.OVERRIDE, "", "One line saying what the image is for."),
    Field("extends", _str(NAME_RE, "a profile name"), Merge.OWN, None,
          "Another profile in the same directory this one builds on."),
    Field("release", _str(re.compile(r"^[a-z]+$"), "a Debian release name"), Merge.OVERRIDE,
          "bookworm", "Debian release (DIB_RELEASE)."),
    Field("elements", _str_list(ELEMENT_RE, "an element name"), Merge.APPEND, [],
          "diskimage-builder elements; appended to the parent's."),
    Field("packages", _packages, Merge.PACKAGES, {"add": [], "remove": []},
          "Extra packages: {add: [...], remove: [...]} (a plain list means add)."),
    Field("kernel_modules", _kernel_modules, Merge.APPEND, [],
          "Kernel modules kept beyond server-core's allow-list: paths below "
          "/lib/modules/<version>/kernel/ (globs * ?), e.g. drivers/net/wireless; appended."),
    Field("image_size", _image_size, Merge.OVERRIDE, None,
          f"Disk size, e.g. 3G (DIB --image-size), at most {MAX_IMAGE_SIZE}; unset lets DIB "
          "size it to fit."),
    Field("outputs", _outputs, Merge.OVERRIDE, [OutputFormat.QCOW2],
          "Artifacts: qcow2, raw, vhd, vhdx, usb (BIOS + UEFI), pxe (diskless bundle)."),
    Field("users", _users, Merge.BY_NAME, [],
          "Users: [{name, ssh_keys, groups, sudo}], merged by name."),
    Field("kernel_cmdline", _cmdline, Merge.OVERRIDE, "",
          "Appended to DIB's default kernel command line."),
    Field("agent", _agent, Merge.KEYWISE, {},
          f"hvagent settings: {', '.join(AGENT_KEYS)}; unset keys keep the agent's defaults "
          "(hvagent.config.AgentConfig)."),
    Field("policy", _policy, Merge.KEYWISE, {},
          "hvagent host policy (/etc/hvagent/policy.yaml): quotas, disk_formats, vlans, "
          "nested_virtualization, roles, acl; merged key by key."),
    Field("test_access", _bool, Merge.OVERRIDE, False,
          "Accept an ssh key from QEMU fw_cfg at boot (adds the test-access element)."),
)
FIELD_BY_KEY = {f.key: f for f in FIELDS}
TEST_ACCESS_ELEMENT = "test-access"


def _parse_file(file: Path) -> tuple[_Doc, dict[str, Any]]:
    doc = _load_yaml(file)
    values: dict[str, Any] = {}
    for key, raw in doc.data.items():
        f = FIELD_BY_KEY.get(key)
        if f is None:
            raise doc.error((key,), f"unknown key (allowed: {', '.join(FIELD_BY_KEY)})")
        values[key] = f.parse(doc, (key,), raw)
    if "name" not in values:
        raise ProfileError(file, 1, "name", "required (must equal the file name)")
    if values["name"] != file.stem:
        raise doc.error(("name",), f"{values['name']!r} must equal the file name {file.stem!r}")
    return doc, values


def _merge(f: Field, parent: Any, child: Any) -> Any:
    if f.merge is Merge.APPEND:
        return list(dict.fromkeys([*parent, *child]))
    if f.merge is Merge.PACKAGES:
        return {k: [*parent[k], *child[k]] for k in ("add", "remove")}
    if f.merge is Merge.KEYWISE:
        return {**parent, **child}
    if f.merge is Merge.BY_NAME:
        merged = {u["name"]: dict(u) for u in parent}
        for u in child:
            merged[u["name"]] = {**merged.get(u["name"], {}), **u}
        return list(merged.values())
    return child


def resolve_path(ref: str | Path) -> Path:
    """A profile given as a path (anything with / or .yaml) or as a name in profiles/."""
    s = str(ref)
    if "/" in s or s.endswith((".yaml", ".yml")):
        return Path(s)
    return profiles_dir() / f"{s}.yaml"


def load(ref: str | Path) -> Profile:
    """Load, resolve inheritance and validate; raises ProfileError."""
    leaf = resolve_path(ref)
    chain: list[tuple[_Doc, dict[str, Any]]] = []
    seen: list[str] = []
    file = leaf
    while True:
        doc, values = _parse_file(file)
        chain.append((doc, values))
        seen.append(values["name"])
        parent = values.get("extends")
        if parent is None:
            break
        if parent in seen:
            cycle = " -> ".join([*seen, parent])
            raise doc.error(("extends",), f"inheritance cycle: {cycle}")
        file = file.parent / f"{parent}.yaml"
        if not (file.exists() or file.is_symlink()):
            raise doc.error(("extends",), f"no profile {parent!r} ({display(file)} not found)")

    merged: dict[str, Any] = {}
    locations: dict[str, tuple[Path, int]] = {}
    for doc, values in reversed(chain):  # root first
        for f in FIELDS:
            if f.key not in values:
                continue
            if f.merge is Merge.OWN and doc is not chain[0][0]:
                continue
            merged[f.key] = _merge(f, merged.get(f.key, f.default), values[f.key])
            locations[f.key] = (doc.file, doc.line((f.key,)))
    for f in FIELDS:
        merged.setdefault(f.key, f.default)

    leaf_doc = chain[0][0]
    if not merged["elements"]:
        raise ProfileError(leaf_doc.file, locations.get("elements", (leaf, 1))[1], "elements",
                           "a profile needs at least one element (here or in a parent)")
    elements = list(merged["elements"])
    if merged["test_access"] and TEST_ACCESS_ELEMENT not in elements:
        elements.append(TEST_ACCESS_ELEMENT)
    removed = list(dict.fromkeys(merged["packages"]["remove"]))
    packages = [p for p in dict.fromkeys(merged["packages"]["add"]) if p not in removed]
    users = tuple(
        User(name=u["name"], ssh_keys=tuple(u.get("ssh_keys", ())),
             groups=tuple(u.get("groups", ())), sudo=u.get("sudo", False))
        for u in merged["users"]
    )
    return Profile(
        name=merged["name"],
        description=merged["description"],
        path=leaf,
        extends_chain=tuple(v["name"] for _, v in chain[1:]),
        release=merged["release"],
        elements=tuple(elements),
        packages=tuple(packages),
        packages_removed=tuple(removed),
        kernel_modules=tuple(merged["kernel_modules"]),
        image_size=merged["image_size"],
        outputs=tuple(merged["outputs"]),
        users=users,
        kernel_cmdline=merged["kernel_cmdline"],
        agent=AgentSettings(AgentConfig.model_validate(merged["agent"])),
        policy=merged["policy"],
        test_access=merged["test_access"],
        locations=locations,
    )


def list_profiles(directory: Path | None = None) -> list[tuple[Path, Profile | ProfileError]]:
    """Every profile in a directory, loaded (or the error that stops it loading)."""
    out: list[tuple[Path, Profile | ProfileError]] = []
    for file in sorted((directory or profiles_dir()).glob("*.yaml")):
        try:
            out.append((file, load(file)))
        except ProfileError as e:
            out.append((file, e))
    return out
