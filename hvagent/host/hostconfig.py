"""The host configuration document ("host config"): its schema, loading and composing.

A host config is a small YAML document a site hands to a host at its first boot (kernel
command line URL, the COREHOST-CFG partition's corehost.yaml, or QEMU fw_cfg item
opt/corehost/config); corehost-firstboot applies it, the image builder and the test
harness write one. Every error is one line naming the source and the field path, e.g.
``corehost.yaml: users[0].ssh_authorized_keys[1]: not an ssh public key``. Values that
are secrets (a bootstrap token) never appear in a message.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Finding and reading a document needs none of the schema (hvagent.host.hostdoc);
# re-exported here for the users of the whole document.
from hvagent.host.hostdoc import CONFIG_FILE as CONFIG_FILE
from hvagent.host.hostdoc import CONFIG_FS_LABEL as CONFIG_FS_LABEL
from hvagent.host.hostdoc import CONFIG_PARTITION as CONFIG_PARTITION
from hvagent.host.hostdoc import MAX_BYTES as MAX_BYTES
from hvagent.host.hostdoc import SHA256_RE as SHA256_RE
from hvagent.host.hostdoc import HostConfigError as HostConfigError
from hvagent.host.hostdoc import read_bytes as read_bytes

SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
                 "sk-ecdsa-sha2-nistp256@openssh.com")
MIN_TOKEN_CHARS = 32
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # useradd's portable user/group names
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def check_hostname(value: str) -> str:
    """`value` if it is an RFC 1123 host name in lower case; ValueError saying why not."""
    if not value:
        raise ValueError("empty; give a host name such as kvm-07")
    if len(value) > 253:
        raise ValueError(f"{len(value)} characters; a host name has at most 253")
    for label in value.split("."):
        if not label:
            raise ValueError(f"{value!r}: an empty label (two dots, or a dot at an end)")
        if len(label) > 63:
            raise ValueError(f"{value!r}: the label {label[:20]!r}... is longer than 63 "
                             "characters")
        if not _LABEL_RE.fullmatch(label):
            raise ValueError(f"{value!r} is not a host name: labels are a-z, 0-9 and '-', "
                             "not starting or ending with '-'")
    return value


def _check_host_or_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    try:
        return check_hostname(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a host name or IP address") from None


def check_ssh_key(value: str) -> str:
    """One OpenSSH public key line (`TYPE BASE64 [COMMENT]`), stripped; ValueError
    otherwise. The base64 body must decode to a key of the type it is labelled."""
    line = value.strip()
    if _CONTROL_RE.search(line):
        raise ValueError("not an ssh public key: one line, without control characters")
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValueError("not an ssh public key: expected TYPE BASE64 [COMMENT] with TYPE "
                         "one of " + ", ".join(SSH_KEY_TYPES))
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not an ssh public key: the key body is not base64") from None
    # The blob starts with its own type as an SSH string (uint32 length, then bytes).
    kind = parts[0].encode()
    if blob[:4] != len(kind).to_bytes(4, "big") or blob[4:4 + len(kind)] != kind:
        raise ValueError(f"not an ssh public key: the key body is not a {parts[0]} key")
    return line


def parse_listen(value: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT (an IPv6 host in brackets); the port 1..65535."""
    usage = "give HOST:PORT, e.g. 0.0.0.0:8443 or [::1]:8443"
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r}: {usage}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{value!r}: {host[1:-1]!r} is not an IPv6 address") from None
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"{value!r}: {usage}")
    else:
        _check_host_or_address(host)
    if not port.isascii() or not port.isdigit() or len(port) > 5:
        raise ValueError(f"{value!r}: the port {port!r} is not a number in 1..65535")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port {int(port)} is not in 1..65535")
    return host, int(port)


