"""VM lifecycle through the real HTTP API of a real agent, with real QEMU (TCG)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import tinyguest
from conftest import Agent

pytestmark = pytest.mark.integration


def _counter(console: str) -> int:
    return int(tinyguest.parse_states(console)[-1]["counter"])


def _wait_counter_above(agent: Agent, name: str, value: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = tinyguest.parse_states(agent.console(name))
        if states and int(states[-1]["counter"]) > value:
            return int(states[-1]["counter"])
        time.sleep(0.3)
    raise AssertionError(f"{name}: guest counter did not pass {value}")


def test_create_start_pause_resume_stop_delete(agent: Agent, tiny_guest) -> None:
    vm = agent.create_tiny("life", tiny_guest, nics=[{"network": "user"}],
                           disks=[{"size": "32M"}])
    assert vm["state"] == "defined"
    disk = Path(vm["spec"]["disks"][0]["path"])
    assert disk.parent == agent.storage and disk.exists()

    assert agent.ok("POST", "/vms/life/start")["state"] == "running"
    agent.wait_console("life", tinyguest.BOOT_MARKER)
    state = tinyguest.parse_states(agent.wait_console("life", "TINY cpus="))[-1]
    assert state["disks"] == "vda" and state["nics"] == "eth0"

    assert agent.ok("POST", "/vms/life/pause")["state"] == "paused"
    assert agent.ok("GET", "/vms/life")["state"] == "paused"
    frozen = _counter(agent.console("life"))
    time.sleep(1.5)  # a paused guest prints nothing
    assert _counter(agent.console("life")) == frozen
    assert agent.ok("POST", "/vms/life/resume")["state"] == "running"
    _wait_counter_above(agent, "life", frozen)

    vm = agent.ok("POST", "/vms/life/stop", json={"timeout": 60})
    assert vm["state"] == "stopped"
    assert vm["last_error"] is None  # graceful, not forced
    assert tinyguest.POWEROFF_MARKER in agent.console("life")
    assert agent.qemu_pids() == []

    assert agent.ok("DELETE", "/vms/life")["removed_disks"] == [str(disk)]
    assert not disk.exists()
    assert agent.ok("GET", "/vms") == []
    assert agent.client.get("/vms/life").status_code == 404


def test_restart_after_guest_stop_and_reset(agent: Agent, tiny_guest) -> None:
    agent.create_tiny("again", tiny_guest)
    pid = agent.ok("POST", "/vms/again/start")["pid"]
    _wait_counter_above(agent, "again", 2)
    agent.ok("POST", "/vms/again/reset")
    # After a reset the guest boots again in the same QEMU (the serial log goes on): a
    # second boot marker, after which the counter starts from 0 again.
    deadline = time.monotonic() + 120
    while True:
        boots = agent.console("again").split(tinyguest.BOOT_MARKER)[1:]
        if len(boots) >= 2 and tinyguest.parse_states(boots[1]):
            break
        assert time.monotonic() < deadline, f"no second boot after the reset: {boots[-1:]}"
        time.sleep(0.3)
    assert int(tinyguest.parse_states(boots[0])[-1]["counter"]) >= 2  # the boot before
    assert tinyguest.parse_states(boots[1])[0]["counter"] == "0", boots[1]
    assert agent.ok("GET", "/vms/again")["pid"] == pid  # a reset, not a new QEMU
    agent.ok("POST", "/vms/again/stop", json={"force": True})
    assert agent.ok("POST", "/vms/again/start")["state"] == "running"
    agent.wait_console("again", tinyguest.BOOT_MARKER)
    assert agent.ok("POST", "/vms/again/stop")["state"] == "stopped"


def test_guest_poweroff_reported_stopped(agent: Agent, tiny_guest) -> None:
    """The guest powering itself off is a stop, not a crash."""
    agent.create_tiny("self", tiny_guest, append=tiny_guest.append() + " tiny_poweroff_after=3")
    agent.ok("POST", "/vms/self/start")
    agent.wait_console("self", tinyguest.POWEROFF_MARKER)
    deadline = time.monotonic() + 30
    while (vm := agent.ok("GET", "/vms/self"))["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert vm["state"] == "stopped"
    assert agent.qemu_pids() == []


def test_agent_sigkill_leaves_vms_running_and_reattaches(agent: Agent, tiny_guest) -> None:
    for name in ("ka", "kb"):
        agent.create_tiny(name, tiny_guest)
        agent.ok("POST", f"/vms/{name}/start")
    for name in ("ka", "kb"):
        agent.wait_console(name, "TINY cpus=")
    pids = sorted(agent.qemu_pids())
    assert len(pids) == 2

    agent.kill()
    agent.start()

    assert sorted(agent.qemu_pids()) == pids
    vms = {vm["name"]: vm for vm in agent.ok("GET", "/vms")}
    assert {n: v["state"] for n, v in vms.items()} == {"ka": "running", "kb": "running"}
    # still controllable over the reattached QMP connections
    assert agent.ok("POST", "/vms/ka/pause")["state"] == "paused"
    assert agent.ok("POST", "/vms/ka/resume")["state"] == "running"
    assert agent.ok("POST", "/vms/kb/stop")["state"] == "stopped"
    assert agent.ok("POST", "/vms/ka/stop", json={"force": True})["state"] == "stopped"
    assert agent.qemu_pids() == []


def test_qemu_killed_from_outside_is_crashed(agent: Agent, tiny_guest) -> None:
    agent.create_tiny("victim", tiny_guest)
    pid = agent.ok("POST", "/vms/victim/start")["pid"]
    agent.wait_console("victim", "TINY cpus=")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (vm := agent.ok("GET", "/vms/victim"))["state"] == "running":
        assert time.monotonic() < deadline, "QEMU killed but still reported running"
        time.sleep(0.2)
    assert vm["state"] == "crashed"
    assert vm["pid"] is None
    assert "TINY cpus=" in vm["last_error"]  # the tail of its log
    # a crashed VM can be started again
    assert agent.ok("POST", "/vms/victim/start")["state"] == "running"


def test_agent_restart_reports_vm_that_died_meanwhile_as_crashed(
        agent: Agent, tiny_guest) -> None:
    agent.create_tiny("gone", tiny_guest)
    pid = agent.ok("POST", "/vms/gone/start")["pid"]
    agent.kill()
    os.kill(pid, signal.SIGKILL)
    agent.start()
    assert agent.ok("GET", "/vms/gone")["state"] == "crashed"


def test_concurrent_operation_is_409_and_stop_forces_off_after_timeout(agent: Agent) -> None:
    # No OS: nothing handles the ACPI power button, so a stop waits its whole timeout.
    agent.ok("POST", "/vms", json={"name": "deaf", "memory_mib": 64})
    agent.ok("POST", "/vms/deaf/start")
    result: dict[str, object] = {}
    stopper = threading.Thread(target=lambda: result.update(
        agent.ok("POST", "/vms/deaf/stop", json={"timeout": 4})))
    stopper.start()
    deadline = time.monotonic() + 30
    while agent.ok("GET", "/vms/deaf")["operation"] != "stop":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for method, path in (("POST", "/vms/deaf/pause"), ("POST", "/vms/deaf/start"),
                         ("POST", "/vms/deaf/stop"), ("DELETE", "/vms/deaf")):
        r = agent.client.request(method, path)
        assert r.status_code == 409, (path, r.text)
        assert r.json()["operation"] == "stop"
        assert "'stop' is in progress" in r.json()["detail"]
    stopper.join()
    assert result["state"] == "stopped"
    assert "forced off" in str(result["last_error"])
    assert agent.qemu_pids() == []


def test_uefi_vm_gets_its_own_variable_store(agent: Agent) -> None:
    agent.ok("POST", "/vms", json={"name": "efi", "memory_mib": 128, "firmware": "uefi"})
    efivars = agent.root / "state" / "vms" / "efi" / "OVMF_VARS.fd"
    assert efivars.stat().st_size == Path("/usr/share/OVMF/OVMF_VARS_4M.fd").stat().st_size
    assert agent.ok("POST", "/vms/efi/start")["state"] == "running"
    assert agent.ok("POST", "/vms/efi/stop", json={"force": True})["state"] == "stopped"
    agent.ok("DELETE", "/vms/efi")
    assert not efivars.parent.exists()
