"""The agent's configuration (/etc/hvagent/hvagent.yaml and its drop-ins in
/etc/hvagent/conf.d/): keys, defaults, loading.

Every key is optional; an unknown key or a wrong type is an error naming the file and
the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hvagent.errors import InvalidRequest
from hvagent.host.kvm import Accel
from hvagent.netspec import NetworkSpec

M = TypeVar("M", bound=BaseModel)

DEFAULT_CONFIG = Path("/etc/hvagent/hvagent.yaml")
DROP_IN_DIR = "conf.d"  # beside the main file
# A settings file is a few hundred bytes; anything near this is not one (alias bombs).
MAX_SETTINGS_BYTES = 1 << 20
SHA256_HEX = r"^[0-9a-f]{64}$"
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
    validates a profile's `agent:` block with this model too.

    The agent reads /etc/hvagent/hvagent.yaml (or --config), then every
    `conf.d/*.yaml` beside it in name order, each a partial configuration merged over
    the result: mappings (`tls:`) key by key, scalars and lists replaced. Names that
    start with a dot are skipped (editors' and package managers' leftovers)."""

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
    # The host's first boot writes it from the host config; the token itself is never
    # on the host. At start the agent makes sure a token with this hash exists for
    # principal `admin`, with the Administrator role on / (hvagent.access.tokens).
    bootstrap_token_sha256: str | None = Field(
        default=None, json_schema_extra={"pattern": SHA256_HEX},
        description="sha256 (64 lowercase hex) of an Administrator token for `admin`")
    # Managed networks the host always has (hvagent.services.networks): made on start,
    # updated when their settings here change, not deletable through the API.
    networks: list[NetworkSpec] = Field(default_factory=list)

    @field_validator("networks")
    @classmethod
    def _distinct(cls, v: list[NetworkSpec]) -> list[NetworkSpec]:
        names = [n.name for n in v]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"network {dup!r} is declared twice")
        return v

    @field_validator("bootstrap_token_sha256")
    @classmethod
    def _sha256(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-f]{64}", v):
            shown = repr(v) if len(v) <= 80 else f"{v[:40]!r}... ({len(v)} characters)"
            raise ValueError(f"{shown} is not a sha256 (64 lowercase hex digits)")
        return v

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
    """Load `path` and the drop-ins beside it (see AgentConfig); None means the default
    file if it exists (its drop-ins apply either way), else all defaults."""
    main = path if path is not None else DEFAULT_CONFIG
    files = [main] if path is not None or DEFAULT_CONFIG.exists() else []
    files += drop_ins(main.parent / DROP_IN_DIR)
    data: dict[str, Any] = {}
    config = AgentConfig()
    # Validated after each file: a setting that breaks the result is blamed on the
    # file that brought it.
    for f in files:
        data = merge_settings(data, read_settings(f))
        config = validate_settings(f, data, AgentConfig)
    return config


def drop_ins(directory: Path) -> list[Path]:
    """The *.yaml files of a drop-in directory in name order; none when it is missing."""
    try:
        names = sorted(e.name for e in os.scandir(directory))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise InvalidRequest(f"{directory}: not a directory of drop-in files") from None
    except OSError as e:
        raise InvalidRequest(f"{directory}: cannot list: {e.strerror or e}") from e
    return [directory / n for n in names if n.endswith(".yaml") and not n.startswith(".")]


def merge_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged over `base`: mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(path: Path, model: type[M]) -> M:
    """A YAML settings file validated into `model`; every error is one line naming the
    file and the key."""
    return validate_settings(path, read_settings(path), model)


def read_settings(path: Path) -> dict[str, Any]:
    """The mapping of a YAML settings file (not validated); one line naming the file
    when it is not one."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SETTINGS_BYTES + 1)
    except OSError as e:
        raise InvalidRequest(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_settings(path, raw)


def parse_settings(path: Path, raw: bytes) -> dict[str, Any]:
    """The mapping in the bytes of a YAML settings file (not validated; `path` only
    names it in errors): one line naming the file when it is not one."""
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
    except RecursionError as e:  # a self-referencing YAML anchor
        raise InvalidRequest(f"{path}: a YAML alias refers to itself") from e
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path}: expected a mapping of settings")
    return data


def validate_settings(path: Path, data: dict[str, Any], model: type[M]) -> M:
    """`data` validated into `model`; an error is one line naming `path` and the key."""
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
