"""The agent's Redfish service against a real agent on HTTPS loopback and real tiny
guests: DMTF's own validator finds nothing wrong, a running VM is resized live through
PATCH (the guest sees it) with ETags honoured, logins and roles behave as Redfish clients
expect, and Reset drives the VM's power."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinyguest
from redfish_support import (
    ROOT,
    create_vm,
    https,
    login,
    message_id,
    wait_console,
    wait_power,
)
from secure_agent import REPO, SecureAgent

pytestmark = pytest.mark.integration

# DMTF's schema bundle (CSDL), kept in the repository: the validator cannot download
# schemas here.
SCHEMAS = REPO / "tests" / "fixtures" / "redfish" / "csdl"
VALIDATOR = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rf_service_validator"
VALIDATOR_TIMEOUT = 900


@pytest.fixture(scope="module")
def rf(tmp_path_factory: pytest.TempPathFactory,
       tiny_guest: tinyguest.TinyGuest) -> Iterator[dict[str, Any]]:
    a = SecureAgent(tmp_path_factory.mktemp("redfish"))
    a.start()
    admin = a.token("rf-admin", "Administrator")["token"]
    tiny = {"kernel": str(tiny_guest.kernel), "initrd": str(tiny_guest.initrd),
            "memory_mib": 256, "max_memory_mib": 768, "vcpus": 1, "max_vcpus": 2,
            "append": tiny_guest.append(memory_hotplug=True)}
    create_vm(a, name="run", disks=[{"size": "16M"}], nics=[{}], **tiny)
    create_vm(a, name="idle", **tiny)
    r = a.root_client.post("/vms/run/start")
    assert r.status_code == 200, r.text
    wait_console(a, "run", tinyguest.BOOT_MARKER)
    try:
        yield {"agent": a, "admin": admin}
    finally:
        a.root_client.post("/vms/run/stop", json={"force": True})
        a.stop()


def test_dmtf_validator_finds_no_error(rf: dict[str, Any], tmp_path: Path) -> None:
    assert SCHEMAS.is_dir(), f"DMTF's Redfish schemas are not at {SCHEMAS}"
    a: SecureAgent = rf["agent"]
    r = subprocess.run([str(VALIDATOR), "--rhost", a.url, "-u", "rf-admin", "-p", rf["admin"],
                        "--authtype", "Session", "--schema_directory", str(SCHEMAS),
                        "--skipschema", "--logdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=VALIDATOR_TIMEOUT, cwd=tmp_path)
    out = r.stdout + r.stderr
    # The summary table: | PASS | WARN | FAIL | NOT TESTED | then the counts.
    counts = re.search(r"\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", out)
    assert counts, out[-4000:]
    passed, warned, failed = (int(counts[i]) for i in (1, 2, 3))
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.rglob("*Debug*.log"))
    problems = [ln for ln in logs.splitlines() if " - WARNING - " in ln or " - ERROR - " in ln]
    assert r.returncode == 0 and failed == 0, out[-4000:] + "\n".join(problems)
    assert passed > 500, out[-2000:]  # it really walked the service
    missing = [ln for ln in problems if "mandatory" in ln or "Required" in ln]
    assert missing == [], "\n".join(missing)
    # What is left are deprecation notices (Manager.VirtualMedia, which Ironic still
    # uses, and Drives under Storage).
    assert all("eprecated" in ln for ln in problems), "\n".join(problems)
    assert warned == len(problems) or warned <= len(problems), out[-2000:]


def test_patch_resizes_a_running_vm_and_honours_etags(rf: dict[str, Any]) -> None:
    a: SecureAgent = rf["agent"]
    client, _ = login(a, "rf-admin", rf["admin"])
    with client:
        r = client.get(f"{ROOT}/Systems/run")
        assert r.status_code == 200 and r.json()["ProcessorSummary"]["Count"] == 1, r.text
        etag = r.headers["ETag"]
        assert r.json()["@odata.etag"] == etag
        before = len(wait_console(a, "run", "TINY cpus=1"))
        r = client.patch(f"{ROOT}/Systems/run", headers={"If-Match": etag}, json={
            "ProcessorSummary": {"Count": 2}, "MemorySummary": {"TotalSystemMemoryGiB": 0.5}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ProcessorSummary"]["Count"] == 2
        assert body["MemorySummary"]["TotalSystemMemoryGiB"] == 0.5
        # The guest's own view: a second vCPU online, more memory.
        out = wait_console(a, "run", "TINY cpus=2", after=before, timeout=120)
        mem = [int(s["memkb"]) for s in tinyguest.parse_states(out[before:])
               if s["cpus"] == "2"]
        first = [int(s["memkb"]) for s in tinyguest.parse_states(out[:before])][-1]
        deadline = time.monotonic() + 60
        while mem[-1] < first + 200 * 1024 and time.monotonic() < deadline:
            time.sleep(1)
            out = wait_console(a, "run", "TINY cpus=2", after=before)
            mem = [int(s["memkb"]) for s in tinyguest.parse_states(out[before:])]
        assert mem[-1] >= first + 200 * 1024, (first, mem[-5:])
        # The old ETag names a version that no longer is: 412, nothing changes.
        r = client.patch(f"{ROOT}/Systems/run", headers={"If-Match": etag},
                         json={"ProcessorSummary": {"Count": 1}})
        assert r.status_code == 412, r.text
        assert message_id(r) == "Base.1.22.PreconditionFailed"
        assert client.get(f"{ROOT}/Systems/run").json()["ProcessorSummary"]["Count"] == 2
        # A property that cannot be written: 400 naming it.
        r = client.patch(f"{ROOT}/Systems/run", json={"PowerState": "Off"})
        assert r.status_code == 400 and "PowerState" in r.text, r.text


def test_logins_roles_and_accounts(rf: dict[str, Any]) -> None:
    a: SecureAgent = rf["agent"]
    with https(a) as anon:
        r = anon.get(f"{ROOT}/Systems")
        assert r.status_code == 401, r.text
        assert message_id(r) == "Base.1.22.NoValidSession"
        assert "www-authenticate" in r.headers
        assert anon.get(f"{ROOT}").json()["@odata.type"] == "#ServiceRoot.v1_20_0.ServiceRoot"
        assert "edmx:Edmx" in anon.get(f"{ROOT}/$metadata").text
        r = anon.post(f"{ROOT}/SessionService/Sessions",
                      json={"UserName": "rf-admin", "Password": "hvt_00000000_wrong"})
        assert r.status_code == 401, r.text
        # A real token of another principal is no password of this one.
        r = anon.post(f"{ROOT}/SessionService/Sessions",
                      json={"UserName": "someone-else", "Password": rf["admin"]})
        assert r.status_code == 401, r.text
    reader = a.token("rf-reader", "Auditor")["token"]
    operator = a.token("rf-operator", "VMOperator")["token"]
    ro, _ = login(a, "rf-reader", reader)
    with ro:
        assert ro.get(f"{ROOT}/Systems/run").status_code == 200
        r = ro.post(f"{ROOT}/Systems/run/Actions/ComputerSystem.Reset",
                    json={"ResetType": "ForceRestart"})
        assert r.status_code == 403, r.text
        assert message_id(r) == "Base.1.22.InsufficientPrivilege"
    op, _ = login(a, "rf-operator", operator)
    with op:
        r = op.post(f"{ROOT}/AccountService/Accounts",
                    json={"UserName": "ops1", "RoleId": "ReadOnly"})
        assert r.status_code == 403, r.text
    admin, session = login(a, "rf-admin", rf["admin"])
    with admin:
        r = admin.post(f"{ROOT}/AccountService/Accounts",
                       json={"UserName": "ops1", "RoleId": "ReadOnly"})
        assert r.status_code == 201, r.text
        assert r.json()["RoleId"] == "ReadOnly"
        new_token = r.json()["Oem"]["Hvagent"]["Token"]
        assert admin.get(f"{ROOT}/AccountService/Accounts/ops1").json()["RoleId"] == "ReadOnly"
        # The new account logs in and reads, and may not reset.
        ops1, _ = login(a, "ops1", new_token)
        with ops1:
            assert ops1.get(f"{ROOT}/Systems").status_code == 200
            r = ops1.post(f"{ROOT}/Systems/run/Actions/ComputerSystem.Reset",
                          json={"ResetType": "ForceRestart"})
            assert r.status_code == 403, r.text
        # HTTP basic: the principal's name and its token.
        with https(a) as c:
            assert c.get(f"{ROOT}/Systems", auth=("ops1", new_token)).status_code == 200
            assert c.get(f"{ROOT}/Systems", auth=("ops1", "nope")).status_code == 401
        # Logging out ends the session at once.
        assert admin.delete(session).status_code == 204
        r = admin.get(f"{ROOT}/Systems")
        assert r.status_code == 401, r.text


def test_the_generated_rbac_matrix_covers_the_redfish_routes() -> None:
    from test_rbac_matrix import ROUTES

    redfish = {k for k in ROUTES if k[1].startswith("/redfish/")}
    for route in (("POST", "/redfish/v1/Systems/{system_id}/Actions/ComputerSystem.Reset"),
                  ("PATCH", "/redfish/v1/Systems/{system_id}"),
                  ("POST", "/redfish/v1/AccountService/Accounts"),
                  ("POST", "/redfish/v1/Managers/{manager_id}/VirtualMedia/{media_id}/Actions/"
                           "VirtualMedia.InsertMedia")):
        assert route in redfish, route
    assert len(redfish) >= 30


def test_reset_drives_the_vm_power(rf: dict[str, Any]) -> None:
    a: SecureAgent = rf["agent"]
    client, _ = login(a, "rf-admin", rf["admin"])
    reset = f"{ROOT}/Systems/idle/Actions/ComputerSystem.Reset"
    with client:
        assert client.get(f"{ROOT}/Systems/idle").json()["PowerState"] == "Off"
        r = client.post(reset, json={"ResetType": "Reboot"})
        assert r.status_code == 400, r.text
        assert message_id(r) == "Base.1.22.ActionParameterValueError"
        assert client.post(reset, json={"ResetType": "On"}).status_code == 204
        wait_power(client, "idle", "On")
        wait_console(a, "idle", tinyguest.BOOT_MARKER)
        assert client.post(reset, json={"ResetType": "Pause"}).status_code == 204
        assert client.get(f"{ROOT}/Systems/idle").json()["PowerState"] == "Paused"
        assert client.post(reset, json={"ResetType": "Resume"}).status_code == 204
        wait_power(client, "idle", "On")
        # Graceful: the guest powers off on the ACPI button, a task follows it.
        r = client.post(reset, json={"ResetType": "GracefulShutdown"})
        assert r.status_code == 202, r.text
        monitor = r.headers["Location"]
        assert monitor.startswith(f"{ROOT}/TaskService/TaskMonitors/")
        task = _wait_task(client, monitor)
        assert task["TaskState"] == "Completed", task
        assert client.get(f"{ROOT}/Systems/idle").json()["PowerState"] == "Off"
        assert client.get(f"{ROOT}/TaskService/Tasks/{task['Id']}").json()["TaskState"] == \
            "Completed"
        assert client.post(reset, json={"ResetType": "ForceOff"}).status_code == 204


def _wait_task(client: httpx.Client, monitor: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen_running = False
    while time.monotonic() < deadline:
        r = client.get(monitor)
        if r.status_code == 200:
            return r.json()  # type: ignore[no-any-return]
        assert r.status_code == 202, r.text
        seen_running = True
        time.sleep(0.3)
    raise AssertionError(f"task {monitor} still running after {timeout}s "
                         f"(seen running: {seen_running})")
