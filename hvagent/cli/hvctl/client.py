"""hvctl's one way to the agent: where it is (the local unix socket, or `--url` over
pinned TLS), who is asking (`--token`, $HVCTL_TOKEN) and one request. An error answer
(problem+json) or an agent out of reach is an HVError whose message is the one line
hvctl prints."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvagent.errors import HVError

if TYPE_CHECKING:
    import httpx

API = "/api/v1"


def default_socket() -> Path:
    """The agent's socket as its config file says, else the agent's built-in default."""
    from hvagent.config import AgentConfig, load_config

    try:
        return load_config(None).listen
    except HVError:  # an unreadable config file still leaves the default to try
        return AgentConfig().listen


class Agent:
    """The agent named by hvctl's global options. Nothing is resolved (config file,
    pinned CA) before the first request: a command refused on its own arguments never
    depends on the agent."""

    def __init__(self, socket: Path | None, url: str | None, token: str | None,
                 ca_fingerprint: str | None) -> None:
        self._socket = socket
        self._url = url
        self._token = token
        self._ca_fingerprint = ca_fingerprint

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Agent:
        return cls(args.socket, args.url, args.token or os.environ.get("HVCTL_TOKEN"),
                   args.ca_fingerprint)

    @property
    def where(self) -> str:
        return self._url or str(self._socket or default_socket())

    def _http(self, timeout: float | None) -> httpx.Client:
        import httpx

        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        if self._url:
            from hvagent.cli.hvctl import pinning

            verify = pinning.ssl_context(self._url, self._ca_fingerprint)
            return httpx.Client(base_url=self._url.rstrip("/"), timeout=timeout,
                                headers=headers, verify=verify)
        sock = self._socket or default_socket()
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                            base_url="http://hvagent", timeout=timeout, headers=headers)

    def request(self, method: str, path: str, *, body: Any = None,
                params: dict[str, Any] | None = None, timeout: float | None = 30.0,
                content: bytes | None = None, raw: bool = False) -> Any:
        """One API request: `body` is sent as JSON, `content` as raw bytes; the answer
        is decoded JSON, or its bytes with raw=True."""
        import httpx

        try:
            with self._http(timeout) as c:
                r = c.request(method, API + path, json=body, params=params, content=content)
        except httpx.TransportError as e:
            raise HVError(f"cannot reach the agent at {self.where}: {e}") from e
        if r.status_code >= 400:
            raise HVError(f"{_detail(r)} (HTTP {r.status_code})")
        if raw:
            return r.content
        return r.json() if r.content else None  # 204 No Content

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Any:
        return self.request("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)


def _detail(r: httpx.Response) -> str:
    """The human part of an error answer: problem+json's `detail`, else the body."""
    try:
        problem = r.json()
    except ValueError:
        return r.text
    if isinstance(problem, dict):
        return str(problem.get("detail", r.text))
    return r.text