class _Model(BaseModel):
    # strict: YAML already gives real types; "yes" is not a boolean and 8443 not a string.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class User(_Model):
    name: str = Field(description="login name, [a-z_][a-z0-9_-]{0,31}")
    ssh_authorized_keys: list[str] = Field(
        default_factory=list, description="OpenSSH public key lines; they replace the "
        "user's ~/.ssh/authorized_keys")
    groups: list[str] = Field(default_factory=list,
                              description="supplementary groups (must exist in the image)")
    shell: str = Field(default="/bin/bash", description="login shell of a new user")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError(f"{v[:40]!r} is not a user name ([a-z_][a-z0-9_-]{{0,31}})")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        for i, g in enumerate(v):
            if not _NAME_RE.fullmatch(g):
                raise ValueError(f"[{i}]: {g[:40]!r} is not a group name")
        return v

    @field_validator("ssh_authorized_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        out = []
        for i, key in enumerate(v):
            try:
                out.append(check_ssh_key(key))
            except ValueError as e:
                raise ValueError(f"[{i}]: {e}") from None
        return out

    @field_validator("shell")
    @classmethod
    def _shell(cls, v: str) -> str:
        if not v.startswith("/") or _CONTROL_RE.search(v) or " " in v or ":" in v:
            raise ValueError(f"{v[:60]!r} is not an absolute path of a shell")
        return v


class Match(_Model):
    name: str | None = Field(default=None, description="interface name glob, e.g. en*")
    mac: str | None = Field(default=None, description="MAC address, e.g. 52:54:00:12:34:56")

    @field_validator("name")
    @classmethod
    def _glob(cls, v: str | None) -> str | None:
        # systemd's Name= is a whitespace-separated list: one glob, no blanks.
        if v is not None and (not v or len(v) > 64 or any(c.isspace() for c in v)
                              or _CONTROL_RE.search(v) or not v.isascii()):
            raise ValueError(f"{v[:40]!r} is not an interface name glob (one word, "
                             "e.g. en* or eth0)")
        return v

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is not None:
            if not _MAC_RE.fullmatch(v.lower()):
                raise ValueError(f"{v[:40]!r} is not a MAC address (e.g. 52:54:00:12:34:56)")
            return v.lower()
        return v

    @model_validator(mode="after")
    def _one(self) -> Match:
        if (self.name is None) == (self.mac is None):
            raise ValueError("give exactly one of name or mac")
        return self


class Network(_Model):
    match: Match
    dhcp: bool = Field(default=False, description="true: DHCP (v4 and v6)")
    addresses: list[str] = Field(default_factory=list,
                                 description="static addresses in CIDR form, 10.0.2.15/24")
    gateway: str | None = Field(default=None, description="default gateway (static only)")
    dns: list[str] = Field(default_factory=list, description="DNS server addresses")

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for i, a in enumerate(v):
            if "/" not in a:
                raise ValueError(f"[{i}]: {a[:60]!r} has no prefix length (e.g. 10.0.2.15/24)")
            try:
                ipaddress.ip_interface(a)
            except ValueError:
                raise ValueError(f"[{i}]: {a[:60]!r} is not an address in CIDR form "
                                 "(e.g. 10.0.2.15/24)") from None
        return v

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{v[:60]!r} is not an IP address") from None
        return v

    @field_validator("dns")
    @classmethod
    def _dns(cls, v: list[str]) -> list[str]:
        for i, a in enumerate(v):
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ValueError(f"[{i}]: {a[:60]!r} is not an IP address") from None
        return v

    @model_validator(mode="after")
    def _mode(self) -> Network:
        if self.dhcp and (self.addresses or self.gateway):
            raise ValueError("dhcp: true takes no addresses or gateway; give one or the other")
        if not self.dhcp and not self.addresses:
            raise ValueError("give dhcp: true or static addresses")
        if self.gateway is not None:
            gw = ipaddress.ip_address(self.gateway)
            nets = [ipaddress.ip_interface(a).network for a in self.addresses]
            # An IPv6 router is usually known by its link-local address.
            if not (gw.version == 6 and gw.is_link_local) and \
                    not any(gw.version == n.version and gw in n for n in nets):
                raise ValueError(f"gateway {self.gateway} is not inside any of the "
                                 "addresses' networks")
        return self


class Time(_Model):
    servers: list[str] = Field(min_length=1, description="NTP servers, names or addresses")

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for i, s in enumerate(v):
            try:
                _check_host_or_address(s)
            except ValueError as e:
                raise ValueError(f"[{i}]: {e}") from None
        return v


class Agent(_Model):
    tls_listen: str | None = Field(default=None, description="HTTPS listener, HOST:PORT")
    bootstrap_token: str | None = Field(
        default=None, description=f"an Administrator token (>= {MIN_TOKEN_CHARS} "
        "characters), hashed on the host; only the hash is stored")
    bootstrap_token_sha256: str | None = Field(
        default=None, description="sha256 of the token, 64 lowercase hex")

    @field_validator("tls_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v

    @field_validator("bootstrap_token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        # Never echo the value: it is a secret.
        if v is not None:
            if len(v) < MIN_TOKEN_CHARS:
                raise ValueError(f"{len(v)} characters; a token has at least "
                                 f"{MIN_TOKEN_CHARS}")
            if not v.isascii() or not v.isprintable() or " " in v:
                raise ValueError("a token is printable ASCII without blanks")
        return v

    @field_validator("bootstrap_token_sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_RE.fullmatch(v):
            raise ValueError("not a sha256 (64 lowercase hex digits)")
        return v

    @model_validator(mode="after")
    def _not_both(self) -> Agent:
        if self.bootstrap_token is not None and self.bootstrap_token_sha256 is not None:
            raise ValueError("give bootstrap_token or bootstrap_token_sha256, not both")
        return self


class HostConfig(_Model):
    """The document; every section is optional but `version`."""

    version: Literal[1] = Field(description="always 1")
    hostname: str | None = Field(default=None, description="RFC 1123 host name, kvm-07")
    users: list[User] = Field(default_factory=list)
    network: list[Network] = Field(default_factory=list)
    time: Time | None = None
    agent: Agent | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if type(v) is not int or v != 1:  # True == 1 in Python; YAML's true is not 1
            raise ValueError("must be 1")
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        return check_hostname(v) if v is not None else v

    @field_validator("users")
    @classmethod
    def _unique(cls, v: list[User]) -> list[User]:
        seen: set[str] = set()
        for i, u in enumerate(v):
            if u.name in seen:
                raise ValueError(f"[{i}]: the user {u.name!r} is listed twice")
            seen.add(u.name)
        return v


_TYPE_MESSAGES = {
    "string_type": "expected a string", "bool_type": "expected true or false",
    "int_type": "expected an integer", "list_type": "expected a list",
    "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping", "extra_forbidden": "unknown key",
    "missing": "missing (required)", "too_short": "must not be empty",
}


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _one_line(source: str, e: ValidationError) -> HostConfigError:
    err = e.errors(include_url=False)[0]
    path = _path(tuple(err["loc"]))
    msg = _TYPE_MESSAGES.get(err["type"]) or str(err["msg"]).removeprefix("Value error, ")
    # A validator of a list names the item as "[i]: ..."; join it to the path.
    if msg.startswith("[") and "]: " in msg:
        index, _, msg = msg.partition(": ")
        path += index
    return HostConfigError(f"{source}: {path + ': ' if path else ''}{msg}")


class _Loader(yaml.SafeLoader):
    """Safe YAML without aliases (a host config needs none; they are how a small file
    becomes a huge document) and without duplicate keys (one would silently win)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(None, None, "aliases (*name) are not allowed",
                                       event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | bool | float) or key is None:
                if key in seen:
                    raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r}",
                                               key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(source: str, e: yaml.YAMLError) -> HostConfigError:
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
        return HostConfigError(f"{source}: not text: character #x{e.character:04x} at "
                               f"position {e.position}")
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return HostConfigError(f"{source}: {where}not valid YAML: {' '.join(str(problem).split())}")


def load_text(text: str, source: str) -> HostConfig:
    """The validated document in `text`; HostConfigError naming `source` otherwise."""
    if len(text.encode("utf-8", errors="surrogatepass")) > MAX_BYTES:
        raise HostConfigError(f"{source}: larger than {MAX_BYTES} bytes: not a host config")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None
    except RecursionError:
        raise HostConfigError(f"{source}: nested too deeply: not a host config") from None
    if data is None:
        raise HostConfigError(f"{source}: empty; a host config starts with 'version: 1'")
    if not isinstance(data, dict):
        raise HostConfigError(f"{source}: the top level is a {_kind(data)}; a host config "
                              "is a mapping starting with 'version: 1'")
    return validate(data, source)


def _kind(data: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number",
            bool: "boolean"}.get(type(data), type(data).__name__)


def validate(doc: dict[str, Any], source: str) -> HostConfig:
    """`doc` (already parsed) validated; HostConfigError naming `source` and the field."""
    try:
        return HostConfig.model_validate(doc)
    except ValidationError as e:
        raise _one_line(source, e) from None
    except RecursionError:
        raise HostConfigError(f"{source}: nested too deeply: not a host config") from None


def load_file(path: Path) -> HostConfig:
    """The validated document in `path`; HostConfigError naming the path otherwise."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise HostConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:  # an embedded NUL in the path
        raise HostConfigError(f"{str(path)!r}: not a usable path: {e}") from None
    return load_text(read_bytes(raw, str(path)), str(path))


def for_ssh_key(public_key: str) -> dict[str, Any]:
    """A document that lets root in with `public_key` (checked; HostConfigError if it is
    not one)."""
    try:
        key = check_ssh_key(public_key)
    except ValueError as e:
        raise HostConfigError(f"ssh key: {e}") from None
    return {"version": 1, "users": [{"name": "root", "ssh_authorized_keys": [key]}]}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base` (neither is changed): users merged by name, their ssh keys
    concatenated without duplicates and their other fields from `extra`; any other
    top-level key of `extra` replaces the one of `base`."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if key != "users":
            out[key] = copy.deepcopy(value)
    users = [dict(u) for u in out.get("users") or []]
    by_name = {u.get("name"): u for u in users}
    for user in extra.get("users") or []:
        user = copy.deepcopy(user)
        old = by_name.get(user.get("name"))
        if old is None:
            users.append(user)
            by_name[user.get("name")] = user
            continue
        keys = list(old.get("ssh_authorized_keys") or [])
        for k in user.get("ssh_authorized_keys") or []:
            if k not in keys:
                keys.append(k)
        old.update(user)
        old["ssh_authorized_keys"] = keys
    if users or "users" in out:
        out["users"] = users
    return out


def dump(doc: dict[str, Any]) -> str:
    """`doc` as YAML text, keys in their given order."""
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
