"""A fleet of real agents for a benchmark: each `hvagent serve` with its HTTPS listener
on 127.0.0.1, an Auditor token made by the real `hvagent token`, and the hosts file
that names them all (their CA fingerprints as the agents log them)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import yaml

from hvagent.host import run
from support import REPO
from support.agent import HVAGENT, START_TIMEOUT, Agent

TOKEN_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TlsAgent(Agent):
    """An Agent that also listens on https://127.0.0.1:PORT."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(root, library=[])
        self.name = name
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        config = json.loads(self.config.read_text())
        config["tls"] = {"listen": f"127.0.0.1:{self.port}"}
        self.config.write_text(json.dumps(config))

    @property
    def log(self) -> str:
        return (self.root / "agent.log").read_text()

    def start(self) -> None:
        super().start()  # answers on its unix socket; the HTTPS port follows at once
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on https://" not in self.log:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no HTTPS listener: {self.log}")
            time.sleep(0.05)

    def fingerprint(self) -> str:
        for line in self.log.splitlines():
            if "TLS CA fingerprint (sha256)" in line:
                return line.split("(sha256) ")[1].split()[0]
        raise RuntimeError(f"{self.name}: no CA fingerprint in its log")

    def token(self, principal: str, role: str) -> str:
        r = run.run([*HVAGENT, "token", "--config", self.config, "--json", "create",
                     principal, "--role", role], timeout=TOKEN_TIMEOUT, cwd=REPO)
        return str(json.loads(r.stdout)["token"])


def start_fleet(work: Path, count: int) -> list[TlsAgent]:
    """`count` agents named host-00, host-01, ...; stop them with stop_fleet."""
    agents = []
    try:
        for i in range(count):
            root = work / f"host-{i:02d}"
            root.mkdir()
            a = TlsAgent(root, root.name)
            agents.append(a)
            a.start()
    except BaseException:
        stop_fleet(agents)
        raise
    return agents


def stop_fleet(agents: list[TlsAgent]) -> None:
    for a in agents:
        a.stop()


def write_hosts_file(config_dir: Path, agents: list[TlsAgent]) -> Path:
    """hosts.yaml in `config_dir`, each host with a token file beside it."""
    config_dir.mkdir(parents=True, exist_ok=True)
    hosts = []
    for a in agents:
        (config_dir / f"{a.name}.token").write_text(a.token("bench", "Auditor"))
        hosts.append({"name": a.name, "url": a.url, "ca_fingerprint": a.fingerprint(),
                      "token_file": f"{a.name}.token"})
    f = config_dir / "hosts.yaml"
    f.write_text(yaml.safe_dump({"hosts": hosts}))
    return f
