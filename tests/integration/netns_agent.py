"""An agent that runs inside a network namespace the test made (its bridges, taps,
dnsmasqs and nftables rules never touch the host's network)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
from secure_agent import SecureAgent


class NetnsAgent(SecureAgent):
    """A SecureAgent whose `hvagent serve` runs under `ip netns exec`. Clients use the
    unix socket (a file, reachable from any namespace) with or without a token."""

    def __init__(self, root: Path, netns: str, policy: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(root, policy, config)
        self.netns = netns
        self.wrapper = ("ip", "netns", "exec", netns)
        self.tokens: dict[str, str] = {}

    def uds(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://hvagent/api/v1", headers=headers, timeout=120)

    def links(self) -> dict[str, str | None]:
        """Interface name -> its bridge (master) inside the agent's namespace."""
        out = subprocess.run(["ip", "-n", self.netns, "-o", "link", "show"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        links: dict[str, str | None] = {}
        for line in out.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            words = line.split()
            links[name] = words[words.index("master") + 1] if "master" in words else None
        return links

    def restart(self) -> None:
        """Stop the agent (its VMs and networks stay) and start a new one."""
        self.stop()
        self.root_client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                        base_url="http://hvagent/api/v1", timeout=60)
        self.start()

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the agent's namespace."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], capture_output=True,
                              text=True, check=check, timeout=60)
