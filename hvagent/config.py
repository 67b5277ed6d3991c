"""The agent's configuration file (/etc/hvagent/hvagent.yaml): keys, defaults, loading.

Every key is optional; an unknown key or a wrong type is an error naming the key.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hvagent.errors import InvalidRequest
from hvagent.host.kvm import Accel

M = TypeVar("M", bound=BaseModel)

DEFAULT_CONFIG = Path("/etc/hvagent/hvagent.yaml")
# A settings file is a few hundred bytes; anything near this is not one (alias bombs).
MAX_SETTINGS_BYTES = 1 << 20
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


def parse_listen(value: str) -> tuple[str, int]:
    """(host, port) of a TCP listen address: HOST:PORT, an IPv6 address in brackets
    ([::1]:8443); the port 1..65535. ValueError with a reason otherwise."""
    usage = "give HOST:PORT, e.g. 0.0.0.0:8443 or [::1]:8443"
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r}: {usage}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{value!r}: {usage}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{value!r}: an IPv6 address needs brackets, e.g. [::1]:8443")
    elif not _HOSTNAME_RE.match(host):
        raise ValueError(f"{value!r}: {host!r} is not a host name or IPv4 address")
    if not port.isascii() or not port.isdigit():
        raise ValueError(f"{value!r}: the port {port!r} is not a number")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port {int(port)} is not in 1..65535")
    return host, int(port)


class TLSConfig(BaseModel):
    """The HTTPS listener (off unless `listen` is set). Without `cert`/`key` the agent
    makes its own CA and server certificate in state_dir/tls on first start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str | None = Field(default=None, description="HOST:PORT, e.g. 0.0.0.0:8443")
    cert: Path | None = None
    key: Path | None = None
    hostnames: list[str] = Field(default_factory=list,
                                 description="extra names/IPs in a generated server cert")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v


class AgentConfig(BaseModel):
    """The agent's settings and their defaults, stated here only: the image builder
    validates a profile's `agent:` block with this model too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: Path = Path("/run/hvagent/hvagent.sock")
    state_dir: Path = Path("/var/lib/hvagent")
    storage_dir: Path = Path("/var/lib/hvagent/images")
    run_dir: Path = Path("/run/hvagent")
    log_dir: Path = Path("/var/log/hvagent")
    accel: Accel = Accel.AUTO
    tls: TLSConfig = TLSConfig()
    policy: Path = Path("/etc/hvagent/policy.yaml")  # hvagent.access.policy; missing = no limits
    token_ttl: str = Field(default="90d", description="default expiry of new API tokens")

    @property
    def database(self) -> Path:
        return self.state_dir / "hvagent.db"

    def writable_dirs(self) -> tuple[tuple[str, Path], ...]:
        """Every directory the agent writes, with the key that names it: the agent makes
        them at start, and the image's unit grants exactly these (ReadWritePaths)."""
        return (("state_dir", self.state_dir), ("storage_dir", self.storage_dir),
                ("run_dir", self.run_dir), ("log_dir", self.log_dir),
                ("listen", self.listen.parent))

    def make_dirs(self) -> None:
        """Create the agent's directories; each must be a directory the agent can write
        (one line naming the key otherwise)."""
        for key, d in self.writable_dirs():
            try:
                if d.exists() and not d.is_dir():
                    raise InvalidRequest(f"{key}: {d} exists and is not a directory")
                d.mkdir(parents=True, exist_ok=True)
                # Root passes every access(2) check: only a real write tells a read-only
                # or immutable directory (or /proc) from a usable one.
                with tempfile.TemporaryFile(dir=d):
                    pass
            except OSError as e:
                raise InvalidRequest(
                    f"{key}: {d}: not a writable directory: {e.strerror or e}") from e
            except ValueError as e:  # an embedded NUL
                raise InvalidRequest(f"{key}: {str(d)!r}: not a usable path: {e}") from e


def load_config(path: Path | None) -> AgentConfig:
    """Load `path`; None means the default file if it exists, else all defaults."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return AgentConfig()
        path = DEFAULT_CONFIG
    return load_settings(path, AgentConfig)


def load_settings(path: Path, model: type[M]) -> M:
    """A YAML settings file validated into `model`; every error is one line naming the
    file and the key."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SETTINGS_BYTES + 1)
    except OSError as e:
        raise InvalidRequest(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) > MAX_SETTINGS_BYTES:
        raise InvalidRequest(f"{path}: larger than {MAX_SETTINGS_BYTES} bytes: not a "
                             "settings file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                             f"{e.start})") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InvalidRequest(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path}: expected a mapping of settings")
    try:
        return model.model_validate(data)
    except RecursionError as e:  # a self-referencing YAML anchor
        raise InvalidRequest(f"{path}: a YAML alias refers to itself") from e
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        raise InvalidRequest(f"{path}: {key + ': ' if key else ''}{msg}") from e


def agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("corehost")
    except PackageNotFoundError:
        return "unknown"
