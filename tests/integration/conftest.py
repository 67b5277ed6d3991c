"""Fixtures for integration tests: the tiny guest (built once per session) and a real
hvagent daemon on a real unix socket, run as a separate process so that tests can kill
and restart it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tinyguest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HVAGENT = [sys.executable, "-m", "hvagent.cli.hvagent"]


@pytest.fixture(scope="session", autouse=True)
def tiny_guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tiny_guest builds: known before it is built, so that every agent a test
    starts can name it in its policy library (tinyguest.library())."""
    tinyguest.session_dir = tmp_path_factory.getbasetemp() / tinyguest.BUILD_DIR
    return tinyguest.session_dir


@pytest.fixture(scope="session")
def tiny_guest(tiny_guest_dir: Path) -> tinyguest.TinyGuest:
    tiny_guest_dir.mkdir(exist_ok=True)
    return tinyguest.build(tiny_guest_dir)


class Agent:
    """A running `hvagent serve` with its own directories and an HTTP client."""

    def __init__(self, root: Path, library: list[str] | None = None) -> None:
        self.root = root
        self.config = root / "hvagent.yaml"
        # The tiny guest's kernel and initrd are a library (default: the session's).
        policy = root / "policy.yaml"
        policy.write_text(json.dumps({"library": library if library is not None else
                                      tinyguest.library()}))
        self.socket = root / "hv.sock"
        self.storage = root / "images"
        self.run_dir = root / "run"
        self.log_dir = root / "log"
        self.config.write_text(json.dumps({
            "listen": str(self.socket), "state_dir": str(root / "state"),
            "storage_dir": str(self.storage), "run_dir": str(self.run_dir),
            "log_dir": str(self.log_dir), "accel": "auto", "policy": str(policy),
        }))
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                   base_url="http://hvagent/api/v1", timeout=120)

    def token(self, principal: str, role: str) -> str:
        """A fresh API token for `principal` with `role` on / (made by `hvagent token`)."""
        r = subprocess.run([*HVAGENT, "token", "--config", str(self.config), "--json",
                            "create", principal, "--role", role],
                           capture_output=True, text=True, cwd=REPO, check=False, timeout=120)
        assert r.returncode == 0, r.stderr
        return str(json.loads(r.stdout)["token"])

    def start(self) -> None:
        log = (self.root / "agent.log").open("ab")
        self.proc = subprocess.Popen([*HVAGENT, "serve", "--config", str(self.config)],
                                     stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hvagent exited: {(self.root / 'agent.log').read_text()}")
            try:
                if self.client.get("/agent").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("hvagent did not answer in 60 s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def qemu_pids(self) -> list[int]:
        """QEMU processes that belong to this agent's VMs (by their QMP socket path)."""
        pids = []
        marker = f"unix:{self.run_dir}/".encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmd and b"qemu-system" in cmd:
                pids.append(int(d.name))
        return pids

    # API helpers

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        r = self.client.request(method, path, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def create_tiny(self, name: str, guest: tinyguest.TinyGuest, **spec: Any) -> Any:
        body = {"name": name, "vcpus": 1, "memory_mib": 256, "kernel": str(guest.kernel),
                "initrd": str(guest.initrd), "append": guest.append(), **spec}
        return self.ok("POST", "/vms", json=body)

    def console(self, name: str) -> str:
        return str(self.ok("GET", f"/vms/{name}/console", params={"lines": 100000})["text"])

    def wait_console(self, name: str, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.console(name)
            if text in out:
                return out
            time.sleep(0.3)
        raise AssertionError(f"{name}: {text!r} not on the console in {timeout}s:\n{out}")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    a.start()
    try:
        yield a
    finally:
        # Leave nothing running: force off what the agent knows, then any leftover QEMU
        # of this agent's directories (only ours: matched by our run dir).
        try:
            if a.proc is not None and a.proc.poll() is None:
                for vm in a.client.get("/vms").json():
                    if vm["state"] in ("running", "paused"):
                        a.client.post(f"/vms/{vm['name']}/stop", json={"force": True})
        except httpx.HTTPError:
            pass
        a.stop()
        for pid in a.qemu_pids():
            os.kill(pid, signal.SIGKILL)
        a.client.close()
