"""Checkpoints through the real API of a real agent with real QEMU: memory and disk come
back on revert (the tiny guest's counter, the blocks it wrote to its disk), also after
hot-adds, for qcow2 (internal snapshots) and VHD (external overlays + memory file)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import tinyguest
from conftest import Agent
from test_hotplug import wait_state

pytestmark = pytest.mark.integration


def wait_job(agent: Agent, job: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := agent.ok("GET", f"/jobs/{job['id']}"))["status"] == "running":
        assert time.monotonic() < deadline, f"job {job} still running"
        time.sleep(0.1)
    return job


def run_job(agent: Agent, method: str, path: str, **kw: Any) -> dict[str, Any]:
    r = agent.client.request(method, path, **kw)
    assert r.status_code == 202, r.text
    job = wait_job(agent, r.json())
    assert job["status"] == "succeeded", job["error"]
    return job


def counter(agent: Agent, name: str) -> int:
    return int(tinyguest.parse_states(agent.console(name))[-1]["counter"])


def disk_blocks(disk: str, tmp: Path) -> set[int]:
    """The counters of the TINY-DISK blocks on a disk image (read with share mode)."""
    raw = tmp / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", disk, str(raw)], check=True,
                   timeout=60)
    data = raw.read_bytes()
    raw.unlink()
    return {int(m.group(1)) for m in re.finditer(rb"TINY-DISK counter=(\d+)", data)}


def make_vm(agent: Agent, guest: tinyguest.TinyGuest, name: str, fmt: str) -> dict[str, Any]:
    return agent.create_tiny(
        name, guest, vcpus=1, max_vcpus=2, memory_mib=256, max_memory_mib=512,
        disks=[{"size": "8M", "format": fmt}],
        append=guest.append(memory_hotplug=True) + " tiny_disk_log")


@pytest.mark.parametrize("fmt", ["qcow2", "vhd"])
def test_revert_after_hotplug_restores_memory_disk_and_layout(
        agent: Agent, tiny_guest, tmp_path: Path, fmt: str) -> None:
    vm = make_vm(agent, tiny_guest, "ck", fmt)
    agent.ok("POST", "/vms/ck/start")
    wait_state(agent, "ck", counter=lambda v: int(v) >= 3)
    pre = counter(agent, "ck")
    job = run_job(agent, "POST", "/vms/ck/checkpoints",
                  json={"name": "before", "description": "1 vCPU"})
    at = counter(agent, "ck")
    assert job["result"]["with_memory"] is True
    assert job["result"]["method"] == ("internal" if fmt == "qcow2" else "external")

    agent.ok("PUT", "/vms/ck/vcpus", json={"vcpus": 2})
    agent.ok("PUT", "/vms/ck/memory", json={"memory_mib": 384})
    wait_state(agent, "ck", cpus=2, counter=lambda v: int(v) >= at + 20)
    assert agent.ok("GET", "/vms/ck")["spec"]["hot_vcpus"] == 1

    job = run_job(agent, "POST", "/vms/ck/checkpoints/before/revert")
    # The layout differs from the checkpoint's (hot-added vCPU and DIMM): a new QEMU.
    assert job["result"]["how"] == "restarted", job["result"]
    agent.wait_console("ck", "TINY cpus=")
    agent.ok("POST", "/vms/ck/pause")  # freeze the guest to look at it
    vm = agent.ok("GET", "/vms/ck")
    log = agent.console("ck")  # this QEMU's log only
    states = tinyguest.parse_states(log)
    # Memory: the guest continues from the checkpoint's counter (held in guest memory
    # only), with one vCPU again: neither a cold boot (counter from 0, a boot marker)
    # nor the state from before the revert (counter >= at + 20).
    assert tinyguest.BOOT_MARKER not in log, log[-2000:]
    assert states and pre <= int(states[0]["counter"]) <= at + 1, (pre, at, states[0])
    assert {s["cpus"] for s in states} == {"1"}
    # Layout: the VM's spec is the checkpoint's again.
    cp = agent.ok("GET", "/vms/ck/checkpoints/before")
    assert cp["current"] is True
    assert vm["spec"]["vcpus"] == 1 and vm["spec"]["hot_vcpus"] == 0
    assert vm["spec"]["dimms"] == [] and vm["spec"]["memory_mib"] == 256
    # Disk: the blocks written after the checkpoint are gone.
    blocks = disk_blocks(vm["spec"]["disks"][0]["path"], tmp_path)
    assert 1 in blocks and at - 1 in blocks
    assert not blocks & set(range(at + 10, at + 20)), sorted(blocks)
    agent.ok("POST", "/vms/ck/resume")
    wait_state(agent, "ck", counter=lambda v: int(v) > int(states[-1]["counter"]))


def _since_revert(log: str, before: int) -> list[int]:
    """The guest's counters from the revert on: the state lines after the first `before`
    from where the counter stops counting on by one (the guest's memory was replaced)."""
    counters = [int(s["counter"]) for s in tinyguest.parse_states(log)]
    if before == 0:  # a new QEMU's log: all of it
        return counters
    for k in range(before, len(counters)):
        if counters[k] != counters[k - 1] + 1:
            return counters[k:]
    return []


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vhdx"])
def test_delete_middle_checkpoint_keeps_older_and_newer(
        agent: Agent, tiny_guest, tmp_path: Path, fmt: str) -> None:
    """qcow2: every checkpoint is an internal snapshot, reverts load in place. raw and
    VHDX: c1 freezes the image under a qcow2 overlay (external, memory in a file), c2
    and c3 are internal snapshots in that overlay; reverts start a new QEMU."""
    base = make_vm(agent, tiny_guest, "tree", fmt)["spec"]["disks"][0]["path"]
    agent.ok("POST", "/vms/tree/start")
    marks: dict[str, int] = {}
    frozen = ""
    for name in ("c1", "c2", "c3"):
        wait_state(agent, "tree", counter=lambda v: int(v) >= max(marks.values(), default=0) + 6)
        job = run_job(agent, "POST", "/vms/tree/checkpoints", json={"name": name})
        marks[name] = counter(agent, "tree")
        if name == "c1":
            assert job["result"]["method"] == ("internal" if fmt == "qcow2" else "external")
            frozen = _sha256(base)  # from here on the VM writes elsewhere (raw, VHDX)
    cps = {c["name"]: c for c in agent.ok("GET", "/vms/tree/checkpoints")}
    assert cps["c2"]["parent"] == cps["c1"]["id"] and cps["c3"]["current"]

    run_job(agent, "DELETE", "/vms/tree/checkpoints/c2")
    cps = {c["name"]: c for c in agent.ok("GET", "/vms/tree/checkpoints")}
    assert set(cps) == {"c1", "c3"} and cps["c3"]["parent"] == cps["c1"]["id"]
    how = "in-place" if fmt == "qcow2" else "restarted"
    for name in ("c1", "c3", "c1"):
        pid = agent.ok("GET", "/vms/tree")["pid"]
        before = len(tinyguest.parse_states(agent.console("tree")))
        job = run_job(agent, "POST", f"/vms/tree/checkpoints/{name}/revert")
        assert job["result"]["how"] == how, (name, job["result"])
        vm = agent.ok("GET", "/vms/tree")
        if how == "in-place":  # loaded into the running QEMU: its log goes on
            assert vm["pid"] == pid
        else:  # a new QEMU: a new log
            assert vm["pid"] != pid
            before = 0
        deadline = time.monotonic() + 60
        while len(new := _since_revert(agent.console("tree"), before)) < 2:
            assert time.monotonic() < deadline, "the guest prints nothing after the revert"
            time.sleep(0.2)
        agent.ok("POST", "/vms/tree/pause")
        new = _since_revert(agent.console("tree"), before)
        # Memory: the counter continues from the checkpoint's (not from 0, not from
        # where the guest was before the revert).
        assert marks[name] - 2 <= new[0] <= marks[name] + 2, (name, marks, new)
        # Disk: what the guest wrote up to the checkpoint is there, what came later not.
        blocks = disk_blocks(vm["spec"]["disks"][0]["path"], tmp_path)
        assert marks[name] - 2 in blocks, (name, sorted(blocks))
        later = {b for b in blocks if b > new[-1]}
        assert not later, (name, marks, sorted(later))
        agent.ok("POST", "/vms/tree/resume")
    # The next checkpoint hangs under the one reverted to.
    run_job(agent, "POST", "/vms/tree/checkpoints", json={"name": "c4"})
    cps = {c["name"]: c for c in agent.ok("GET", "/vms/tree/checkpoints")}
    assert cps["c4"]["parent"] == cps["c1"]["id"]
    agent.ok("POST", "/vms/tree/stop", json={"force": True})
    # Every image the VM and its checkpoints use is consistent; the original is unchanged
    # since c1 froze it (raw, VHDX) and is still the bottom of the chain.
    folder = agent.storage / "tree.checkpoints"
    for img in [*sorted(folder.glob("*.qcow2")), Path(base)]:
        if img.suffix != ".raw":  # qemu-img check has nothing to check in raw
            r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, (img, r.stdout, r.stderr)
    assert Path(base).exists()
    if fmt != "qcow2":
        assert _sha256(base) == frozen
        chain = subprocess.run(
            ["qemu-img", "info", "--backing-chain", "--output=json",
             agent.ok("GET", "/vms/tree")["spec"]["disks"][0]["path"]],
            capture_output=True, text=True, check=True, timeout=60).stdout
        bottom = json.loads(chain)[-1]["filename"]
        # VHDX is streamed up into the overlay (QEMU saves no memory over VHDX); raw
        # stays the overlay's backing file.
        assert (Path(bottom).resolve() == Path(base).resolve()) == (fmt == "raw"), chain


def test_stopped_vm_checkpoint_is_disk_only(agent: Agent, tiny_guest) -> None:
    vm = make_vm(agent, tiny_guest, "cold", "raw")
    disk = vm["spec"]["disks"][0]["path"]
    job = run_job(agent, "POST", "/vms/cold/checkpoints", json={"name": "empty"})
    assert job["result"]["with_memory"] is False and job["result"]["method"] == "external"
    active = agent.ok("GET", "/vms/cold")["spec"]["disks"][0]["path"]
    assert active != disk  # the VM goes on in an overlay; the raw image is frozen
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", active], check=True,
                   capture_output=True, timeout=60)
    run_job(agent, "POST", "/vms/cold/checkpoints/empty/revert")
    vm = agent.ok("GET", "/vms/cold")
    assert vm["state"] == "defined"
    out = subprocess.run(["qemu-io", "-r", "-c", "read -P 0 0 64k",
                          vm["spec"]["disks"][0]["path"]], capture_output=True, text=True,
                         timeout=60)
    assert "Pattern verification failed" not in out.stdout and out.returncode == 0, out
    # Deleting the VM removes its frozen image and overlays with it.
    removed = agent.ok("DELETE", "/vms/cold")["removed_disks"]
    assert disk in removed and vm["spec"]["disks"][0]["path"] in removed
    assert list(agent.storage.iterdir()) == []


