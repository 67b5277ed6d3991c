"""A guest kernel panic is a crash, told by QEMU's pvpanic device: a real agent, a real
QEMU (TCG) and the tiny guest, whose init exits (the kernel panics and, with `panic=0`,
stays panicked instead of rebooting)."""

from __future__ import annotations

import time

import pytest
import tinyguest
from conftest import Agent

pytestmark = pytest.mark.integration


def test_guest_panic_is_reported_crashed_with_the_log_tail(agent: Agent, tiny_guest) -> None:
    agent.create_tiny("panicky", tiny_guest,
                      append=tiny_guest.append() + " tiny_panic_after=3 panic=0")
    agent.ok("POST", "/vms/panicky/start")
    agent.wait_console("panicky", tinyguest.PANIC_MARKER)
    deadline = time.monotonic() + 60
    while (vm := agent.ok("GET", "/vms/panicky"))["state"] == "running":
        assert time.monotonic() < deadline, (
            "the guest panicked but is still reported running:\n"
            + agent.console("panicky")[-1000:])
        time.sleep(0.3)
    assert vm["state"] == "crashed", vm
    assert vm["pid"] is None and agent.qemu_pids() == []
    log = agent.console("panicky")
    assert "Kernel panic - not syncing: Attempted to kill init" in log, log[-3000:]
    error = str(vm["last_error"])
    assert error.startswith("guest stopped with status guest-panicked"), error
    # the tail of its serial log (the kernel's last words) comes with it
    tail = [ln for ln in log.splitlines() if ln.strip()][-5:]
    assert all(ln in error for ln in tail), (tail, error)
    # a crashed VM starts again
    assert agent.ok("POST", "/vms/panicky/start")["state"] == "running"
    agent.wait_console("panicky", tinyguest.BOOT_MARKER)
    assert agent.ok("POST", "/vms/panicky/stop", json={"force": True})["state"] == "stopped"
