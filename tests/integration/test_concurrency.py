"""Operations that meet on one VM, against a real agent with real QEMU: truly concurrent
requests (threads released at once), a checkpoint job against power operations and
hot-add, and an offline disk edit against start. One operation wins; the others answer
409 at once (never queued, never a 5xx), and the VM ends in a state that matches its
QEMU processes."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import disk_images as di
import httpx
import pytest
from conftest import Agent
from test_checkpoints import wait_job

pytestmark = pytest.mark.integration


def fire(agent: Agent, requests: list[tuple[str, str, dict[str, Any] | None]]
         ) -> list[httpx.Response]:
    """Send every request from its own thread and connection, released together."""
    barrier = threading.Barrier(len(requests))
    out: list[httpx.Response | None] = [None] * len(requests)

    def one(i: int, method: str, path: str, body: dict[str, Any] | None) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)),
                          base_url="http://hvagent/api/v1", timeout=120) as c:
            barrier.wait(timeout=30)
            out[i] = c.request(method, path, json=body)

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert all(r is not None for r in out), "a request did not come back"
    return [r for r in out if r is not None]


def assert_consistent(agent: Agent, name: str) -> dict[str, Any]:
    vm = agent.ok("GET", f"/vms/{name}")
    pids = agent.qemu_pids()
    if vm["state"] in ("running", "paused"):
        assert pids == [vm["pid"]], (vm, pids)
    else:
        assert pids == [] and vm["pid"] is None, (vm, pids)
    assert vm["operation"] is None, vm
    return vm  # type: ignore[no-any-return]


def test_simultaneous_starts_one_wins_the_others_are_409(agent: Agent) -> None:
    # No OS: the firmware alone is enough for power operations.
    agent.ok("POST", "/vms", json={"name": "race", "memory_mib": 64})
    answers = fire(agent, [("POST", "/vms/race/start", None)] * 6)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 409, 409, 409, 409, 409], [(r.status_code, r.text) for r in answers]
    for r in answers:
        if r.status_code == 409:  # the start in progress, or the VM it left running
            detail = r.json()["detail"]
            assert "'start' is in progress" in detail or "already running" in detail, detail
    assert assert_consistent(agent, "race")["state"] == "running"

    # Every power operation at once: no 5xx, each either done or refused with 409 (the
    # lock another one holds, or the state it left: several can lose that way); 404 only
    # for a request that came after the delete, which then succeeded.
    ops = [("POST", "/vms/race/pause", None), ("POST", "/vms/race/resume", None),
           ("POST", "/vms/race/reset", None), ("POST", "/vms/race/stop", {"force": True}),
           ("POST", "/vms/race/start", None), ("DELETE", "/vms/race", None)]
    for _ in range(3):
        answers = fire(agent, ops)
        deleted = answers[-1].status_code == 200
        allowed = (200, 409, 404) if deleted else (200, 409)
        assert all(r.status_code in allowed for r in answers), \
            [(r.request.url.path, r.status_code, r.text) for r in answers]
        for r in answers[:-1]:
            if r.status_code == 404:
                assert "no such VM" in r.json()["detail"], r.text
        if agent.client.get("/vms/race").status_code == 404:
            assert agent.qemu_pids() == []
            break
        assert_consistent(agent, "race")
    else:
        agent.client.post("/vms/race/stop", json={"force": True})  # 409 if stopped
        agent.ok("DELETE", "/vms/race")
        assert agent.qemu_pids() == []


def _long_checkpoint_vm(agent: Agent) -> None:
    """A running VM whose checkpoint takes a while: its VHDX disk holds 256 MiB of data,
    which the checkpoint copies up into the new overlay before saving the memory."""
    disk = agent.storage / "busy.vhdx"
    agent.storage.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", str(disk), "256M"],
                   check=True, timeout=60)
    subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 0 256M", str(disk)],
                   check=True, capture_output=True, timeout=300)
    agent.ok("POST", "/vms", json={"name": "busy", "memory_mib": 128, "max_memory_mib": 512,
                                   "vcpus": 1, "max_vcpus": 2,
                                   "disks": [{"path": str(disk)}]})
    agent.ok("POST", "/vms/busy/start")


def test_checkpoint_job_holds_off_power_operations_and_hot_add(agent: Agent) -> None:
    _long_checkpoint_vm(agent)
    r = agent.client.post("/vms/busy/checkpoints", json={"name": "cp"})
    assert r.status_code == 202, r.text
    job = r.json()
    ops = [("POST", "/vms/busy/pause", None), ("POST", "/vms/busy/stop", {"force": True}),
           ("POST", "/vms/busy/reset", None), ("POST", "/vms/busy/start", None),
           ("PUT", "/vms/busy/vcpus", {"vcpus": 2}),
           ("PUT", "/vms/busy/memory", {"memory_mib": 256}),
           ("POST", "/vms/busy/checkpoints", {"name": "second"}),
           ("DELETE", "/vms/busy", None)]
    refused = 0
    for method, path, body in ops:
        r = agent.client.request(method, path, json=body)
        if r.status_code == 409:
            assert r.json()["operation"] == "checkpoint", r.text
            assert "'checkpoint' is in progress" in r.json()["detail"], r.text
            refused += 1
        else:
            # Only once the job is over (the job is finished before its lock goes).
            assert r.status_code < 500, r.text
            assert agent.ok("GET", f"/jobs/{job['id']}")["status"] != "running", (path, r.text)
            break
    assert refused >= 3, "the checkpoint was over before the test could race it"
    done = wait_job(agent, job)
    assert done["status"] == "succeeded", done["error"]
    vm = assert_consistent(agent, "busy")
    assert vm["state"] == "running" and vm["spec"]["vcpus"] == 1
    assert [c["name"] for c in agent.ok("GET", "/vms/busy/checkpoints")] == ["cp"]
    # and now the same operations go through
    agent.ok("PUT", "/vms/busy/vcpus", json={"vcpus": 2})
    agent.ok("POST", "/vms/busy/stop", json={"force": True})


def test_disk_edit_and_start_exclude_each_other(agent: Agent, tmp_path: Path) -> None:
    raw = di.make_raw(tmp_path / "raw", "gpt")
    disk = di.convert(raw, "qcow2", agent.storage / "edit.qcow2")
    agent.ok("POST", "/vms", json={"name": "ed", "memory_mib": 64,
                                   "disks": [{"path": str(disk)}]})
    files = "/vms/ed/disks/0/files"
    content = b"x" * (8 << 20)  # big enough that the edit takes a moment
    result: dict[str, httpx.Response] = {}

    def edit() -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)),
                          base_url="http://hvagent/api/v1", timeout=120) as c:
            result["edit"] = c.put(files, params={"path": "/big.bin"}, content=content)

    editor = threading.Thread(target=edit)
    editor.start()
    deadline = time.monotonic() + 60
    while agent.ok("GET", "/vms/ed")["operation"] != "disk-write":
        assert time.monotonic() < deadline and editor.is_alive(), result
        time.sleep(0.01)
    r = agent.client.post("/vms/ed/start")  # while the disk is being written
    assert r.status_code == 409, r.text
    assert r.json()["operation"] == "disk-write", r.text
    editor.join(timeout=120)
    assert result["edit"].status_code == 200, result["edit"].text
    assert assert_consistent(agent, "ed")["state"] == "defined"

    # The other way round: a running VM's disk is not edited offline.
    assert agent.ok("POST", "/vms/ed/start")["state"] == "running"
    r = agent.client.put(files, params={"path": "/late.txt"}, content=b"late")
    assert r.status_code == 409 and "stop it before" in r.json()["detail"], r.text
    agent.ok("POST", "/vms/ed/stop", json={"force": True})
    # the edit is whole, the refused one left nothing
    r = agent.client.get(files, params={"path": "/big.bin"})
    assert r.status_code == 200 and r.content == content
    r = agent.client.get(files, params={"path": "/late.txt"})
    assert r.status_code == 400 and "late.txt" in r.json()["detail"], r.text
