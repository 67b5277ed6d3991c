"""The agent's configuration file (/etc/hvagent/hvagent.yaml): keys, defaults, loading.

Every key is optional; an unknown key or a wrong type is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hvagent.errors import InvalidRequest
from hvagent.vm.accel import Accel

M = TypeVar("M", bound=BaseModel)

DEFAULT_CONFIG = Path("/etc/hvagent/hvagent.yaml")


class TLSConfig(BaseModel):
    """The HTTPS listener (off unless `listen` is set). Without `cert`/`key` the agent
    makes its own CA and server certificate in state_dir/tls on first start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str | None = Field(default=None, pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$",
                               description="HOST:PORT, e.g. 0.0.0.0:8443")
    cert: Path | None = None
    key: Path | None = None
    hostnames: list[str] = Field(default_factory=list,
                                 description="extra names/IPs in a generated server cert")


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: Path = Path("/run/hvagent/hvagent.sock")
    state_dir: Path = Path("/var/lib/hvagent")
    storage_dir: Path = Path("/var/lib/hvagent/images")
    run_dir: Path = Path("/run/hvagent")
    log_dir: Path = Path("/var/log/hvagent")
    accel: Accel = Accel.AUTO
    tls: TLSConfig = TLSConfig()
    policy: Path = Path("/etc/hvagent/policy.yaml")  # hvagent.policy; missing = no limits
    token_ttl: str = Field(default="90d", description="default expiry of new API tokens")

    @property
    def database(self) -> Path:
        return self.state_dir / "hvagent.db"

    def make_dirs(self) -> None:
        for d in (self.state_dir, self.storage_dir, self.run_dir, self.log_dir,
                  self.listen.parent):
            d.mkdir(parents=True, exist_ok=True)


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
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise InvalidRequest(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise InvalidRequest(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path}: expected a mapping of settings")
    try:
        return model.model_validate(data)
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
