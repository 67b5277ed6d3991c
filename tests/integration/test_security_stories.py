"""The role stories of the issue, host policy refusals, the audit log, token revocation
and the unix socket's peer rule, against a real agent (HTTPS on 127.0.0.1 + unix
socket, real SQLite, real QEMU for the power operations)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from secure_agent import HVAGENT, REPO, SecureAgent

pytestmark = pytest.mark.integration

POLICY = {
    "quotas": {"max_vcpus_per_vm": 2, "max_vms_per_principal": 2},
    "disk_formats": ["qcow2", "raw"],
    "nested_virtualization": False,
    # Reads every job, nothing else: Sys.Audit on /jobs.
    "roles": {"JobWatcher": {"privileges": ["Sys.Audit"]}},
}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureAgent]:
    a = SecureAgent(tmp_path_factory.mktemp("stories"), POLICY)
    a.start()
    try:
        yield a
    finally:
        for vm in a.root_client.get("/vms").json():
            if vm["state"] in ("running", "paused"):
                a.root_client.post(f"/vms/{vm['name']}/stop", json={"force": True})
        a.stop()


@pytest.fixture(scope="module")
def tokens(agent: SecureAgent) -> dict[str, str]:
    return {
        "creator": agent.token("carol", "VMCreator")["token"],
        "creator2": agent.token("dave", "VMCreator")["token"],
        "operator": agent.token("oscar", "VMOperator", path="/vms")["token"],
        "auditor": agent.token("audrey", "Auditor")["token"],
        "watcher": agent.token("walt", "JobWatcher", path="/jobs")["token"],
    }


@pytest.fixture(autouse=True)
def no_vms_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts on an agent without VMs and makes what it needs, so that tests
    do not depend on each other's order (the agent itself is shared by the module)."""
    yield
    if "agent" not in request.fixturenames:
        return
    a: SecureAgent = request.getfixturevalue("agent")
    for vm in a.root_client.get("/vms").json():
        if vm["state"] in ("running", "paused"):
            a.root_client.post(f"/vms/{vm['name']}/stop", json={"force": True})
        r = a.root_client.delete(f"/vms/{vm['name']}")
        assert r.status_code == 200, r.text


def _vm(name: str, **kw: Any) -> dict[str, Any]:
    # No disk, no kernel: QEMU runs the firmware only, enough for power operations.
    return {"name": name, "vcpus": 1, "memory_mib": 64, **kw}


def test_vmcreator_manages_its_own_vm_but_not_anothers(agent: SecureAgent,
                                                       tokens: dict[str, str]) -> None:
    assert agent.root_client.post("/vms", json=_vm("st-root")).status_code == 201
    with agent.client(tokens["creator"]) as carol:
        r = carol.post("/vms", json=_vm("st-carol"))
        assert r.status_code == 201, r.text
        assert carol.get("/vms/st-carol").json()["state"] == "defined"
        r = carol.post("/vms/st-carol/start")
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        assert carol.get("/vms/st-carol/console").status_code == 200
        r = carol.post("/vms/st-carol/stop", json={"force": True})
        assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
        for method, path in (("GET", "/vms/st-root"), ("POST", "/vms/st-root/start"),
                             ("GET", "/vms/st-root/console"), ("DELETE", "/vms/st-root")):
            r = carol.request(method, path)
            assert r.status_code == 403, (method, path, r.text)
            assert "carol lacks" in r.json()["detail"]
    with agent.client(tokens["creator2"]) as dave:  # another creator: not dave's VM
        assert dave.post("/vms/st-carol/start").status_code == 403
        assert dave.delete("/vms/st-carol").status_code == 403
    with agent.client(tokens["creator"]) as carol:
        assert carol.delete("/vms/st-carol").status_code == 200
    assert agent.root_client.get("/vms/st-carol").status_code == 404


