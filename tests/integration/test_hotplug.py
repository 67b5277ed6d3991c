"""Hot-add and hot-remove of vCPUs, memory, disks and NICs on running VMs through the
real API of a real agent, asserted on what the tiny guest reports on its serial console."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest
import tinyguest
from conftest import Agent

pytestmark = pytest.mark.integration


def wait_state(agent: Agent, name: str, timeout: float = 90, **want: Any) -> dict[str, str]:
    """The guest's newest state line once every `want` field matches (callables test)."""
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = tinyguest.parse_states(agent.console(name))
        if states:
            last = states[-1]
            if all(w(last[k]) if callable(w) else last[k] == str(w) for k, w in want.items()):
                return last
        time.sleep(0.3)
    raise AssertionError(f"{name}: guest never reported {want}; last state {last}")


def test_hot_add_and_remove_with_cooperating_guest(agent: Agent, tiny_guest) -> None:
    agent.create_tiny("hot", tiny_guest, vcpus=1, max_vcpus=2, memory_mib=256,
                      max_memory_mib=512, append=tiny_guest.append(memory_hotplug=True))
    agent.ok("POST", "/vms/hot/start")
    before = wait_state(agent, "hot", cpus=1, disks="", nics="")
    memkb = int(before["memkb"])

    r = agent.ok("PUT", "/vms/hot/vcpus", json={"vcpus": 2})
    assert r["status"] == "done" and r["vm"]["spec"]["vcpus"] == 2
    wait_state(agent, "hot", cpus=2)

    r = agent.ok("PUT", "/vms/hot/memory", json={"memory_mib": 384})
    assert r["vm"]["spec"]["dimms"] == [{"slot": 0, "size_mib": 128}]
    wait_state(agent, "hot", memkb=lambda v: int(v) >= memkb + 128 * 1024 - 1024)
    # A DIMM the guest onlined as movable memory comes out again.
    r = agent.ok("PUT", "/vms/hot/memory", json={"memory_mib": 256})
    assert r["status"] == "done" and r["vm"]["spec"]["dimms"] == []
    wait_state(agent, "hot", memkb=lambda v: int(v) < memkb + 64 * 1024)
    agent.ok("PUT", "/vms/hot/memory", json={"memory_mib": 384})
    wait_state(agent, "hot", memkb=lambda v: int(v) >= memkb + 128 * 1024 - 1024)

    r = agent.ok("POST", "/vms/hot/disks", json={"size": "16M"})
    disk = r["vm"]["spec"]["disks"][0]
    assert disk["slot"] is not None and disk["created"]
    wait_state(agent, "hot", disks="vda")

    r = agent.ok("POST", "/vms/hot/nics", json={"network": "user"})
    mac = r["vm"]["spec"]["nics"][0]["mac"]
    wait_state(agent, "hot", nics="eth0")

    # Limits answer 409 and name the limit; nothing changes.
    for path, body, limit in (("/vms/hot/vcpus", {"vcpus": 3}, "max_vcpus"),
                              ("/vms/hot/memory", {"memory_mib": 1024}, "max_memory_mib")):
        res = agent.client.put(path, json=body)
        assert res.status_code == 409 and limit in res.json()["detail"], res.text

    # The spec kept every change: a power cycle brings the same hardware back.
    agent.ok("POST", "/vms/hot/stop", json={"force": True})
    agent.ok("POST", "/vms/hot/start")
    after = wait_state(agent, "hot", cpus=2, disks="vda", nics="eth0")
    assert int(after["memkb"]) >= memkb + 128 * 1024 - 1024

    # Removal with a cooperating guest completes (no pending). (Memory is not tried
    # here: Linux puts a DIMM present at boot into its normal zone, not movable.)
    r = agent.ok("DELETE", "/vms/hot/disks", params={"path": disk["path"]})
    assert r["status"] == "done" and r["vm"]["spec"]["disks"] == []
    wait_state(agent, "hot", disks="")
    r = agent.ok("DELETE", f"/vms/hot/nics/{mac}")
    assert r["status"] == "done" and r["vm"]["spec"]["nics"] == []
    wait_state(agent, "hot", nics="")
    r = agent.ok("PUT", "/vms/hot/vcpus", json={"vcpus": 1})
    assert r["status"] == "done" and r["vm"]["spec"]["hot_vcpus"] == 0
    wait_state(agent, "hot", cpus=1)
    assert agent.ok("GET", "/vms/hot")["spec"]["pending_unplugs"] == []


