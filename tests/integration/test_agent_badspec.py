"""Bad VM specs answer 4xx with a message naming the field, and leave nothing behind:
no VM row, no disk or per-VM file, no QEMU process."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Agent

pytestmark = pytest.mark.integration


def _snapshot(agent: Agent) -> dict[str, Any]:
    files = sorted(str(p.relative_to(agent.root)) for p in agent.root.rglob("*")
                   if p.is_file() and not p.name.startswith(("hvagent.db", "agent.log")))
    return {"vms": agent.ok("GET", "/vms"), "files": files, "qemu": agent.qemu_pids()}


BAD = {
    "memory above max": ({"memory_mib": 512, "max_memory_mib": 256}, 422,
                         "memory_mib (512) is above max_memory_mib (256)"),
    "vcpus above max": ({"vcpus": 4, "max_vcpus": 2}, 422, "vcpus (4) is above max_vcpus"),
    "unknown disk format": ({"disks": [{"size": "16M", "format": "vmdk"}]}, 422,
                            "disks[0].format:"),
    # outside the storage directory and missing: one answer (hvagent.services.files)
    "path outside storage": ({"disks": [{"path": "/etc/passwd"}]}, 403,
                             "disks[0].path: /etc/passwd: not an allowed file"),
    "dotdot outside storage": ({"disks": [{"path": "../hvagent.yaml"}]}, 403,
                               "disks[0].path: ../hvagent.yaml: not an allowed file"),
    "missing disk file": ({"disks": [{"path": "nothere.qcow2"}]}, 403,
                          "disks[0].path: nothere.qcow2: not an allowed file"),
    # the first (new) disk is created before the second fails: it must be removed again
    "new disk then missing file": ({"disks": [{"size": "16M"}, {"path": "nothere.raw"}]},
                                   403, "disks[1].path: nothere.raw: not an allowed file"),
    "missing kernel": ({"kernel": "/nonexistent/vmlinuz"}, 403,
                       "kernel: /nonexistent/vmlinuz: not an allowed file"),
    "unknown field": ({"memroy_mib": 10}, 422, "memroy_mib: unknown field"),
    "bad name": ({"name": "../x"}, 422, "name:"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_spec_is_refused_and_leaves_nothing(agent: Agent,
                                                case: tuple[dict[str, Any], int, str]) -> None:
    extra, status, message = case
    before = _snapshot(agent)
    r = agent.client.post("/vms", json={"name": "bad", "memory_mib": 128, **extra})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert message in r.json()["detail"]
    assert _snapshot(agent) == before


def test_duplicate_name_is_409_and_keeps_the_first(agent: Agent) -> None:
    first = agent.ok("POST", "/vms", json={"name": "dup", "memory_mib": 64,
                                           "disks": [{"size": "8M"}]})
    before = _snapshot(agent)
    r = agent.client.post("/vms", json={"name": "dup", "memory_mib": 128,
                                        "disks": [{"size": "8M", "format": "raw"}]})
    assert r.status_code == 409
    assert "dup: a VM with this name already exists" in r.json()["detail"]
    assert _snapshot(agent) == before
    assert agent.ok("GET", "/vms/dup")["spec"] == first["spec"]


def test_disk_format_must_match_the_file(agent: Agent) -> None:
    agent.storage.mkdir(parents=True, exist_ok=True)
    img = agent.storage / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True,
                   timeout=60)
    r = agent.client.post("/vms", json={"name": "fmt", "disks": [
        {"path": str(img), "format": "raw"}]})
    assert r.status_code == 400
    assert "disks[0].format:" in r.json()["detail"] and "is qcow2, not raw" in r.json()["detail"]
    # without a format the detected one is recorded; VHD images are accepted as well
    vhd = agent.storage / "data.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", str(vhd), "16M"], check=True,
                   timeout=60)
    vm = agent.ok("POST", "/vms", json={"name": "fmt", "disks": [
        {"path": "data.qcow2"}, {"path": str(vhd), "format": "vhd"}]})
    assert [(Path(d["path"]).name, d["format"]) for d in vm["spec"]["disks"]] == [
        ("data.qcow2", "qcow2"), ("data.vhd", "vpc")]
    # disks the VM did not create survive its deletion
    assert agent.ok("DELETE", "/vms/fmt")["removed_disks"] == []
    assert img.exists() and vhd.exists()


def test_start_failure_leaves_no_process(agent: Agent) -> None:
    agent.storage.mkdir(parents=True, exist_ok=True)
    img = agent.storage / "vanish.raw"
    img.write_bytes(b"\0" * 65536)
    agent.ok("POST", "/vms", json={"name": "vanish", "disks": [{"path": str(img)}]})
    img.unlink()
    r = agent.client.post("/vms/vanish/start")
    assert r.status_code == 500
    assert "QEMU refused to start" in r.json()["detail"] and "vanish.raw" in r.json()["detail"]
    assert agent.qemu_pids() == []
    assert agent.ok("GET", "/vms/vanish")["state"] == "defined"


def test_unknown_vm_is_404(agent: Agent) -> None:
    for method, path in (("GET", "/vms/nope"), ("POST", "/vms/nope/start"),
                         ("DELETE", "/vms/nope"), ("GET", "/vms/nope/console")):
        r = agent.client.request(method, path)
        assert r.status_code == 404, path
        assert r.json()["detail"] == "nope: no such VM"
