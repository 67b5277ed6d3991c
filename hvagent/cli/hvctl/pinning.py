"""hvctl's trust in remote agents: the CA certificate of each agent URL, pinned by its
sha256 fingerprint on first use (`--ca-fingerprint`) and remembered per URL in
$HVCTL_CONFIG_DIR/agents.json (default ~/.config/hvctl). The agent makes and serves
that CA (hvagent.api.tls); this is the client side: fetch it once, check it against the
pin, then trust nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

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


def _remember(base: str, entry: dict[str, str]) -> None:
    """Add one agent's pin to the file, under a lock and re-read: hvctl --all-hosts
    pins several hosts at once, and none may overwrite another's entry."""
    import fcntl

    d = config_dir()
    d.mkdir(parents=True, exist_ok=True)
    with (d / ".agents.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = _load()
        known[base] = entry
        _save(known)


def base_of(url: str) -> tuple[str, str, int]:
    """("https://host:port", host, port) of an agent URL; only https is accepted."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidRequest(f"--url {url}: the agent's TCP listener speaks only https://")
    port = parts.port or 443
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port}", host, port


def fingerprint(pem: bytes) -> str:
    """sha256 of the (first) certificate's DER, as AB:CD:... (the form the agent logs).
    The standard library suffices: a client has no certificate to make or inspect."""
    first = pem.decode("ascii").split(ssl.PEM_FOOTER)[0] + ssl.PEM_FOOTER
    der = ssl.PEM_cert_to_DER_cert(first.strip())
    if not der.startswith(b"\x30"):  # every certificate is a DER SEQUENCE
        raise ValueError("not a certificate")
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def normalize_fingerprint(value: str) -> str:
    hexdigits = value.strip().upper().removeprefix("SHA256:").replace(":", "")
    if len(hexdigits) != 64 or any(c not in "0123456789ABCDEF" for c in hexdigits):
        raise InvalidRequest(f"--ca-fingerprint: {value!r} is not a sha256 fingerprint")
    return ":".join(hexdigits[i:i + 2] for i in range(0, 64, 2))


def pinned_client_context(ca_pem: bytes) -> ssl.SSLContext:
    """Trust only this agent's CA. The host name is not checked: the CA is private to
    one agent (its key never leaves the agent's state dir), so any certificate it signed
    is that agent's, whatever address the client used to reach it."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def fetch_ca(host: str, port: int, expected: str, timeout: float = 10.0) -> bytes:
    """The CA certificate the agent at host:port serves, checked against the pinned
    fingerprint `expected` before anything trusts it."""
    import httpx

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Unverified only for this one fetch: the pin below is the verification.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with httpx.Client(verify=ctx, timeout=timeout) as c:
            r = c.get(f"https://{host}:{port}/ca.pem")
    except httpx.HTTPError as e:
        raise InvalidRequest(f"cannot fetch the CA certificate from {host}:{port}: {e}") from e
    if r.status_code != 200:
        raise InvalidRequest(f"{host}:{port}: /ca.pem answered HTTP {r.status_code}")
    pem = r.content
    try:
        got = fingerprint(pem)
    except ValueError as e:  # not PEM, not ASCII, or not base64 inside
        raise InvalidRequest(f"{host}:{port}: /ca.pem is not a certificate") from e
    if got != normalize_fingerprint(expected):
        raise InvalidRequest(f"{host}:{port}: CA fingerprint is {got}, not the pinned "
                             f"{normalize_fingerprint(expected)}")
    # The fetched CA must also be the one that signed the certificate this server shows.
    with httpx.Client(verify=pinned_client_context(pem), timeout=timeout) as c:
        try:
            c.get(f"https://{host}:{port}/ca.pem")
        except httpx.ConnectError as e:
            raise InvalidRequest(f"{host}:{port}: server certificate is not signed by the "
                                 f"pinned CA: {e}") from e
    return pem


def ssl_context(url: str, ca_fingerprint: str | None) -> ssl.SSLContext:
    """A client context that trusts only the pinned CA of the agent at `url`; a new
    `ca_fingerprint` is checked against the agent and remembered."""
    base, host, port = base_of(url)
    known = _load()
    entry = known.get(base)
    if ca_fingerprint is not None:
        want = normalize_fingerprint(ca_fingerprint)
        if entry is None or entry.get("fingerprint") != want:
            pem = fetch_ca(host, port, want)
            entry = {"fingerprint": want, "ca": pem.decode()}
            _remember(base, entry)
    if entry is None:
        raise InvalidRequest(f"{base}: agent not pinned yet; pass --ca-fingerprint (the agent "
                             "logs 'TLS CA fingerprint' when it starts)")
    return pinned_client_context(entry["ca"].encode())
