"""Route requirements whose ACL path is resolved from a stored object, with an
alternative requirement that also suffices, and the per-item filter of list routes:
decided against a real SQLite store and the real ACL code, on real ASGI requests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException, Request

from hvagent.access.policy import HostPolicy
from hvagent.access.principal import Principal
from hvagent.access.privileges import Privilege
from hvagent.access.security import Security
from hvagent.api.auth import permitted, require
from hvagent.store import Store

# A stored object -> the VM it concerns (what a job's target is to /jobs/{job_id}).
DOCS = {"d1": "web", "d2": "db"}


def _doc_path(request: Request) -> str | None:
    vm = DOCS.get(request.path_params["doc_id"])
    return f"/vms/{vm}" if vm is not None else None


READ_DOC = require(Privilege.VM_AUDIT, "/vms/<vm of doc {doc_id}>", resolve=_doc_path,
                   or_else=require(Privilege.SYS_AUDIT, "/docs"))


@pytest.fixture()
def app(tmp_path: Path) -> FastAPI:
    policy = HostPolicy.model_validate({
        "roles": {"DocWatcher": {"privileges": ["Sys.Audit"]}},
        "acl": [{"path": "/", "principal": "carol", "role": "VMCreator"},
                {"path": "/vms", "principal": "oscar", "role": "VMOperator"},
                {"path": "/docs", "principal": "walt", "role": "DocWatcher"}]})
    store = Store(tmp_path / "hv.db")
    security = Security(store, policy)
    for vm in ("web", "db"):
        store.insert_vm(vm, "{}", "defined")
    security.tokens.set_owner("web", "carol")
    a = FastAPI()
    a.state.security = security
    return a


def _request(app: FastAPI, who: str, doc_id: str = "") -> Request:
    return Request({"type": "http", "method": "GET", "path": f"/docs/{doc_id}",
                    "headers": [], "app": app, "path_params": {"doc_id": doc_id},
                    "state": {"principal": Principal(who, "t1")}})


def _check(app: FastAPI, who: str, doc_id: str) -> tuple[int, dict[str, Any]]:
    """(status, request state: what the audit log records) of READ_DOC's check."""
    request = _request(app, who, doc_id)
    try:
        asyncio.run(READ_DOC(request))
    except HTTPException as e:
        return e.status_code, request.scope["state"]
    return 200, request.scope["state"]


def test_the_resolved_path_decides(app: FastAPI) -> None:
    code, state = _check(app, "carol", "d1")  # on carol's own VM
    assert code == 200 and state["acl_path"] == "/vms/web"
    code, state = _check(app, "carol", "d2")  # on a VM she did not create
    assert code == 403
    # the client is not told which VM; the audit log (acl_path) is
    assert state["denial"] == "carol lacks VM.Audit on /vms/<vm of doc d2>"
    assert state["acl_path"] == "/vms/db"
    assert _check(app, "oscar", "d2")[0] == 200  # VM.Audit on every VM through /vms


def test_the_alternative_suffices_and_alone_reveals_a_missing_object(app: FastAPI) -> None:
    assert _check(app, "walt", "d2")[0] == 200  # Sys.Audit on /docs, no VM.Audit
    # A missing object: only who passes the alternative gets through (to the route's
    # 404); everyone else gets the 403 of an object it may not read.
    assert _check(app, "walt", "nope")[0] == 200
    code, state = _check(app, "oscar", "nope")
    assert code == 403 and state["denial"] == "oscar lacks VM.Audit on /vms/<vm of doc nope>"
    assert state["acl_path"] == "/vms/<vm of doc nope>"
    assert _check(app, "nobody", "d1")[0] == 403


def test_list_routes_filter_items_with_the_same_decision(app: FastAPI) -> None:
    def visible(who: str) -> list[str]:
        r = _request(app, who)
        return [d for d, vm in DOCS.items() if READ_DOC.permits(r, f"/vms/{vm}")]

    assert visible("carol") == ["d1"]
    assert visible("oscar") == ["d1", "d2"]
    assert visible("walt") == ["d1", "d2"]
    assert visible("nobody") == []
    assert permitted(_request(app, "carol"), Privilege.VM_AUDIT, "/vms/web")
    assert not permitted(_request(app, "carol"), Privilege.VM_AUDIT, "/vms/db")
    app.state.security.enforce = False  # the benchmark's build: no checks at all
    assert permitted(_request(app, "nobody"), Privilege.VM_AUDIT, "/vms/db")


def test_the_alternative_is_documented_in_openapi() -> None:
    from hvagent.api.app import create_app
    from hvagent.config import AgentConfig

    schema = create_app(AgentConfig(policy=Path("/nonexistent/policy.yaml"))).openapi()
    op = schema["paths"]["/api/v1/jobs/{job_id}"]["get"]
    assert (op["x-privilege"], op["x-acl-path"]) == ("VM.Audit", "/vms/<target of job "
                                                     "{job_id}>")
    assert (op["x-or-privilege"], op["x-or-acl-path"]) == ("Sys.Audit", "/jobs")