def test_agent_killed_during_checkpoint_job(agent: Agent, tiny_guest) -> None:
    vm = make_vm(agent, tiny_guest, "kill", "qcow2")
    disk = vm["spec"]["disks"][0]["path"]
    agent.ok("POST", "/vms/kill/start")
    wait_state(agent, "kill", counter=lambda v: int(v) >= 2)
    r = agent.client.post("/vms/kill/checkpoints", json={"name": "k"})
    assert r.status_code == 202
    agent.kill()  # mid-job
    agent.start()

    job = agent.ok("GET", f"/jobs/{r.json()['id']}")
    assert job["status"] in ("failed", "succeeded"), job
    cps = agent.ok("GET", "/vms/kill/checkpoints")
    assert all(c["status"] == "ready" for c in cps)
    assert [c["name"] for c in cps] == (["k"] if job["status"] == "succeeded" else [])
    vm = agent.ok("GET", "/vms/kill")
    assert vm["state"] == "running" and vm["pid"] in agent.qemu_pids()
    c = counter(agent, "kill")
    wait_state(agent, "kill", counter=lambda v: int(v) > c)  # the guest runs on
    agent.ok("POST", "/vms/kill/stop", json={"force": True})
    subprocess.run(["qemu-img", "check", disk], check=True, capture_output=True, timeout=60)
    tags = subprocess.run(["qemu-img", "snapshot", "-l", disk], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    if cps:  # the job finished: its snapshot is there
        assert cps[0]["id"] in tags
    else:  # undone after the restart: no half-made snapshot stays behind
        assert tags.strip() == ""


def test_agent_killed_during_revert(agent: Agent, tiny_guest) -> None:
    vm = make_vm(agent, tiny_guest, "rk", "qcow2")
    disk = vm["spec"]["disks"][0]["path"]
    agent.ok("POST", "/vms/rk/start")
    wait_state(agent, "rk", counter=lambda v: int(v) >= 2)
    run_job(agent, "POST", "/vms/rk/checkpoints", json={"name": "base"})
    agent.ok("PUT", "/vms/rk/vcpus", json={"vcpus": 2})  # layout differs: QEMU restarts
    r = agent.client.post("/vms/rk/checkpoints/base/revert")
    assert r.status_code == 202
    agent.kill()  # mid-job
    agent.start()

    job = agent.ok("GET", f"/jobs/{r.json()['id']}")
    assert job["status"] in ("failed", "succeeded"), job
    vm = agent.ok("GET", "/vms/rk")
    assert vm["spec"]["vcpus"] == 1  # the checkpoint's layout either way
    if job["status"] == "failed":  # off, disks at the checkpoint
        assert vm["state"] == "stopped" and "interrupted" in vm["last_error"]
        assert agent.qemu_pids() == []
    else:
        assert vm["state"] == "running" and vm["pid"] in agent.qemu_pids()
        agent.ok("POST", "/vms/rk/stop", json={"force": True})
    assert [c["status"] for c in agent.ok("GET", "/vms/rk/checkpoints")] == ["ready"]
    subprocess.run(["qemu-img", "check", disk], check=True, capture_output=True, timeout=60)
    # and the VM works from there
    assert agent.ok("POST", "/vms/rk/start")["state"] == "running"
    wait_state(agent, "rk", cpus=1)
