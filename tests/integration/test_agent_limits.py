"""Requests for what no QEMU or no host can give, and hostile bytes in every kind of
parameter, answer 4xx problem+json naming the limit or the field, and leave nothing
behind; VM names: the longest allowed one really starts, refused ones get one 422 that
states the rule."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinyguest
from conftest import Agent

from hvagent.services.limits import host_cpus, host_memory_mib
from hvagent.spec import MAX_MEMORY_MIB, NAME_RULE

pytestmark = pytest.mark.integration

HOST_MIB = host_memory_mib()
CPUS = host_cpus()
PROBLEM = "application/problem+json"


def _problem(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    detail = str(r.json()["detail"])
    for w in words:
        assert w in detail, detail
    return detail


def _leftovers(agent: Agent) -> list[str]:
    return sorted(str(p.relative_to(agent.root)) for p in agent.root.rglob("*")
                  if p.is_file() and not p.name.startswith(("hvagent.db", "agent.log")))


TOO_BIG = {
    # QEMU's own maxima: schema constraints, stated in the OpenAPI document
    "memory 10^23": ({"memory_mib": 10**23}, 422, "memory_mib", str(MAX_MEMORY_MIB)),
    "max memory 10^23": ({"max_memory_mib": 10**23}, 422, "max_memory_mib"),
    "vcpus 2^64": ({"vcpus": 2**64}, 422, "vcpus", "255"),
    "memory slots": ({"memory_slots": 300}, 422, "memory_slots", "256"),
    # the host's memory and CPUs
    "memory above the host": ({"memory_mib": HOST_MIB + 1024}, 400, "memory_mib",
                              f"above this host's memory ({HOST_MIB} MiB"),
    "max memory above the host": ({"memory_mib": 256, "max_memory_mib": HOST_MIB + 128}, 400,
                                  "max_memory_mib", "above this host's memory"),
    "vcpus above the host": ({"vcpus": CPUS + 1}, 400, "vcpus",
                             f"above this host's {CPUS} logical CPUs"),
    "max vcpus above the host": ({"max_vcpus": CPUS + 1}, 400, "max_vcpus"),
    # disks: per-format maxima
    "disk 99999T": ({"disks": [{"size": "99999T"}]}, 422, "disks[0].size"),
    "vhd above 2040 GiB": ({"disks": [{"size": "2041G", "format": "vhd"}]}, 422,
                           "above the largest vpc disk"),
    "vhdx above 64 TiB": ({"disks": [{"size": "65T", "format": "vhdx"}]}, 422,
                          "above the largest vhdx disk"),
    "disk 2^64 bytes": ({"disks": [{"size": 2**64}]}, 422, "disks[0].size"),
    # hostile bytes in host paths (were 500 "embedded null byte")
    "NUL in a disk path": ({"disks": [{"path": "a\0b.qcow2"}]}, 422, "disks[0].path",
                           "control character"),
    "NUL in the kernel": ({"kernel": "/boot/vm\0linuz"}, 422, "kernel"),
    "NUL in the initrd": ({"kernel": "/k", "initrd": "/i\0"}, 422, "initrd"),
    "newline in append": ({"kernel": "/k", "append": "quiet\nx"}, 422, "append"),
    "empty disk path": ({"disks": [{"path": ""}]}, 422, "disks[0].path"),
    "long path component": ({"disks": [{"path": "x" * 300}]}, 422, "255 bytes"),
    "path too long": ({"kernel": "/a" * 2000}, 422, "kernel"),
    "lone surrogate path": ({"kernel": "/k\ud800"}, 422, "kernel"),
}


@pytest.mark.parametrize("case", TOO_BIG.values(), ids=TOO_BIG.keys())
def test_impossible_spec_is_refused_naming_the_limit(agent: Agent, case: tuple[Any, ...]) -> None:
    extra, status, *words = case
    before = _leftovers(agent)
    # json.dumps escapes non-ASCII, so a lone surrogate travels as the JSON escape \\ud800
    r = agent.client.post("/vms", content=json.dumps({"name": "big", "memory_mib": 128,
                                                      **extra}),
                          headers={"content-type": "application/json"})
    _problem(r, status, *words)
    assert agent.ok("GET", "/vms") == [] and _leftovers(agent) == before
    assert agent.qemu_pids() == []


def test_host_limits_hold_at_hot_add_start_and_import(agent: Agent) -> None:
    agent.ok("POST", "/vms", json={"name": "grow", "memory_mib": 128, "max_memory_mib": 256})
    _problem(agent.client.put("/vms/grow/memory", json={"memory_mib": 10**23}), 422,
             "memory_mib")
    _problem(agent.client.put("/vms/grow/vcpus", json={"vcpus": 2**64}), 422, "vcpus")
    # A VM defined before the limits (written straight to the store) cannot start.
    db = sqlite3.connect(agent.root / "state" / "hvagent.db")
    spec = json.loads(db.execute("SELECT spec FROM vms WHERE name='grow'").fetchone()[0])
    spec |= {"memory_mib": HOST_MIB + 512, "max_memory_mib": HOST_MIB + 512}
    with db:
        db.execute("UPDATE vms SET spec=? WHERE name='grow'", (json.dumps(spec),))
    db.close()
    _problem(agent.client.post("/vms/grow/start"), 400, "above this host's memory")
    assert agent.qemu_pids() == []
    _problem(agent.client.put("/vms/grow/memory", json={"memory_mib": HOST_MIB + 256}), 400,
             "above this host's memory")
    # import goes through the same checks (the image is never reached)
    agent.storage.mkdir(parents=True, exist_ok=True)
    (agent.storage / "p2v.raw").write_bytes(b"\0" * (1 << 20))
    _problem(agent.client.post("/vms/import", json={"name": "imp", "image": "p2v.raw",
                                                    "memory_mib": 10**23}), 422, "memory_mib")
    _problem(agent.client.post("/vms/import", json={"name": "imp", "image": "p2v\0.raw"}),
             422, "image", "control character")


def test_hostile_query_and_path_parameters(agent: Agent) -> None:
    agent.ok("POST", "/vms", json={"name": "q", "memory_mib": 64})
    for method, path, kw, status, word in (
            ("GET", "/vms/a%00b", {}, 422, "name"),
            ("GET", "/vms/vm%C3%A9", {}, 422, NAME_RULE),
            ("GET", "/vms/" + "a" * 64, {}, 422, NAME_RULE),
            ("GET", "/vms/q/console", {"params": {"lines": 2**64}}, 422, "lines"),
            ("GET", "/vms/q/console", {"params": {"lines": -1}}, 422, "lines"),
            ("DELETE", "/vms/q/disks", {"params": {"path": "a\0b"}}, 422, "path"),
            ("DELETE", "/vms/q/nics/zz%00", {}, 422, "mac"),
            ("PUT", "/vms/q/nics/52:54:00:00:00:01%0a", {"json": {"vlan": 2}}, 422, "mac"),
            ("GET", "/jobs/%00", {}, 422, "job_id"),
            ("GET", "/jobs", {"params": {"target": "a\0"}}, 422, "target"),
            ("GET", "/vms/q/checkpoints/%00", {}, 422, "checkpoint"),
            ("GET", "/vms/q/disks/18446744073709551616/partitions", {}, 404, "no disk"),
            ("GET", "/vms/q/disks/-1/partitions", {}, 404, "no disk"),
            ("GET", "/audit", {"params": {"limit": 2**64}}, 422, "limit")):
        _problem(agent.client.request(method, path, **kw), status, word)


def test_wrong_method_is_405_with_allow(agent: Agent) -> None:
    r = agent.client.request("PATCH", "/vms/x")
    assert r.status_code == 405 and r.headers["content-type"] == PROBLEM
    assert set(r.headers["allow"].split(", ")) >= {"GET", "DELETE"}
    r = agent.client.put("/vms")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "POST"}


def test_openapi_states_the_constraints_and_the_errors(agent: Agent) -> None:
    doc = agent.client.get("http://hvagent/openapi.json").json()
    spec = doc["components"]["schemas"]["VMSpec"]["properties"]
    assert spec["name"]["maxLength"] == 63 and spec["name"]["pattern"].startswith("^[A-Za-z0-9]")
    assert spec["memory_mib"]["maximum"] == MAX_MEMORY_MIB
    disk = doc["components"]["schemas"]["DiskSpec"]["properties"]
    assert any("pattern" in alt for alt in disk["path"]["anyOf"])
    create = doc["paths"]["/api/v1/vms"]["post"]["responses"]
    assert {"201", "400", "409", "422", "500"} <= set(create)
    show = doc["paths"]["/api/v1/vms/{name}"]["get"]["responses"]
    assert {"200", "400", "404", "422"} <= set(show)
    assert show["404"]["content"][PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}


# names

@pytest.fixture
def short_agent() -> Iterator[Agent]:
    """An agent whose run_dir is short, as /run/hvagent is on a host (a pytest tmp_path
    is too long for the QMP socket of a 63-character name)."""
    root = Path(tempfile.mkdtemp(prefix="hv", dir="/tmp"))
    a = Agent(root)
    a.start()
    try:
        yield a
    finally:
        for name in [vm["name"] for vm in a.ok("GET", "/vms")]:
            a.client.post(f"/vms/{name}/stop", json={"force": True})
        a.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("name", ["vmé", "虚拟机", "a" * 64, "-x", ".hidden", "a/b", "a b"])
def test_refused_names_get_one_422_stating_the_rule(agent: Agent, name: str) -> None:
    r = agent.client.post("/vms", json={"name": name, "memory_mib": 64})
    detail = _problem(r, 422, "name:", NAME_RULE)
    assert detail.startswith("name: ") and detail.count(NAME_RULE) == 1  # one error
    assert agent.ok("GET", "/vms") == []


def test_longest_name_starts_a_vm(short_agent: Agent, tiny_guest: tinyguest.TinyGuest) -> None:
    name = "L" + "o" * 61 + "g"
    assert len(name) == 63
    short_agent.create_tiny(name, tiny_guest, disks=[{"size": "8M"}])
    vm = short_agent.ok("POST", f"/vms/{name}/start")
    assert vm["state"] == "running" and vm["pid"]
    short_agent.wait_console(name, tinyguest.BOOT_MARKER)
    qmp = short_agent.run_dir / f"{name}.qmp"
    assert qmp.is_socket() and len(bytes(qmp)) < 108
    assert short_agent.ok("POST", f"/vms/{name}/stop", json={"force": True})["state"] == "stopped"
    short_agent.ok("DELETE", f"/vms/{name}")


def test_name_too_long_for_the_run_dir_is_refused_at_create(agent: Agent) -> None:
    # tmp_path run dirs are long: a 63-character name does not fit sun_path there.
    name = "n" * 63
    if len(bytes(agent.run_dir / f"{name}.qmp")) < 108:
        pytest.fail(f"run_dir {agent.run_dir} is too short for this test")
    r = agent.client.post("/vms", json={"name": name, "memory_mib": 64})
    _problem(r, 400, "name:", "unix socket path holds at most 108")
    assert agent.ok("GET", "/vms") == []