def test_vmoperator_powers_existing_vms_but_cannot_create_or_delete(
        agent: SecureAgent, tokens: dict[str, str]) -> None:
    assert agent.root_client.post("/vms", json=_vm("st-op")).status_code == 201
    with agent.client(tokens["operator"]) as oscar:
        r = oscar.post("/vms/st-op/start")
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        assert oscar.post("/vms/st-op/pause").json()["state"] == "paused"
        assert oscar.post("/vms/st-op/resume").json()["state"] == "running"
        r = oscar.post("/vms/st-op/stop", json={"force": True})
        assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
        r = oscar.post("/vms", json=_vm("st-op2"))
        assert r.status_code == 403 and "VM.Allocate" in r.json()["detail"]
        assert oscar.delete("/vms/st-op").status_code == 403
    assert agent.root_client.get("/vms/st-op2").status_code == 404
    assert agent.root_client.get("/vms/st-op").status_code == 200
    # nested virtualization is off in this host's policy: the guest CPU lacks svm/vmx
    assert "qemu64,-svm,-vmx" in agent.log


def test_auditor_reads_only(agent: SecureAgent, tokens: dict[str, str]) -> None:
    agent.root_client.post("/vms", json=_vm("st-aud"))
    with agent.client(tokens["auditor"]) as audrey:
        assert audrey.get("/vms").status_code == 200
        assert audrey.get("/vms/st-aud").status_code == 200
        assert audrey.get("/agent").status_code == 200
        assert audrey.get("/audit").status_code == 200
        for method, path in (("POST", "/vms/st-aud/start"), ("DELETE", "/vms/st-aud"),
                             ("GET", "/vms/st-aud/console"), ("POST", "/vms")):
            assert audrey.request(method, path, json=_vm("x")).status_code == 403


UNKNOWN_JOB = "0123456789abcdef" * 2  # well-formed (32 hex digits), never issued


