"""hvctl's resource and checkpoint commands against a real agent and real QEMU."""

from __future__ import annotations

import json

import pytest
from conftest import Agent
from test_agent_hvctl import hvctl

pytestmark = pytest.mark.integration


def test_hvctl_resources_and_limits(agent: Agent) -> None:
    # Firmware only: enough for QEMU's side of every command.
    agent.ok("POST", "/vms", json={"name": "res", "memory_mib": 128, "max_memory_mib": 256,
                                   "vcpus": 1, "max_vcpus": 2})
    assert hvctl(agent, "vm", "start", "res").returncode == 0

    r = hvctl(agent, "vm", "add-cpu", "res")
    assert r.returncode == 0 and "res: done" in r.stdout, r.stderr
    r = hvctl(agent, "vm", "add-cpu", "res")
    assert r.returncode == 2 and "max_vcpus" in r.stderr and len(r.stderr.splitlines()) == 1
    r = hvctl(agent, "vm", "set-memory", "res", "256")
    assert r.returncode == 0, r.stderr
    r = hvctl(agent, "vm", "set-memory", "res", "512")
    assert r.returncode == 2 and "max_memory_mib" in r.stderr
    r = hvctl(agent, "vm", "attach-disk", "res", "--new-disk", "8M", "--format", "vhdx")
    assert r.returncode == 0, r.stderr
    r = hvctl(agent, "vm", "add-nic", "res", "--mac", "52:54:00:aa:bb:cc")
    assert r.returncode == 0, r.stderr

    vm = json.loads(hvctl(agent, "--json", "vm", "show", "res").stdout)
    s = vm["spec"]
    assert (s["vcpus"], s["hot_vcpus"], s["memory_mib"]) == (2, 1, 256)
    assert s["disks"][0]["format"] == "vhdx" and s["nics"][0]["mac"] == "52:54:00:aa:bb:cc"

    # No OS to release the NIC: pending, and `show` says so.
    r = hvctl(agent, "--json", "vm", "remove-nic", "res", "52:54:00:aa:bb:cc", "--timeout", "1")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "pending", r.stderr
    assert "pending unplug" in hvctl(agent, "vm", "show", "res").stdout


def test_hvctl_checkpoints(agent: Agent) -> None:
    agent.ok("POST", "/vms", json={"name": "cp", "memory_mib": 64,
                                   "disks": [{"size": "8M"}]})
    for name in ("one", "two"):
        r = hvctl(agent, "checkpoint", "create", "cp", "--name", name, "--description", name)
        assert r.returncode == 0 and "done" in r.stdout, r.stderr
    listed = json.loads(hvctl(agent, "--json", "checkpoint", "list", "cp").stdout)
    assert [(c["name"], c["current"]) for c in listed] == [("one", False), ("two", True)]
    tree = hvctl(agent, "checkpoint", "list", "cp").stdout
    assert "one" in tree and "two" in tree and "disk only" in tree
    assert hvctl(agent, "checkpoint", "revert", "cp", "one").returncode == 0
    assert hvctl(agent, "checkpoint", "delete", "cp", "two").returncode == 0
    r = hvctl(agent, "checkpoint", "revert", "cp", "two")
    assert r.returncode == 2 and "no checkpoint two" in r.stderr
    listed = json.loads(hvctl(agent, "--json", "checkpoint", "list", "cp").stdout)
    assert [(c["name"], c["current"]) for c in listed] == [("one", True)]
