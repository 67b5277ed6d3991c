"""Every endpoint of the app's route table x every built-in role x every kind of bad
credential, against the real agent over HTTPS (and root over the unix socket).

The cases are generated from the route table, so a new endpoint is covered the moment
it exists, and one without a declared privilege fails here. The expected answers come
from the roles as the issue defines them (written out below, not read from the code
under test). Requests target a VM and a job that do not exist, so an authorized request
needs no QEMU and changes nothing: it gets 404/409/422, never 401/403. The same routes
against real VMs of the caller and of other principals (no role, a grant on one VM, a
custom role, the files a request may name) are in test_tenant_isolation.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from secure_agent import SecureAgent

from hvagent.access.privileges import Privilege
from hvagent.api.app import create_app
from hvagent.api.auth import Requirement, route_privileges, undeclared_routes
from hvagent.config import AgentConfig

pytestmark = pytest.mark.integration

VM_CONFIG = {"VM.Config.CPU", "VM.Config.Memory", "VM.Config.Disk", "VM.Config.Network",
             "VM.Config.Options"}
# What each built-in role may do, from the issue: (on the VM/collection paths of others,
# on collection paths). VMCreator may act on a single VM only if it created it; here no
# VM is its own, so on /vms/<name> it may do nothing.
ROLE_PRIVILEGES: dict[str, set[str]] = {
    "Administrator": {str(p) for p in Privilege},
    "VMCreator": {"VM.Allocate", "VM.Audit", *VM_CONFIG, "VM.PowerMgmt", "VM.Console",
                  "VM.Snapshot", "VM.Snapshot.Rollback", "Network.Audit"},
    "VMOperator": {*VM_CONFIG, "VM.PowerMgmt", "VM.Console", "VM.Snapshot",
                   "VM.Snapshot.Rollback", "VM.Audit", "Sys.Audit", "Sys.Metrics",
                   "Network.Audit"},
    "Auditor": {"VM.Audit", "Sys.Audit", "Sys.Metrics", "Network.Audit"},
    "MetricsReader": {"Sys.Metrics"},
}
OWNER_ONLY = {"VMCreator"}
BAD = ("no-token", "bad-token", "revoked", "expired")
MISSING = "mx-absent"  # no VM, job or network has this name

ROUTE_APP = create_app(AgentConfig(policy=Path("/nonexistent/policy.yaml")))
ROUTES = route_privileges(ROUTE_APP)


def test_every_route_declares_a_privilege() -> None:
    assert undeclared_routes(ROUTE_APP) == []
    assert len(ROUTES) >= 10  # the route table really was read


# Managed networks, from the networks issue: seeing them is Network.Audit (every role
# that attaches NICs has it), making and removing them Network.Allocate.
NETWORK_ROUTES = {
    ("GET", "/api/v1/networks"): ("Network.Audit", "/networks"),
    ("GET", "/api/v1/networks/{name}"): ("Network.Audit", "/networks/{name}"),
    ("POST", "/api/v1/networks"): ("Network.Allocate", "/networks"),
    ("DELETE", "/api/v1/networks/{name}"): ("Network.Allocate", "/networks/{name}"),
}


def test_network_routes_need_the_network_privileges() -> None:
    got = {k: (str(ROUTES[k].privilege), ROUTES[k].path) for k in NETWORK_ROUTES
           if k in ROUTES}
    assert got == NETWORK_ROUTES


# Offline disk access and P2V import, from the disk issue: reading a stopped VM's files
# and writing them are separate privileges; importing defines a VM (VM.Allocate on /vms).
DISK_ROUTES = {
    ("GET", "/api/v1/vms/{name}/disks/{index}/partitions"): ("Disk.Read", "/vms/{name}"),
    ("GET", "/api/v1/vms/{name}/disks/{index}/ls"): ("Disk.Read", "/vms/{name}"),
    ("GET", "/api/v1/vms/{name}/disks/{index}/stat"): ("Disk.Read", "/vms/{name}"),
    ("GET", "/api/v1/vms/{name}/disks/{index}/files"): ("Disk.Read", "/vms/{name}"),
    ("PUT", "/api/v1/vms/{name}/disks/{index}/files"): ("Disk.Write", "/vms/{name}"),
    ("DELETE", "/api/v1/vms/{name}/disks/{index}/files"): ("Disk.Write", "/vms/{name}"),
    ("POST", "/api/v1/vms/{name}/disks/{index}/dirs"): ("Disk.Write", "/vms/{name}"),
    ("POST", "/api/v1/vms/import"): ("VM.Allocate", "/vms"),
}


def test_disk_routes_are_mounted_with_their_privileges() -> None:
    got = {k: (str(ROUTES[k].privilege), ROUTES[k].path) for k in DISK_ROUTES if k in ROUTES}
    assert got == DISK_ROUTES


def _url(path: str, origin: str) -> str:
    """The absolute URL of a route (the clients' base URL is /api/v1; /metrics is not
    under it)."""
    return origin + re.sub(r"\{[^}]+\}", MISSING, path)


def _body(method: str) -> Any:
    # `{}` is incomplete for every create/change body: an authorized request stops at
    # validation (422) and creates nothing.
    return {} if method in ("POST", "PUT", "PATCH") else None


def _acl_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", MISSING, path)


def role_allows(role: str, privilege: str, acl_path: str) -> bool:
    if privilege not in ROLE_PRIVILEGES[role]:
        return False
    on_single_vm = acl_path.startswith("/vms/")
    return not (role in OWNER_ONLY and on_single_vm)


def expected_allowed(role: str, req: Requirement) -> bool:
    """A requirement whose path is resolved from a stored object (a job's target) has
    no path here, where the object does not exist: only its `or_else` can admit."""
    if req.resolve is None and role_allows(role, str(req.privilege), _acl_path(req.path)):
        return True
    return req.or_else is not None and expected_allowed(role, req.or_else)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    a = SecureAgent(tmp_path_factory.mktemp("rbac"))
    a.start()
    tokens = {role: a.token(f"mx-{role.lower()}", role)["token"] for role in ROLE_PRIVILEGES}
    revoked = a.token("mx-revoked", "Administrator")
    a.revoke(revoked["id"])
    expired = a.token("mx-expired", "Administrator", expires="1s")
    while time.time() < expired["expires_at"]:
        time.sleep(0.1)
    creds = {**tokens, "no-token": None, "bad-token": "hvt_00000000_notarealtoken",
             "revoked": revoked["token"], "expired": expired["token"]}
    try:
        yield {"agent": a, "creds": creds}
    finally:
        a.stop()


CASES = [(m, p, who) for (m, p) in sorted(ROUTES) for who in (*ROLE_PRIVILEGES, *BAD)]


@pytest.mark.parametrize("method, path, who", CASES,
                         ids=[f"{m} {p} {w}" for m, p, w in CASES])
def test_matrix(agent: dict[str, Any], method: str, path: str, who: str) -> None:
    a: SecureAgent = agent["agent"]
    req = ROUTES[(method, path)]
    with a.client(agent["creds"][who]) as c:
        r = c.request(method, _url(path, a.url), json=_body(method))
    if who in BAD:
        assert r.status_code == 401, r.text
        if path.startswith("/redfish/"):
            assert r.json()["error"]["code"] == "Base.1.22.NoValidSession", r.text
        else:
            assert r.headers["content-type"] == "application/problem+json"
    elif expected_allowed(who, req):
        assert r.status_code not in (401, 403), r.text
        assert r.status_code < 500, r.text
    else:
        assert r.status_code == 403, r.text
        assert str(req.privilege) in error_detail(path, r.json())


def error_detail(path: str, body: dict[str, Any]) -> str:
    """The one line of an error answer: problem+json's detail, Redfish's error message."""
    if path.startswith("/redfish/"):
        assert body["error"]["@Message.ExtendedInfo"][0]["MessageId"].startswith("Base.")
        return str(body["error"]["message"])
    return str(body["detail"])


@pytest.mark.parametrize("method, path", sorted(ROUTES), ids=[f"{m} {p}" for m, p in
                                                               sorted(ROUTES)])
def test_root_on_the_unix_socket_needs_no_token(agent: dict[str, Any], method: str,
                                                path: str) -> None:
    a: SecureAgent = agent["agent"]
    r = a.root_client.request(method, _url(path, "http://hvagent"), json=_body(method))
    assert r.status_code not in (401, 403) and r.status_code < 500, r.text
