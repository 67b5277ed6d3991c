"""hvctl against a real agent: the contract the host image's checks rely on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tinyguest
from conftest import Agent

pytestmark = pytest.mark.integration


def hvctl(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hvagent.cli.hvctl", "--socket", str(agent.socket), *args],
        capture_output=True, text=True, timeout=300,
    )


def test_hvctl_lifecycle(agent: Agent, tiny_guest: tinyguest.TinyGuest) -> None:
    r = hvctl(agent, "vm", "create", "cli", "--vcpus", "1", "--max-vcpus", "2",
              "--memory", "128", "--max-memory", "256", "--new-disk", "16M,format=raw",
              "--kernel", str(tiny_guest.kernel), "--initrd", str(tiny_guest.initrd),
              "--append", tiny_guest.append(), "--nic", "user")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cli: defined"
    assert hvctl(agent, "vm", "start", "cli").returncode == 0

    shown = json.loads(hvctl(agent, "--json", "vm", "show", "cli").stdout)
    assert shown["name"] == "cli" and shown["state"] == "running"
    assert shown["spec"]["disks"][0]["format"] == "raw"
    listed = json.loads(hvctl(agent, "--json", "vm", "list").stdout)
    assert [(v["name"], v["state"]) for v in listed] == [("cli", "running")]
    table = hvctl(agent, "vm", "list").stdout
    assert "cli" in table and "running" in table

    agent.wait_console("cli", "TINY cpus=")
    assert "TINY cpus=" in hvctl(agent, "vm", "console", "cli", "--lines", "5").stdout
    assert hvctl(agent, "vm", "pause", "cli").stdout.strip() == "cli: paused"
    assert hvctl(agent, "vm", "resume", "cli").stdout.strip() == "cli: running"
    assert hvctl(agent, "vm", "stop", "cli", "--timeout", "60").stdout.strip() == "cli: stopped"
    r = hvctl(agent, "vm", "delete", "cli")
    assert r.returncode == 0 and "removed" in r.stdout
    assert json.loads(hvctl(agent, "--json", "vm", "list").stdout) == []


@pytest.mark.parametrize("args, message", [
    (("vm", "show", "ghost"), "hvctl: ghost: no such VM (HTTP 404)"),
    (("vm", "create", "m", "--vcpus", "1", "--memory", "512", "--max-memory", "128"),
     "hvctl: memory_mib (512) is above max_memory_mib (128) (HTTP 422)"),
    (("vm", "create", "m", "--vcpus", "1", "--memory", "64", "--disk", "/etc/hosts"),
     "disks[0].path: /etc/hosts: not an allowed file"),
    (("vm", "create", "m", "--vcpus", "1", "--memory", "64", "--new-disk", "8M,fmt=raw"),
     "hvctl: --new-disk 8M,fmt=raw: unknown option 'fmt=raw' (only format=F)"),
])
def test_hvctl_errors_exit_2_with_one_line(agent: Agent, args: tuple[str, ...],
                                           message: str) -> None:
    r = hvctl(agent, *args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert message in r.stderr
    assert agent.ok("GET", "/vms") == []


def test_hvctl_without_agent_exits_2(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "hvagent.cli.hvctl", "--socket",
                        str(tmp_path / "none.sock"), "vm", "list"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("hvctl: cannot reach the agent at ")
