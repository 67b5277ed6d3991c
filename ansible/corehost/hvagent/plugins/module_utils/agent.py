"""The collection's one client of hvagent's REST API (/api/v1), shared by every module
and the inventory plugin.

Owns: the fleet hosts file (the same file hvctl reads: $HVCTL_CONFIG_DIR/hosts.yaml,
else ~/.config/hvctl/hosts.yaml) and its validation, the choice of one agent from
module options, trust in an agent's own CA pinned by its sha256 fingerprint (exactly as
hvctl's --ca-fingerprint: fetch /ca.pem once unverified, compare the fingerprint of its
DER, then trust only that CA, without a host name check), bearer tokens, JSON requests
over HTTPS or the agent's unix socket, problem+json answers turned into one message, and
jobs (202 answers) polled until they end.

Self-contained on purpose: the standard library and PyYAML only, so the collection
runs wherever Ansible runs, without the agent's Python package.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

API = "/api/v1"
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HOST_KEYS = frozenset({"name", "url", "socket", "ca_fingerprint", "token", "token_file"})
TOP_KEYS = frozenset({"default", "hosts"})
# A token goes into an HTTP header: printable ASCII, no spaces (the agent's are hvt_...).
TOKEN_RE = re.compile(r"^[!-~]+$")
TOKEN_RULE = "must be one token (printable ASCII, no spaces or line breaks)"
DEFAULT_TIMEOUT = 60.0
JOB_TIMEOUT = 3600.0
JOB_POLL = 0.2

# The options every module takes to name its agent (their documentation is the
# corehost.hvagent.connection doc fragment).
CONNECTION_ARGS: dict[str, dict[str, Any]] = {
    "host": {"type": "str"},
    "hosts_file": {"type": "path"},
    "url": {"type": "str"},
    "ca_fingerprint": {"type": "str"},
    "token": {"type": "str", "no_log": True},
    "token_file": {"type": "path"},
    "socket": {"type": "path"},
    "timeout": {"type": "float", "default": DEFAULT_TIMEOUT},
}
CONNECTION_EXCLUSIVE = [("host", "url", "socket"), ("token", "token_file"),
                        ("socket", "ca_fingerprint")]


class AgentError(Exception):
    """A failure with one line for the user (the module's `msg`)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Target:
    """One agent: where it listens and who asks."""

    name: str
    url: str | None = None
    socket: str | None = None
    ca_fingerprint: str | None = None
    token: str | None = None

    @property
    def where(self) -> str:
        return self.url or self.socket or self.name


# the hosts file


def default_hosts_file() -> str:
    env = os.environ.get("HVCTL_CONFIG_DIR")
    base = env if env else os.path.join(os.path.expanduser("~"), ".config", "hvctl")
    return os.path.join(base, "hosts.yaml")


def normalize_fingerprint(value: object) -> str:
    """AB:CD:... (the form the agent logs); also accepted without colons or with a
    "SHA256:" prefix, in either case. ValueError names what is wrong."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    hexdigits = value.strip().upper().removeprefix("SHA256:").replace(":", "")
    if len(hexdigits) != 64 or any(c not in "0123456789ABCDEF" for c in hexdigits):
        raise ValueError(f"{value!r} is not a sha256 fingerprint (64 hex digits)")
    return ":".join(hexdigits[i:i + 2] for i in range(0, 64, 2))


def check_url(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"{value!r} is not a URL: {e}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{value!r}: the agent's TCP listener speaks only https://host:port")
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{value!r}: only https://HOST[:PORT] (no path, query or user)")
    return value.rstrip("/")


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable: {getattr(e, 'strerror', None) or e}") from None
    if not TOKEN_RE.match(token):
        raise ValueError(f"{path}: {TOKEN_RULE}")
    return token


def check_token(value: str) -> str:
    if not TOKEN_RE.match(value.strip()):
        raise ValueError(TOKEN_RULE)
    return value.strip()


def _host(entry: object, where: str, base_dir: str) -> Target:
    if not isinstance(entry, dict):
        raise AgentError(f"{where}: must be a mapping")
    for key in entry:
        if key not in HOST_KEYS:
            raise AgentError(f"{where}.{key}: unknown key (known: {', '.join(sorted(HOST_KEYS))})")
    for key, value in entry.items():
        if not isinstance(value, str):
            # e.g. an unquoted fingerprint of digits, which YAML reads as a number
            raise AgentError(f"{where}.{key}: must be a string (quote it)")
        if not value.strip():
            raise AgentError(f"{where}.{key}: empty")
    name = entry.get("name")
    if name is None:
        raise AgentError(f"{where}.name: missing")
    if not HOST_NAME_RE.match(name):
        raise AgentError(f"{where}.name: {name!r} is not a host name "
                         "([A-Za-z0-9][A-Za-z0-9._-]{0,62})")
    url, sock = entry.get("url"), entry.get("socket")
    if url is not None and sock is not None:
        raise AgentError(f"{where}.url: give url or socket, not both")
    if url is None and sock is None:
        raise AgentError(f"{where}.url: missing (give url or socket)")
    fingerprint = None
    if url is not None:
        try:
            url = check_url(url)
        except ValueError as e:
            raise AgentError(f"{where}.url: {e}") from None
        if "ca_fingerprint" not in entry:
            raise AgentError(f"{where}.ca_fingerprint: missing (an https agent is trusted "
                             "only by its CA's pinned fingerprint)")
    else:
        if "ca_fingerprint" in entry:
            raise AgentError(f"{where}.ca_fingerprint: a unix socket needs no fingerprint")
        sock = os.path.join(base_dir, os.path.expanduser(str(sock)))
    if "ca_fingerprint" in entry:
        try:
            fingerprint = normalize_fingerprint(entry["ca_fingerprint"])
        except ValueError as e:
            raise AgentError(f"{where}.ca_fingerprint: {e}") from None
    token = entry.get("token")
    if token is not None and "token_file" in entry:
        raise AgentError(f"{where}.token: give token or token_file, not both")
    if token is not None:
        try:
            token = check_token(token)
        except ValueError as e:
            raise AgentError(f"{where}.token: {e}") from None
    if "token_file" in entry:
        tf = entry["token_file"]
        try:
            token = _read_token_file(os.path.join(base_dir, os.path.expanduser(tf)))
        except ValueError as e:
            raise AgentError(f"{where}.token_file: {e}") from None
    return Target(name=name, url=url, socket=sock, ca_fingerprint=fingerprint, token=token)


@dataclass(frozen=True)
class Fleet:
    path: str
    default: str | None
    hosts: tuple[Target, ...]

    def get(self, name: str) -> Target:
        for t in self.hosts:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.hosts) or "none"
        raise AgentError(f"{self.path}: no host named {name!r} (hosts: {known})")


def load_hosts(path: str | None = None) -> Fleet:
    """The hosts file, validated whole; every error is one line naming the file and the
    field (`.../hosts.yaml: hosts[1].url: ...`)."""
    import yaml

    path = path or default_hosts_file()
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise AgentError(f"{path}: unreadable: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise AgentError(f"{path}: not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise AgentError(f"{path}: {at}not valid YAML: {problem}") from None
    try:
        return _fleet(data, path)
    except AgentError as e:
        raise AgentError(f"{path}: {e.message}") from None


def _fleet(data: object, path: str) -> Fleet:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AgentError("must be a mapping with `hosts:` (and an optional `default:`)")
    for key in data:
        if key not in TOP_KEYS:
            raise AgentError(f"{key}: unknown key (known: default, hosts)")
    if "hosts" not in data:
        raise AgentError("hosts: missing (a list of hosts)")
    hosts = data["hosts"]
    if not isinstance(hosts, list):
        raise AgentError("hosts: must be a list")
    base_dir = os.path.dirname(os.path.abspath(path))
    found: list[Target] = []
    for i, entry in enumerate(hosts):
        t = _host(entry, f"hosts[{i}]", base_dir)
        if any(t.name == other.name for other in found):
            raise AgentError(f"hosts[{i}].name: {t.name!r} is already the name of another host")
        found.append(t)
    default = data.get("default")
    if default is not None:
        if not isinstance(default, str) or all(t.name != default for t in found):
            raise AgentError(f"default: {default!r} is not the name of a host in this file")
    return Fleet(path=path, default=default, hosts=tuple(found))


def target_from_params(p: dict[str, Any]) -> Target:
    """The agent a module's connection options name: `url` (+ ca_fingerprint) or
    `socket` explicitly, else `host` in the hosts file, else the file's default."""
    token = p.get("token")
    if token is not None:
        try:
            token = check_token(token)
        except ValueError as e:
            raise AgentError(f"token: {e}") from None
    if p.get("token_file"):
        try:
            token = _read_token_file(p["token_file"])
        except ValueError as e:
            raise AgentError(f"token_file: {e}") from None
    if p.get("url"):
        try:
            url = check_url(p["url"])
        except ValueError as e:
            raise AgentError(f"url: {e}") from None
        if not p.get("ca_fingerprint"):
            raise AgentError("ca_fingerprint: required with url (the agent logs 'TLS CA "
                             "fingerprint' when it starts)")
        try:
            fp = normalize_fingerprint(p["ca_fingerprint"])
        except ValueError as e:
            raise AgentError(f"ca_fingerprint: {e}") from None
        return Target(name=url, url=url, ca_fingerprint=fp, token=token)
    if p.get("socket"):
        return Target(name=p["socket"], socket=p["socket"], token=token)
    if p.get("ca_fingerprint"):
        raise AgentError("ca_fingerprint: only with url")
    fleet = load_hosts(p.get("hosts_file"))
    name = p.get("host") or fleet.default
    if not name:
        raise AgentError(f"host: missing: give host (a name in {fleet.path}), url or socket, "
                         "or set `default:` in the hosts file")
    t = fleet.get(name)
    if token is not None:  # an explicit token overrides the file's
        t = Target(name=t.name, url=t.url, socket=t.socket, ca_fingerprint=t.ca_fingerprint,
                   token=token)
    return t


# TLS pinning


def der_fingerprint(pem: bytes) -> str:
    """sha256 of the first certificate's DER, as AB:CD:..."""
    text = pem.decode("ascii")
    if ssl.PEM_HEADER not in text or ssl.PEM_FOOTER not in text:
        raise ValueError("not a PEM certificate")
    first = text[text.index(ssl.PEM_HEADER):].split(ssl.PEM_FOOTER)[0] + ssl.PEM_FOOTER
    der = ssl.PEM_cert_to_DER_cert(first)
    if not der.startswith(b"\x30"):  # every certificate is a DER SEQUENCE
        raise ValueError("not a certificate")
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    """Trust only this agent's CA. No host name check: the CA is private to one agent,
    so any certificate it signed is that agent's, whatever address reached it."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("hvagent", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class Client:
    """Requests to one agent. The CA of an https agent is fetched and checked against
    its pin on the first request, then every request verifies against it."""

    def __init__(self, target: Target, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.target = target
        self.timeout = timeout
        self._ctx: ssl.SSLContext | None = None
        if target.url:
            parts = urlsplit(target.url)
            self._host = parts.hostname or ""
            self._port = parts.port or 443

    def _fetch_ca(self) -> ssl.SSLContext:
        assert self.target.ca_fingerprint is not None
        where = f"{self._host}:{self._port}"
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.minimum_version = ssl.TLSVersion.TLSv1_2
        # Unverified only for this one fetch: the pin below is the verification.
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                           context=unverified)
        try:
            conn.request("GET", "/ca.pem")
            r = conn.getresponse()
            pem = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise AgentError(f"cannot reach the agent at {self.target.url}: {e}") from None
        finally:
            conn.close()
        if r.status != 200:
            raise AgentError(f"{where}: /ca.pem answered HTTP {r.status}")
        try:
            got = der_fingerprint(pem)
        except ValueError:
            raise AgentError(f"{where}: /ca.pem is not a certificate") from None
        if got != self.target.ca_fingerprint:
            raise AgentError(f"{where}: CA fingerprint is {got}, not the pinned "
                             f"{self.target.ca_fingerprint}")
        return pinned_context(pem)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.target.socket:
            return _UnixConnection(self.target.socket, timeout)
        if self._ctx is None:
            self._ctx = self._fetch_ca()
        return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                           context=self._ctx)

    def request(self, method: str, path: str, body: Any = None,
                params: dict[str, Any] | None = None,
                timeout: float | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body) of one API request; an error answer or an agent
        out of reach is an AgentError with the agent's one-line `detail`."""
        url = API + path + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": "application/json"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection(timeout or self.timeout)
        try:
            conn.request(method, url, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
        except ssl.SSLError as e:
            raise AgentError(f"{self.target.where}: TLS failed (the server's certificate is "
                             f"not signed by the pinned CA?): {e}") from None
        except (OSError, http.client.HTTPException) as e:
            raise AgentError(f"cannot reach the agent at {self.target.where}: {e}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        if r.status >= 400:
            detail = answer.get("detail") if isinstance(answer, dict) else None
            text = str(detail) if detail else raw.decode("utf-8", "replace").strip()[:300]
            raise AgentError(f"{method} {path}: {text} (HTTP {r.status})", status=r.status)
        if answer is None and raw:
            raise AgentError(f"{method} {path}: the agent's answer is not JSON")
        return r.status, answer

    def call(self, method: str, path: str, body: Any = None,
             params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """A request whose 202 job answer is waited for: the finished job is returned,
        a failed job is an AgentError with the job's error."""
        status, answer = self.request(method, path, body, params, timeout)
        if status == 202 and isinstance(answer, dict) and "id" in answer \
                and answer.get("status") in ("running", "succeeded", "failed"):
            return self.wait_job(answer, f"{method} {path}")
        return answer

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw)

    def find(self, path: str) -> Any:
        """GET `path`, or None when the agent answers 404."""
        try:
            return self.get(path)
        except AgentError as e:
            if e.status == 404:
                return None
            raise

    def wait_job(self, job: dict[str, Any], what: str,
                 timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while job["status"] == "running":
            if time.monotonic() > deadline:
                raise AgentError(f"{what}: job {job['id']} still running after {timeout:g} s")
            time.sleep(JOB_POLL)
            _, job = self.request("GET", f"/jobs/{quote(job['id'], safe='')}")
        if job["status"] != "succeeded":
            raise AgentError(f"{what}: job {job['kind']} failed: {job.get('error')}")
        return job


def seg(value: str) -> str:
    """A name as one path segment of a URL."""
    return quote(value, safe="")


def execute(module: Any, run: Any) -> None:
    """A module's whole life: `run(module, client)` against the agent the module's
    options name, its result returned to Ansible; an agent error fails the task with
    the agent's one line."""
    try:
        result = run(module, Client(target_from_params(module.params),
                                    module.params["timeout"]))
    except AgentError as e:
        module.fail_json(msg=e.message)
    module.exit_json(**result)
