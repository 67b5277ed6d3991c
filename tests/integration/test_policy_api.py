"""The host policy over the API (GET/PUT /api/v1/policy), against a real agent over
HTTPS: a pushed policy is the file on disk and in force for the very next request; a
bad one is one line naming the key, and changes neither the file nor what is enforced.
Who may read and push it is in the generated RBAC matrix (test_rbac_matrix.py); the
stories here are the ones an operator relies on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from secure_agent import SecureAgent

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureAgent]:
    a = SecureAgent(tmp_path_factory.mktemp("policy-api"))
    a.start()
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def admin(agent: SecureAgent) -> str:
    return str(agent.token("pol-admin", "Administrator")["token"])


def _put(agent: SecureAgent, token: str, text: str) -> tuple[int, dict[str, object]]:
    with agent.client(token) as c:
        r = c.put("/policy", json={"text": text})
    return r.status_code, r.json()


def test_get_returns_the_file_on_disk_with_its_hash(agent: SecureAgent, admin: str) -> None:
    on_disk = agent.policy.read_text()
    with agent.client(admin) as c:
        r = c.get("/policy")
    assert r.status_code == 200, r.text
    assert r.json() == {"text": on_disk,
                        "sha256": hashlib.sha256(on_disk.encode()).hexdigest()}


def test_a_pushed_quota_is_on_disk_and_enforced_on_the_next_request(
        agent: SecureAgent, admin: str) -> None:
    before = yaml.safe_load(agent.policy.read_text())
    with agent.client(admin) as c:
        r = c.post("/vms", json={"name": "pol-big", "vcpus": 2, "memory_mib": 64})
        assert r.status_code == 201, r.text  # no quota yet
        tight = {**before, "quotas": {"max_vcpus_per_vm": 1}}
        text = yaml.safe_dump(tight)
        r = c.put("/policy", json={"text": text})
        assert r.status_code == 200, r.text
        assert r.json()["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert agent.policy.read_text() == text
        r = c.post("/vms", json={"name": "pol-big2", "vcpus": 2, "memory_mib": 64})
        assert r.status_code == 403, r.text
        assert "max_vcpus_per_vm" in r.json()["detail"]
        # ... and lifted again just as fast
        r = c.put("/policy", json={"text": yaml.safe_dump(before)})
        assert r.status_code == 200, r.text
        r = c.post("/vms", json={"name": "pol-big2", "vcpus": 2, "memory_mib": 64})
        assert r.status_code == 201, r.text
        for vm in ("pol-big", "pol-big2"):
            assert c.delete(f"/vms/{vm}").status_code == 200


def test_a_pushed_custom_role_grants_at_once(agent: SecureAgent, admin: str) -> None:
    before = agent.policy.read_text()
    viewer = agent.token("pol-viewer")["token"]  # a principal with no grant at all
    with agent.client(viewer) as c:
        assert c.get("/vms").status_code == 403
    doc = {**yaml.safe_load(before),
           "roles": {"Viewer": {"privileges": ["VM.Audit"]}},
           "acl": [{"path": "/vms", "principal": "pol-viewer", "role": "Viewer"}]}
    status, body = _put(agent, admin, yaml.safe_dump(doc))
    assert status == 200, body
    try:
        with agent.client(viewer) as c:
            assert c.get("/vms").status_code == 200
    finally:
        assert _put(agent, admin, before)[0] == 200
    with agent.client(viewer) as c:
        assert c.get("/vms").status_code == 403


BAD = [
    ("quotas: [1", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping of settings"),
    ("colour: blue\n", "colour: unknown key"),
    ("quotas: {max_vcpus_per_vm: 0}\n", "quotas.max_vcpus_per_vm:"),
    ("quotas: {max_vcpus_per_vm: many}\n", "quotas.max_vcpus_per_vm:"),
    ("acl: [{path: /vms, principal: x, role: Nope}]\n", "unknown role 'Nope'"),
    ("roles: {Administrator: {privileges: [VM.Audit]}}\n", "built-in role"),
    ("roles: {R: {privileges: [VM.Fly]}}\n", "roles.R.privileges"),
    ("library: [relative/dir]\n", "library"),
    ("a: &a [*a]\n", "policy"),
]


@pytest.mark.parametrize(("text", "says"), BAD, ids=[b[1] for b in BAD])
def test_a_bad_policy_is_one_line_and_changes_nothing(agent: SecureAgent, admin: str,
                                                      text: str, says: str) -> None:
    before = agent.policy.read_bytes()
    status, body = _put(agent, admin, text)
    assert status == 400, body  # the agent's answer to every invalid request body
    detail = str(body["detail"])
    assert says in detail and "\n" not in detail, detail
    assert str(agent.policy) in detail  # names the file it would have replaced
    assert agent.policy.read_bytes() == before
    assert not [p for p in agent.policy.parent.iterdir() if p.name.startswith(".policy")]
    # what is enforced did not change either: the library still serves the tiny guest
    with agent.client(admin) as c:
        assert c.get("/policy").json()["text"] == before.decode()


def test_a_policy_larger_than_a_settings_file_is_refused(agent: SecureAgent,
                                                         admin: str) -> None:
    before = agent.policy.read_bytes()
    status, body = _put(agent, admin, "# " + "x" * (1 << 20) + "\n")
    assert status == 422, body
    assert agent.policy.read_bytes() == before


def test_pushing_needs_permissions_modify_reading_needs_sys_audit(agent: SecureAgent) -> None:
    before = agent.policy.read_bytes()
    operator = agent.token("pol-operator", "VMOperator")["token"]
    creator = agent.token("pol-creator", "VMCreator")["token"]
    assert _put(agent, operator, "")[0] == 403
    with agent.client(operator) as c:
        assert c.get("/policy").status_code == 200  # Sys.Audit
    with agent.client(creator) as c:
        assert c.get("/policy").status_code == 403
    with agent.client() as c:
        assert c.put("/policy", json={"text": ""}).status_code == 401
    assert agent.policy.read_bytes() == before
    entries = [e for e in agent.audit() if e.get("target") == "/"
               and "policy" in str(e.get("action"))]
    assert any(e["result"] != "ok" and e["principal"] == "pol-operator" for e in entries)


def test_an_empty_policy_means_builtin_roles_and_no_limits(tmp_path: Path) -> None:
    a = SecureAgent(tmp_path, {"quotas": {"max_vcpus_per_vm": 1}})
    a.start()
    try:
        admin = a.token("pol-admin", "Administrator")["token"]
        assert _put(a, admin, "")[0] == 200
        assert a.policy.read_text() == ""
        with a.client(admin) as c:
            r = c.post("/vms", json={"name": "pol-free", "vcpus": 2, "memory_mib": 64})
            assert r.status_code == 201, r.text
    finally:
        a.stop()