def _finished_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Poll a job as a client does until it leaves `running`."""
    deadline = time.monotonic() + 120
    while True:
        r = client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] != "running" or time.monotonic() > deadline:
            return r.json()  # type: ignore[no-any-return]
        time.sleep(0.2)


def test_jobs_and_vm_lists_follow_the_vm_they_concern(agent: SecureAgent,
                                                      tokens: dict[str, str]) -> None:
    disk = [{"size": "64M"}]  # a stopped VM's checkpoint is a job on its qcow2 disk
    r = agent.root_client.post("/vms", json=_vm("st-jobs-root", disks=disk))
    assert r.status_code == 201, r.text
    r = agent.root_client.post("/vms/st-jobs-root/checkpoints", json={})
    assert r.status_code == 202, r.text
    root_job = _finished_job(agent.root_client, r.json()["id"])
    with agent.client(tokens["creator"]) as carol:
        assert carol.post("/vms", json=_vm("st-jobs", disks=disk)).status_code == 201
        r = carol.post("/vms/st-jobs/checkpoints", json={"name": "before"})
        assert r.status_code == 202, r.text
        job = _finished_job(carol, r.json()["id"])  # carol polls the job of her own VM
        assert job["target"] == "st-jobs" and job["kind"] == "checkpoint-create"
        assert job["status"] == "succeeded", job
        listed = {j["id"]: j["target"] for j in carol.get("/jobs").json()}
        assert job["id"] in listed and root_job["id"] not in listed
        carols = {vm["name"] for vm in carol.get("/vms").json()}
        assert set(listed.values()) <= carols
        assert "st-jobs" in carols and not carols & {"st-jobs-root", "st-root", "st-d1"}
        r = carol.get(f"/jobs/{root_job['id']}")
        assert r.status_code == 403 and "carol lacks VM.Audit" in r.json()["detail"]
    with agent.client(tokens["creator2"]) as dave:  # another creator
        r = dave.get(f"/jobs/{job['id']}")
        assert r.status_code == 403, r.text
        # The denial does not name the VM the job concerns, and an unknown job id
        # gets the same answer: dave learns nothing about carol's work.
        assert r.json()["detail"] == (f"dave lacks VM.Audit on /vms/<target of job "
                                      f"{job['id']}>")
        assert dave.get(f"/jobs/{UNKNOWN_JOB}").status_code == 403
        assert job["id"] not in {j["id"] for j in dave.get("/jobs").json()}
        assert "st-jobs" not in {vm["name"] for vm in dave.get("/vms").json()}
        assert dave.get("/jobs", params={"target": "st-jobs"}).json() == []
    everything = {vm["name"] for vm in agent.root_client.get("/vms").json()}
    all_jobs = {j["id"] for j in agent.root_client.get("/jobs").json()}
    assert {job["id"], root_job["id"]} <= all_jobs
    with agent.client(tokens["auditor"]) as audrey:  # VM.Audit and Sys.Audit on /
        assert {vm["name"] for vm in audrey.get("/vms").json()} == everything
        assert {j["id"] for j in audrey.get("/jobs").json()} == all_jobs
        assert audrey.get(f"/jobs/{job['id']}").json()["target"] == "st-jobs"
    with agent.client(tokens["operator"]) as oscar:  # VM.Audit on /vms: every VM's jobs
        assert oscar.get(f"/jobs/{job['id']}").status_code == 200
        assert {j["id"] for j in oscar.get("/jobs").json()} == all_jobs
    with agent.client(tokens["watcher"]) as walt:  # Sys.Audit on /jobs, no VM.Audit
        assert {j["id"] for j in walt.get("/jobs").json()} == all_jobs
        assert walt.get(f"/jobs/{job['id']}").status_code == 200
        assert walt.get(f"/jobs/{UNKNOWN_JOB}").status_code == 404
        assert walt.get("/vms").status_code == 403
    # a denied read is audited with the job's real target
    denial = [e for e in agent.audit() if e["principal"] == "dave"
              and e["action"] == f"GET /api/v1/jobs/{job['id']}"]
    assert [(e["target"], e["status"]) for e in denial] == [("/vms/st-jobs", 403)]


def test_quota_and_format_refusals_name_the_rule_and_create_nothing(
        agent: SecureAgent, tokens: dict[str, str]) -> None:
    images = agent.root / "images"
    before = sorted(images.iterdir()) if images.exists() else []
    with agent.client(tokens["creator2"]) as dave:
        r = dave.post("/vms", json=_vm("st-big", vcpus=4, disks=[{"size": "64M"}]))
        assert r.status_code == 403
        assert r.json()["detail"] == "policy quota.max_vcpus_per_vm=2: requested 4"
        r = dave.post("/vms", json=_vm("st-vhdx", disks=[{"size": "64M", "format": "vhdx"}]))
        assert r.status_code == 403
        assert r.json()["detail"] == "policy disk_formats=qcow2,raw: disks[0] is vhdx"
        assert dave.post("/vms", json=_vm("st-d1")).status_code == 201
        assert dave.post("/vms", json=_vm("st-d2")).status_code == 201
        r = dave.post("/vms", json=_vm("st-d3"))
        assert r.status_code == 403
        assert r.json()["detail"] == "policy quota.max_vms_per_principal=2: requested 3"
    for name in ("st-big", "st-vhdx", "st-d3"):
        assert agent.root_client.get(f"/vms/{name}").status_code == 404
    after = sorted(images.iterdir()) if images.exists() else []
    assert after == before  # no disk was made
    # root is not bound by per-principal quotas, but by the per-VM ones
    r = agent.root_client.post("/vms", json=_vm("st-root-big", vcpus=3))
    assert r.status_code == 403 and "max_vcpus_per_vm=2" in r.json()["detail"]


def test_each_mutation_and_denial_is_audited_once(agent: SecureAgent,
                                                  tokens: dict[str, str]) -> None:
    assert agent.root_client.post("/vms", json=_vm("st-root")).status_code == 201
    since = time.time()
    with agent.client(tokens["creator"]) as carol:
        assert carol.post("/vms", json=_vm("st-audit")).status_code == 201
        assert carol.get("/vms/st-audit").status_code == 200  # a read: not audited
        assert carol.post("/vms/st-root/reset").status_code == 403
    with agent.client("hvt_deadbeef_forged") as forged:
        assert forged.delete("/vms/st-audit").status_code == 401
    # (root's set-up above may be stamped at the end of its request, after `since`)
    entries = [e for e in agent.audit() if e["time"] >= since and e["principal"] != "root"]
    seen = [(e["principal"], e["action"], e["target"], e["result"], e["status"])
            for e in entries]
    assert seen == [
        ("carol", "POST /api/v1/vms", "/vms", "ok", 201),
        ("carol", "POST /api/v1/vms/st-root/reset", "/vms/st-root", "denied", 403),
        ("-", "DELETE /api/v1/vms/st-audit", "/api/v1/vms/st-audit", "denied", 401),
    ]
    assert entries[1]["privilege"] == "VM.PowerMgmt"
    assert "carol lacks VM.PowerMgmt on /vms/st-root" in entries[1]["detail"]
    # the journal (stderr) has the same lines
    assert "principal=carol action='POST /api/v1/vms/st-root/reset'" in agent.log


def test_audit_entries_cannot_be_changed_through_the_api(agent: SecureAgent) -> None:
    assert agent.root_client.post("/vms", json=_vm("st-ro")).status_code == 201
    before = agent.audit()
    assert before
    for method in ("DELETE", "PUT", "PATCH", "POST"):
        r = agent.root_client.request(method, "/audit", json={})
        assert r.status_code == 405, (method, r.status_code)
    after = agent.audit()
    assert after[:len(before)] == before  # unchanged; only appended (the 405s)


def test_revocation_takes_effect_on_the_next_request(agent: SecureAgent) -> None:
    t = agent.token("rita", "Auditor")
    with agent.client(t["token"]) as rita:  # one keep-alive connection throughout
        assert rita.get("/vms").status_code == 200
        agent.revoke(t["id"])
        r = rita.get("/vms")
        assert r.status_code == 401 and f"token {t['id']} is revoked" in r.json()["detail"]


def test_token_cli(agent: SecureAgent) -> None:
    made = agent.token("tina")
    listed = agent.hvagent("list")
    assert made["id"] in listed.stdout and made["token"] not in listed.stdout
    assert made["token"] not in (agent.state / "hvagent.db").read_bytes().decode("latin-1")
    r = agent.hvagent("revoke", "ffffffff")
    assert r.returncode == 2 and r.stderr.strip() == "hvagent: token ffffffff: no such token"
    r = agent.hvagent("create", "tina", "--role", "Wizard")
    assert r.returncode == 2 and "--role: unknown role 'Wizard'" in r.stderr
    r = agent.hvagent("create", "tina", "--expires", "soon")
    assert r.returncode == 2 and "expires: 'soon'" in r.stderr
    # tina has a token but no role: authenticated, yet allowed nothing
    with agent.client(made["token"]) as tina:
        assert tina.get("/vms").status_code == 403


def _hvctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvagent.cli.hvctl", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, **env})


def test_hvctl_over_https_pins_the_ca(agent: SecureAgent, tokens: dict[str, str],
                                      tmp_path: Path) -> None:
    env = {"HVCTL_CONFIG_DIR": str(tmp_path / "hvctl")}
    url = agent.url
    r = _hvctl("--url", url, "--token", tokens["auditor"], "vm", "list", env=env)
    assert r.returncode == 2 and "not pinned yet; pass --ca-fingerprint" in r.stderr
    wrong = ":".join(["00"] * 32)
    r = _hvctl("--url", url, "--ca-fingerprint", wrong, "--token", tokens["auditor"],
               "vm", "list", env=env)
    assert r.returncode == 2 and "CA fingerprint is" in r.stderr and wrong in r.stderr
    r = _hvctl("--url", url, "--ca-fingerprint", agent.fingerprint(), "--token",
               tokens["auditor"], "--json", "vm", "list", env=env)
    assert r.returncode == 0, r.stderr
    since = time.time()
    with agent.client(tokens["creator"]) as carol:  # something to find in the audit log
        assert carol.post("/vms", json=_vm("st-pin")).status_code == 201
    # pinned now: later calls need no fingerprint; the token may come from HVCTL_TOKEN
    r = _hvctl("--url", url, "--json", "audit", "--since", "1h",
               env={**env, "HVCTL_TOKEN": tokens["auditor"]})
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [e for e in listed if e["time"] >= since] == [
        e for e in agent.audit() if since <= e["time"] <= max(x["time"] for x in listed)]
    assert [(e["principal"], e["action"], e["target"], e["result"], e["status"])
            for e in listed if e["time"] >= since] == [
        ("carol", "POST /api/v1/vms", "/vms", "ok", 201)]
    r = _hvctl("--url", url, "vm", "list", env=env)  # no token
    assert r.returncode == 2 and "HTTP 401" in r.stderr
    r = _hvctl("--url", url.replace("https", "http"), "vm", "list", env=env)
    assert r.returncode == 2 and "only https://" in r.stderr
    r = _hvctl("--url", url, "audit", "--since", "yesterday-ish", env=env)
    assert r.returncode == 2 and "--since yesterday-ish: not a time" in r.stderr


def test_tls_below_1_2_and_plain_http_are_refused(agent: SecureAgent) -> None:
    import ssl

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=old) as c:
        c.get(agent.url + "/ca.pem")
    with pytest.raises(httpx.HTTPError), httpx.Client() as c:
        c.get(agent.url.replace("https", "http") + "/api/v1/vms")
    ok = ssl.create_default_context(cafile=str(agent.ca_pem))
    ok.minimum_version = ok.maximum_version = ssl.TLSVersion.TLSv1_2
    with httpx.Client(verify=ok) as c:
        assert c.get(agent.url + "/ca.pem").status_code == 200


def test_unix_socket_peer_other_than_root_needs_a_token(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # A directory others can traverse (pytest's tmp dirs are root-only), so that an
    # unprivileged peer can reach the socket once the test opens it up.
    root = Path(tempfile.mkdtemp(prefix="hv-sec-peer-"))
    os.chmod(root, 0o755)
    a = SecureAgent(root)
    try:
        a.start()
        mode = stat.S_IMODE(a.socket.stat().st_mode)
        assert mode in (0o660, 0o600)  # 0660 root:hvagent where the group exists
        os.chmod(a.socket, 0o666)  # stands in for membership in group hvagent
        token = a.token("nobody-user", "Auditor")["token"]
        # The unprivileged peer cannot run this venv's interpreter: the system python3
        # speaks plain HTTP/1.1 over the socket with the standard library only.
        probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                 " h=('Authorization: Bearer '+sys.argv[2]+'\\r\\n') if len(sys.argv)>2 else '';"
                 " s.sendall(('GET /api/v1/vms HTTP/1.1\\r\\nHost: x\\r\\n'"
                 "+'Connection: close\\r\\n'+h+'\\r\\n').encode());"
                 " print(s.recv(100).split()[1].decode())")
        as_nobody = {"user": 65534, "group": 65534, "cwd": "/"}
        cmd = ["/usr/bin/python3", "-c", probe, str(a.socket)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           **as_nobody)  # type: ignore[call-overload]
        assert r.stdout.strip() == "401", r.stderr
        r = subprocess.run([*cmd, token], capture_output=True, text=True, timeout=60,
                           **as_nobody)  # type: ignore[call-overload]
        assert r.stdout.strip() == "200", r.stderr
    finally:
        a.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_bad_policy_file_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    a = SecureAgent(tmp_path, {"quotas": {"max_vcpus": 4}})
    r = subprocess.run([*HVAGENT, "serve", "--config", str(a.config)], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"hvagent: {a.policy}: quotas.max_vcpus: unknown key")