def test_unplug_without_guest_os_goes_pending(agent: Agent) -> None:
    # Firmware only: nothing answers the ACPI eject request.
    agent.ok("POST", "/vms", json={"name": "deaf", "memory_mib": 64, "hotplug_ports": 1})
    agent.ok("POST", "/vms/deaf/start")
    disk = agent.ok("POST", "/vms/deaf/disks", json={"size": "8M"})["vm"]["spec"]["disks"][0]
    res = agent.client.post("/vms/deaf/nics", json={"network": "user"})
    assert res.status_code == 409 and "hotplug_ports" in res.json()["detail"]

    res = agent.client.delete("/vms/deaf/disks", params={"path": disk["path"], "timeout": 2})
    assert res.status_code == 202, res.text
    assert res.json()["status"] == "pending"
    pending = agent.ok("GET", "/vms/deaf")["spec"]["pending_unplugs"]
    assert [(p["kind"], p["device"]) for p in pending] == [("disk", "hpdisk0")]
    assert agent.ok("GET", "/vms/deaf/devices")["pending_unplugs"] == pending

    # The next power cycle completes it.
    agent.ok("POST", "/vms/deaf/stop", json={"force": True})
    vm = agent.ok("POST", "/vms/deaf/start")
    assert vm["spec"]["disks"] == [] and vm["spec"]["pending_unplugs"] == []


def test_spec_of_hot_added_devices_is_checked(agent: Agent) -> None:
    base = {"name": "bad", "vcpus": 2, "max_vcpus": 4, "memory_mib": 256,
            "max_memory_mib": 512}
    for extra, field in (({"hot_vcpus": 2}, "hot_vcpus"),
                         ({"dimms": [{"slot": 0, "size_mib": 256}]}, "dimms"),
                         ({"dimms": [{"slot": 8, "size_mib": 128}]}, "slots"),
                         ({"hotplug_ports": 1, "nics": [{"slot": 1}]}, "hotplug_ports")):
        r = agent.client.post("/vms", json={**base, **extra})
        assert r.status_code == 422 and field in r.json()["detail"], (extra, r.text)
    assert agent.ok("GET", "/vms") == []


def test_hot_added_devices_are_not_on_the_command_line(tmp_path) -> None:
    from hvagent.drivers.machine import VMFiles, build_command
    from hvagent.spec import VMSpec

    spec = VMSpec.model_validate({
        "name": "cmd", "vcpus": 3, "max_vcpus": 4, "hot_vcpus": 2, "memory_mib": 512,
        "max_memory_mib": 1024, "dimms": [{"slot": 1, "size_mib": 256}],
        "disks": [{"path": "/a.qcow2", "format": "qcow2", "created": True},
                  {"path": "/b.qcow2", "format": "qcow2", "created": True, "slot": 0}],
        "nics": [{"slot": 1}]})
    cmd = " ".join(build_command(spec, VMFiles.for_vm("cmd", tmp_path, tmp_path, tmp_path),
                                 []))
    assert "-smp 1,maxcpus=4" in cmd and "-m 256M,slots=8,maxmem=1024M" in cmd
    assert "/a.qcow2" in cmd and "/b.qcow2" not in cmd and "virtio-net" not in cmd


def test_refused_hot_add_leaves_spec_and_vm_as_before(agent: Agent) -> None:
    disk = agent.ok("POST", "/vms", json={"name": "owner", "memory_mib": 64,
                                          "disks": [{"size": "8M"}]})["spec"]["disks"][0]
    agent.ok("POST", "/vms", json={"name": "other", "memory_mib": 64})
    agent.ok("POST", "/vms/owner/start")
    agent.ok("POST", "/vms/other/start")
    # Another VM's disk: refused before QEMU is asked (hvagent.services.files), even for root.
    r = agent.client.post("/vms/other/disks", json={"path": disk["path"]})
    assert r.status_code == 409 and "in use: a disk of VM owner" in r.json()["detail"], r.text
    vm = agent.ok("GET", "/vms/other")
    assert vm["state"] == "running" and vm["spec"]["disks"] == []
    # QEMU itself refuses an image another process holds (image locking): the agent
    # undoes the half-made hot-add.
    held = agent.storage / "held.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(held), "8M"], check=True,
                   timeout=60)
    # a QEMU outside the agent, its guest not started, with the image as its disk
    daemon = subprocess.Popen(["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg",
                               "-display", "none", "-nodefaults", "-S", "-drive",
                               f"file={held},format=raw,if=virtio"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["qemu-io", "-f", "raw", "-c", "quit", str(held)],
                             capture_output=True, timeout=30).returncode == 0:
            assert time.monotonic() < deadline, "the outside QEMU never locked the image"
            time.sleep(0.2)
        r = agent.client.post("/vms/other/disks", json={"path": str(held)})
        assert r.status_code == 409 and "lock" in r.json()["detail"], r.text
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    vm = agent.ok("GET", "/vms/other")
    assert vm["state"] == "running" and vm["spec"]["disks"] == []
    # nothing half-plugged stays behind: the same port takes the next disk
    r = agent.ok("POST", "/vms/other/disks", json={"size": "8M"})
    assert [d["slot"] for d in r["vm"]["spec"]["disks"]] == [0]
