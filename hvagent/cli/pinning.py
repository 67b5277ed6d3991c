"""hvctl's trust in remote agents: the CA certificate of each agent URL, pinned by its
sha256 fingerprint on first use (`--ca-fingerprint`) and remembered per URL in
$HVCTL_CONFIG_DIR/agents.json (default ~/.config/hvctl)."""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from hvagent.api import tls
from hvagent.errors import InvalidRequest


def config_dir() -> Path:
    env = os.environ.get("HVCTL_CONFIG_DIR")
    return Path(env) if env else Path.home() / ".config" / "hvctl"


def _known_file() -> Path:
    return config_dir() / "agents.json"


def _load() -> dict[str, dict[str, str]]:
    f = _known_file()
    if not f.exists():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"{f}: unreadable: {e}") from e
    return data if isinstance(data, dict) else {}


def _save(known: dict[str, dict[str, str]]) -> None:
    f = _known_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".agents.")
    with os.fdopen(fd, "w") as out:
        json.dump(known, out, indent=2)
    os.replace(tmp, f)


def base_of(url: str) -> tuple[str, str, int]:
    """("https://host:port", host, port) of an agent URL; only https is accepted."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidRequest(f"--url {url}: the agent's TCP listener speaks only https://")
    port = parts.port or 443
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port}", host, port


def ssl_context(url: str, fingerprint: str | None) -> ssl.SSLContext:
    """A client context that trusts only the pinned CA of the agent at `url`."""
    base, host, port = base_of(url)
    known = _load()
    entry = known.get(base)
    if fingerprint is not None:
        want = tls.normalize_fingerprint(fingerprint)
        if entry is None or entry.get("fingerprint") != want:
            pem = tls.fetch_ca(host, port, want)
            entry = {"fingerprint": want, "ca": pem.decode()}
            known[base] = entry
            _save(known)
    if entry is None:
        raise InvalidRequest(f"{base}: agent not pinned yet; pass --ca-fingerprint (the agent "
                             "logs 'TLS CA fingerprint' when it starts)")
    return tls.pinned_client_context(entry["ca"].encode())
