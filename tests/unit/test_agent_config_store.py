"""Agent configuration file, SQLite store migrations, jobs and the privilege table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hvagent.api.app import create_app
from hvagent.auth import Privilege, route_privileges
from hvagent.config import AgentConfig, load_config
from hvagent.errors import HVError, InvalidRequest, NotFound
from hvagent.jobs import Jobs, JobStatus
from hvagent.store import MIGRATIONS, Store


def test_config_defaults_and_override(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("state_dir: /srv/hv\naccel: tcg\n")
    c = load_config(f)
    assert c.database == Path("/srv/hv/hvagent.db")
    assert c.accel == "tcg"
    assert c.listen == Path("/run/hvagent/hvagent.sock")
    assert AgentConfig().storage_dir == Path("/var/lib/hvagent/images")


@pytest.mark.parametrize("text, message", [
    ("listne: /x\n", "listne: unknown key"),
    ("accel: fast\n", "accel: Input should be 'auto', 'kvm' or 'tcg'"),
    ("- a\n", "expected a mapping of settings"),
    ("a: [\n", "not valid YAML"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InvalidRequest) as e:
        load_config(f)
    assert str(f) in e.value.message and message in e.value.message


def test_store_migrates_once_and_keeps_rows(tmp_path: Path) -> None:
    db = tmp_path / "hv.db"
    s = Store(db)
    assert s.schema_version == len(MIGRATIONS)
    s.insert_vm("a", "{}", "defined")
    s.close()
    s = Store(db)  # reopening runs no migration again
    assert s.schema_version == len(MIGRATIONS)
    row = s.get_vm("a")
    assert row is not None and row.state == "defined"
    s.update_vm("a", state="running", pid=42)
    assert s.get_vm("a").pid == 42  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        s.update_vm("a", owner="b")


def test_failed_transaction_leaves_no_row(tmp_path: Path) -> None:
    s = Store(tmp_path / "hv.db")
    with pytest.raises(RuntimeError), s.transaction() as tx:
        tx.execute("INSERT INTO vms (name, spec, state, created_at, updated_at) "
                   "VALUES ('x', '{}', 'defined', 0, 0)")
        raise RuntimeError("boom")
    assert s.get_vm("x") is None


def test_jobs_succeed_fail_and_recover(tmp_path: Path) -> None:
    store = Store(tmp_path / "hv.db")
    jobs = Jobs(store)

    async def scenario() -> None:
        async def good(progress):  # type: ignore[no-untyped-def]
            progress(0.5)
            return {"answer": 42}

        async def bad(progress):  # type: ignore[no-untyped-def]
            progress(0.3)
            raise InvalidRequest("disk too small")

        j1 = jobs.start("convert", "vm1", good)
        j2 = jobs.start("convert", "vm2", bad)
        assert j1.status == JobStatus.RUNNING
        done1, done2 = await jobs.wait(j1.id), await jobs.wait(j2.id)
        assert (done1.status, done1.progress, done1.result) == ("succeeded", 1.0, {"answer": 42})
        assert (done2.status, done2.progress, done2.error) == ("failed", 0.3, "disk too small")

    asyncio.run(scenario())
    stuck = jobs.create("checkpoint", "vm3")
    assert [j.target for j in jobs.list("vm3")] == ["vm3"]
    # a new agent process finds it running: its worker is gone
    assert Jobs(store).recover() == 1
    again = jobs.get(stuck.id)
    assert (again.status, again.error) == ("failed", "agent restarted")
    with pytest.raises(NotFound):
        jobs.get("nope")


def test_every_api_route_declares_a_privilege() -> None:
    app = create_app(AgentConfig())
    table = route_privileges(app)
    api_routes = {(m, r) for (m, r) in table}
    assert ("POST", "/api/v1/vms") in api_routes
    assert table[("POST", "/api/v1/vms")].privilege is Privilege.VM_ALLOCATE
    assert table[("POST", "/api/v1/vms/{name}/stop")].privilege is Privilege.VM_POWERMGMT
    assert table[("GET", "/api/v1/vms/{name}/console")].privilege is Privilege.VM_CONSOLE
    openapi_ops = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert openapi_ops == api_routes


def test_errors_carry_their_message() -> None:
    e = NotFound("x: no such VM")
    assert isinstance(e, HVError) and e.message == "x: no such VM" and e.kind == "not-found"
