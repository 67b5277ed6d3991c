"""A real `hvagent serve` with its HTTPS listener on 127.0.0.1 and a host policy file,
plus what the security tests need around it: tokens made with the real
`hvagent token` command and HTTPS clients that trust only the agent's own CA."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import tinyguest
import yaml

REPO = Path(__file__).resolve().parents[2]
HVAGENT = [sys.executable, "-m", "hvagent.cli.hvagent"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SecureAgent:
    # A command the agent runs under (e.g. `ip netns exec NS`); empty: run it directly.
    wrapper: tuple[str, ...] = ()

    def __init__(self, root: Path, policy: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.root = root
        self.config = root / "hvagent.yaml"
        self.socket = root / "hv.sock"
        self.state = root / "state"
        self.policy = root / "policy.yaml"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        # The session's tiny guest is a library unless the test's policy names one.
        self.policy.write_text(yaml.safe_dump({
            "library": tinyguest.library(), **(policy or {})}))
        self.config.write_text(json.dumps({
            "listen": str(self.socket), "state_dir": str(self.state),
            "storage_dir": str(root / "images"), "run_dir": str(root / "run"),
            "log_dir": str(root / "log"), "accel": "tcg", "policy": str(self.policy),
            "tls": {"listen": f"127.0.0.1:{self.port}"}, **(config or {}),
        }))
        self.proc: subprocess.Popen[bytes] | None = None
        # root over the unix socket: no token (SO_PEERCRED says uid 0)
        self.root_client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                        base_url="http://hvagent/api/v1", timeout=60)

    @property
    def log(self) -> str:
        return (self.root / "agent.log").read_text()

    def start(self) -> None:
        out = (self.root / "agent.log").open("ab")
        since = out.tell()  # a restart: only this run's lines count
        self.proc = subprocess.Popen([*self.wrapper, *HVAGENT, "serve", "--config",
                                      str(self.config)], stdout=out, stderr=out, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hvagent exited: {self.log}")
            if "listening on https://" in self.log[since:]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"hvagent did not listen in 60 s: {self.log}")

    def stop(self) -> None:
        self.root_client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    # TLS

    @property
    def ca_pem(self) -> Path:
        return self.state / "tls" / "ca.pem"

    def fingerprint(self) -> str:
        """The CA fingerprint exactly as the agent logged it at start."""
        for line in self.log.splitlines():
            if "TLS CA fingerprint (sha256)" in line:
                return line.split("(sha256) ")[1].split()[0]
        raise AssertionError(f"no CA fingerprint in the agent log:\n{self.log}")

    def client(self, token: str | None = None) -> httpx.Client:
        """HTTPS client trusting only this agent's CA (and checking the host name)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url + "/api/v1", verify=ctx, headers=headers,
                            timeout=60)

    # tokens, through the real CLI

    def hvagent(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HVAGENT, "token", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    def token(self, principal: str, role: str | None = None, path: str = "/",
              expires: str | None = None) -> dict[str, Any]:
        args = ["--json", "create", principal]
        if role:
            args += ["--role", role, "--path", path]
        if expires:
            args += ["--expires", expires]
        r = self.hvagent(*args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def revoke(self, token_id: str) -> None:
        r = self.hvagent("revoke", token_id)
        assert r.returncode == 0, r.stderr

    def audit(self) -> list[dict[str, Any]]:
        r = self.root_client.get("/audit", params={"limit": 100000})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]
