"""The fleet hosts file: the agents hvctl knows by name (`--host NAME`, `--all-hosts`,
its `default`), at $HVCTL_CONFIG_DIR/hosts.yaml (default ~/.config/hvctl), or wherever
`--hosts-file` says. Loading validates all of it and reads the token files, so a wrong
entry is one line naming the file and the field, before any agent is asked.

    default: alpha
    hosts:
      - name: alpha
        url: https://10.0.0.5:8443
        ca_fingerprint: "AB:CD:..."
        token_file: ./alpha.token      # relative to this file's directory
      - name: local
        socket: /run/hvagent/hvagent.sock

The same file is read by the Ansible collection: its format is a contract, and a key
this module does not know is an error rather than silently ignored."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hvagent.cli.hvctl.client import Agent
from hvagent.cli.hvctl.pinning import config_dir, normalize_fingerprint
from hvagent.errors import InvalidRequest

HOSTS_FILE = "hosts.yaml"
NAME_RULE = "1-63 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
TOP_KEYS = ("default", "hosts")
# A token goes into an HTTP header: printable ASCII, no spaces (the agent's are hvt_...).
TOKEN_RE = re.compile(r"[!-~]+")
TOKEN_RULE = "must be one token (printable ASCII, no spaces or line breaks)"
HOST_KEYS = ("name", "url", "socket", "ca_fingerprint", "token", "token_file")


@dataclass(frozen=True)
class Host:
    """One agent of the file: a TLS URL with its pinned CA, or a local socket."""

    name: str
    url: str | None
    socket: Path | None
    ca_fingerprint: str | None
    token: str | None

    def agent(self, token: str | None = None) -> Agent:
        """The Agent for this host; `token` (an explicit --token) replaces the file's."""
        return Agent(self.socket, self.url, token or self.token, self.ca_fingerprint)


@dataclass(frozen=True)
class Fleet:
    path: Path
    default: str | None
    hosts: tuple[Host, ...]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none"
        raise InvalidRequest(f"--host {name}: no such host in {self.path} (hosts: {known})")


def hosts_path(override: Path | None = None) -> Path:
    return override if override is not None else config_dir() / HOSTS_FILE


def load(path: Path) -> Fleet:
    """The validated hosts file at `path`; any error is one InvalidRequest line."""
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise InvalidRequest(f"{path}: no hosts file (see `hvctl --help`)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{path}: unreadable: {_one_line(e)}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or _one_line(e)
        raise InvalidRequest(f"{path}: {where}not valid YAML: {problem}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path}: must be a mapping with 'hosts' (and 'default')")
    _no_unknown_keys(path, "", data, TOP_KEYS)
    if "hosts" not in data:
        raise InvalidRequest(f"{path}: hosts: missing (a list of hosts)")
    entries = data["hosts"]
    if not isinstance(entries, list):
        raise InvalidRequest(f"{path}: hosts: must be a list of hosts")
    hosts: list[Host] = []
    for i, entry in enumerate(entries):
        h = _host(path, f"hosts[{i}]", entry)
        if any(h.name == other.name for other in hosts):
            raise InvalidRequest(f"{path}: hosts[{i}].name: {h.name!r} is already the name "
                                 "of an earlier host")
        hosts.append(h)
    default = data.get("default")
    if default is not None:
        if not isinstance(default, str):
            raise InvalidRequest(f"{path}: default: must be a host name (a string)")
        if not any(h.name == default for h in hosts):
            raise InvalidRequest(f"{path}: default: {default!r} is not a host of this file")
    return Fleet(path=path, default=default, hosts=tuple(hosts))


def _host(path: Path, at: str, entry: Any) -> Host:
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{path}: {at}: must be a mapping (name, url or socket, ...)")
    _no_unknown_keys(path, f"{at}.", entry, HOST_KEYS)
    for key, value in entry.items():
        if not isinstance(value, str):
            # e.g. an unquoted fingerprint of digits, which YAML reads as a number
            raise InvalidRequest(f"{path}: {at}.{key}: must be a string (quote it)")
        if not value.strip():
            raise InvalidRequest(f"{path}: {at}.{key}: empty")
    if "name" not in entry:
        raise InvalidRequest(f"{path}: {at}.name: missing")
    name = entry["name"]
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"{path}: {at}.name: {name!r} is not a host name ({NAME_RULE})")
    url, socket = entry.get("url"), entry.get("socket")
    if url is not None and socket is not None:
        raise InvalidRequest(f"{path}: {at}.url: give url or socket, not both")
    if url is None and socket is None:
        raise InvalidRequest(f"{path}: {at}.url: missing (an https:// URL, or a socket)")
    fingerprint = entry.get("ca_fingerprint")
    if url is not None:
        _check_url(path, at, url)
        if fingerprint is None:
            raise InvalidRequest(f"{path}: {at}.ca_fingerprint: missing (needed with url: "
                                 "the agent logs 'TLS CA fingerprint' when it starts)")
        try:
            fingerprint = normalize_fingerprint(fingerprint)
        except InvalidRequest as e:
            raise InvalidRequest(f"{path}: {at}.ca_fingerprint: {fingerprint!r} is not a "
                                 "sha256 fingerprint (64 hex digits, colons optional)") from e
    elif fingerprint is not None:
        raise InvalidRequest(f"{path}: {at}.ca_fingerprint: only with url (a socket is "
                             "trusted by its file permissions)")
    return Host(name=name, url=url,
                socket=_relative_to(path, socket) if socket is not None else None,
                ca_fingerprint=fingerprint, token=_token(path, at, entry))


def _check_url(path: Path, at: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError as e:
        raise InvalidRequest(f"{path}: {at}.url: {url!r}: {_one_line(e)}") from e
    if parts.scheme != "https":
        raise InvalidRequest(f"{path}: {at}.url: {url!r}: the agent's TCP listener speaks "
                             "only https://")
    if not parts.hostname:
        raise InvalidRequest(f"{path}: {at}.url: {url!r}: no host name")
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
        raise InvalidRequest(f"{path}: {at}.url: {url!r}: only https://HOST[:PORT] "
                             "(no path, query or user)")


def _token(path: Path, at: str, entry: dict[str, str]) -> str | None:
    token, token_file = entry.get("token"), entry.get("token_file")
    if token is not None and token_file is not None:
        raise InvalidRequest(f"{path}: {at}.token_file: give token or token_file, not both")
    if token_file is None:
        if token is not None and not TOKEN_RE.fullmatch(token.strip()):
            raise InvalidRequest(f"{path}: {at}.token: {TOKEN_RULE}")
        return token.strip() if token is not None else None
    f = _relative_to(path, token_file)
    try:
        value = f.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{path}: {at}.token_file: {f}: unreadable: "
                             f"{_one_line(e)}") from e
    if not TOKEN_RE.fullmatch(value):
        raise InvalidRequest(f"{path}: {at}.token_file: {f}: {TOKEN_RULE}")
    return value


def _relative_to(path: Path, name: str) -> Path:
    """A path of the hosts file, relative to the file's own directory."""
    f = Path(name).expanduser()
    return f if f.is_absolute() else path.parent / f


def _no_unknown_keys(path: Path, at: str, data: dict[Any, Any],
                     allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            raise InvalidRequest(f"{path}: {at}{key}: unknown key (known: {', '.join(allowed)})")


def _one_line(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return " ".join(text.split())
