"""A real `hvagent serve` for a benchmark: its own directories under a work dir, the
tiny guest's directory as its policy library, and an HTTP client on its unix socket."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from hvagent.host import run
from support import REPO, qemu_pids
from support.guest import tinyguest

HVAGENT = [sys.executable, "-m", "hvagent.cli.hvagent"]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class Agent:
    """One agent process; `start()`, API calls through `ok()`, then `stop()`."""

    def __init__(self, root: Path, library: list[str]) -> None:
        self.root = root
        self.config = root / "hvagent.yaml"
        # The agent boots a kernel and initrd only from its storage or a library.
        policy = root / "policy.yaml"
        policy.write_text(json.dumps({"library": library}))
        self.socket = root / "hv.sock"
        self.run_dir = root / "run"
        self.config.write_text(json.dumps({
            "listen": str(self.socket), "state_dir": str(root / "state"),
            "storage_dir": str(root / "images"), "run_dir": str(self.run_dir),
            "log_dir": str(root / "log"), "accel": "auto", "policy": str(policy),
        }))
        self.proc: run.Popen[bytes] | None = None
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                   base_url="http://hvagent/api/v1", timeout=120)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        log = (self.root / "agent.log").open("ab")
        self.proc = run.spawn([*HVAGENT, "serve", "--config", self.config],
                              stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hvagent exited: {(self.root / 'agent.log').read_text()}")
            try:
                if self.client.get("/agent").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"hvagent did not answer in {START_TIMEOUT:g} s")

    def stop(self) -> None:
        """End the agent, then any QEMU of its VMs that outlived it."""
        self.client.close()
        if self.proc is not None:
            run.stop(self.proc, grace=STOP_TIMEOUT)
        for pid in self.qemu_pids():
            os.kill(pid, signal.SIGKILL)

    def qemu_pids(self) -> list[int]:
        """QEMU processes that belong to this agent's VMs (by their QMP socket path)."""
        return qemu_pids(f"unix:{self.run_dir}/".encode())

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        r = self.client.request(method, path, **kw)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def create_tiny(self, name: str, guest: Any, **spec: Any) -> Any:
        body = {"name": name, "vcpus": 1, "memory_mib": 256, "kernel": str(guest.kernel),
                "initrd": str(guest.initrd), "append": guest.append(), **spec}
        return self.ok("POST", "/vms", json=body)

    def console(self, name: str) -> str:
        return str(self.ok("GET", f"/vms/{name}/console", params={"lines": 100000})["text"])


def library_for(guest: Any) -> list[str]:
    """The policy library that lets an agent boot `guest` (its kernel cache and dir)."""
    return list(tinyguest.library(guest.initrd.parent))
