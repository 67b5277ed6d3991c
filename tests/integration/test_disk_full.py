"""A full storage directory: creating a disk that does not fit, and a live checkpoint
whose memory state does not fit, against a real agent whose storage directory is a small
tmpfs (real qemu-img, real QEMU). Either is refused naming the lack of space, and leaves
nothing half-made: no file, no row, and the VM runs on."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinyguest
from conftest import Agent
from test_checkpoints import wait_job
from test_hotplug import wait_state

pytestmark = pytest.mark.integration

FILLER = ".filler"


@pytest.fixture
def small_storage(agent: Agent) -> Iterator[Path]:
    """The agent's storage directory as a 96 MiB tmpfs."""
    agent.storage.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96M", "tmpfs", str(agent.storage)],
                   check=True, timeout=30)
    try:
        yield agent.storage
    finally:
        # Lazily: the agent fixture ends the VMs (which hold files here) after us.
        subprocess.run(["umount", "-l", str(agent.storage)], check=False, timeout=30)


def fill(storage: Path, leave: int) -> Path:
    """Fill the file system up to `leave` free bytes."""
    filler = storage / FILLER
    free = os.statvfs(storage).f_bavail * os.statvfs(storage).f_frsize
    with filler.open("ab") as f:
        f.write(b"\xff" * max(free - leave, 0))
    return filler


@pytest.mark.parametrize("fmt", ["vhdx", "qcow2"])
def test_disk_that_does_not_fit_is_refused_and_nothing_is_left(
        agent: Agent, small_storage: Path, fmt: str) -> None:
    fill(small_storage, 64 << 10)  # less than the format's own metadata
    r = agent.client.post("/vms", json={"name": "full", "memory_mib": 64,
                                        "disks": [{"size": "1G", "format": fmt}]})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    detail = r.json()["detail"]
    assert detail.startswith("disks[0]: no space left on device"), detail
    # nothing half-made: no image, no temporary file, no VM, no per-VM files
    assert sorted(p.name for p in small_storage.iterdir()) == [FILLER]
    assert agent.client.get("/vms/full").status_code == 404
    assert not (agent.root / "state" / "vms" / "full").exists()
    # with space again, the same request works
    (small_storage / FILLER).unlink()
    vm = agent.ok("POST", "/vms", json={"name": "full", "memory_mib": 64,
                                         "disks": [{"size": "1G", "format": fmt}]})
    assert Path(vm["spec"]["disks"][0]["path"]).exists()


def test_checkpoint_whose_memory_does_not_fit_fails_and_the_vm_runs_on(
        agent: Agent, small_storage: Path, tiny_guest) -> None:
    # raw: the checkpoint is external, the memory goes to a file beside the overlays
    vm = agent.create_tiny("tight", tiny_guest, disks=[{"size": "8M", "format": "raw"}])
    base = vm["spec"]["disks"][0]["path"]
    agent.ok("POST", "/vms/tight/start")
    wait_state(agent, "tight", counter=lambda v: int(v) >= 2)
    filler = fill(small_storage, 1 << 20)  # room for an overlay, not for the memory

    r = agent.client.post("/vms/tight/checkpoints", json={"name": "nope"})
    assert r.status_code == 202, r.text
    job = wait_job(agent, r.json())
    assert job["status"] == "failed", job
    assert "no space left on device" in job["error"], job["error"]
    # nothing half-made: no checkpoint, no memory file, only files the disk uses
    assert agent.ok("GET", "/vms/tight/checkpoints") == []
    vm = agent.ok("GET", "/vms/tight")
    active = vm["spec"]["disks"][0]["path"]
    chain = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                            active], capture_output=True, text=True, check=True, timeout=60)
    used = {str(Path(i["filename"]).resolve()) for i in json.loads(chain.stdout)}
    assert str(Path(base).resolve()) in used
    left = {str(p.resolve()) for p in small_storage.rglob("*") if p.is_file()}
    assert left - used == {str(filler.resolve())}, (left, used)
    # the VM runs on (not paused by the checkpoint that failed)
    assert vm["state"] == "running" and vm["pid"] in agent.qemu_pids()
    c = int(tinyguest.parse_states(agent.console("tight"))[-1]["counter"])
    wait_state(agent, "tight", counter=lambda v: int(v) > c + 1)
    assert agent.ok("GET", "/vms/tight")["state"] == "running"
    # with space again, a checkpoint works
    filler.unlink()
    r = agent.client.post("/vms/tight/checkpoints", json={"name": "fits"})
    job = wait_job(agent, r.json())
    assert job["status"] == "succeeded", job["error"]
    assert [c["name"] for c in agent.ok("GET", "/vms/tight/checkpoints")] == ["fits"]
