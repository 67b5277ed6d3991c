"""Agent configuration file, SQLite store migrations, jobs and the privilege table."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvagent.access.audit import AuditLog
from hvagent.access.policy import HostPolicy, load_policy
from hvagent.access.principal import Principal
from hvagent.access.privileges import BUILTIN_ROLES, Privilege
from hvagent.access.security import Security
from hvagent.access.tokens import MAX_TTL_DAYS, Tokens, TokenStatus, parse_duration
from hvagent.api.app import create_app
from hvagent.api.auth import is_public, route_privileges
from hvagent.cli import hvagent as hvagent_cli
from hvagent.config import AgentConfig, load_config
from hvagent.errors import HVError, InvalidRequest, NotFound
from hvagent.services.jobs import Jobs, JobStatus
from hvagent.spec import VMSpec
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
    # Every operation declares a privilege, but the public ones (Redfish's service root,
    # its metadata and the login).
    public = {op for op in openapi_ops if is_public(*op)}
    assert public == {("GET", "/redfish/"), ("GET", "/redfish/v1"),
                      ("GET", "/redfish/v1/$metadata"), ("GET", "/redfish/v1/odata"),
                      ("POST", "/redfish/v1/SessionService/Sessions")}
    assert openapi_ops - public == api_routes


def test_errors_carry_their_message() -> None:
    e = NotFound("x: no such VM")
    assert isinstance(e, HVError) and e.message == "x: no such VM" and e.kind == "not-found"


# Old databases: every dump tests/fixtures/make_store_dump.py wrote (one per shipped
# schema version) must migrate to the current schema with every row kept.

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DUMPS = sorted(FIXTURES.glob("store_v*.sql"))


def _rows(conn: sqlite3.Connection) -> dict[str, list[dict[str, object]]]:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    conn.row_factory = sqlite3.Row
    out = {t: [dict(r) for r in conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid')]
           for t in tables}
    conn.row_factory = None
    return out


def test_a_dump_of_the_current_schema_exists() -> None:
    # A new migration needs a dump of the schema before it to be tested against.
    assert f"store_v{len(MIGRATIONS)}.sql" in [d.name for d in DUMPS]


@pytest.mark.parametrize("dump", DUMPS, ids=[d.stem for d in DUMPS])
def test_an_old_database_with_rows_migrates_losing_nothing(tmp_path: Path,
                                                           dump: Path) -> None:
    db = tmp_path / "hvagent.db"
    conn = sqlite3.connect(db)
    conn.executescript(dump.read_text())
    before = _rows(conn)
    old_version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    assert old_version <= len(MIGRATIONS)
    # every table of the schema has rows in the fixture
    assert all(before[t] for t in before), {t: len(r) for t, r in before.items()}

    store = Store(db)
    assert store.schema_version == len(MIGRATIONS)
    after = _rows(store.conn)
    store.conn.row_factory = sqlite3.Row
    for table, rows in before.items():
        assert table in after, f"table {table} is gone"
        kept = [{k: r[k] for k in rows[0]} for r in after[table]]
        assert kept == rows, f"rows of {table} changed"
    # and the typed readers understand every row
    vms = store.list_vms()
    assert {v.name for v in vms} == {r["name"] for r in before["vms"]}
    for v in vms:
        assert VMSpec.model_validate_json(v.spec).name == v.name
    tokens = Tokens(store)
    assert [t.id for t in tokens.list_tokens()] == [r["id"] for r in before["tokens"]]
    assert {str(t.status()) for t in tokens.list_tokens()} >= {"valid", "revoked"}
    assert len(tokens.grants()) == len(before["acl"])
    for r in before["vm_owners"]:
        assert tokens.owner(str(r["name"])) == r["owner"]
    assert {j.id for j in Jobs(store).list()} == {r["id"] for r in before["jobs"]}
    assert len(AuditLog(store).list()) == len(before["audit"])
    _tokens_and_grants_still_decide(store, dump, before)
    store.close()


def _tokens_and_grants_still_decide(store: Store, dump: Path,
                                    before: dict[str, list[dict[str, Any]]]) -> None:
    """The migrated database answers the access questions the old one did: its tokens
    name their principals, its grants and VM owners decide."""
    security = Security(store, HostPolicy())
    secrets = re.findall(r"^-- token (\S+): (\S+)$", dump.read_text(), re.M)
    valid = 0
    for who, secret in secrets:
        info = security.tokens.lookup(secret)
        assert info is not None and info.principal == who, who
        if info.status() is TokenStatus.VALID:
            principal = security.token_principal(secret)[0]
            assert principal == Principal(who, info.id)
            valid += 1
    assert valid, "the dump has a token that still authenticates"
    owners = {str(r["name"]): str(r["owner"]) for r in before["vm_owners"]}
    for r in before["acl"]:
        who, path, role = str(r["principal"]), str(r["path"]), BUILTIN_ROLES[str(r["role"])]
        principal = Principal(who, "t1")
        assert role in security.access().roles_on(who, path), r
        for vm in (v["name"] for v in before["vms"]):
            vm_path = f"/vms/{vm}"
            if vm_path != path and path not in ("/", "/vms"):
                continue  # the grant does not reach this VM
            mine = not role.owner_only or owners.get(str(vm)) == who
            for privilege in role.privileges:
                assert security.allowed(principal, privilege, vm_path) is mine, \
                    (who, privilege, vm_path)


def _newer_db(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    conn.executescript((FIXTURES / f"store_v{len(MIGRATIONS)}.sql").read_text())
    conn.execute("CREATE TABLE from_the_future (x TEXT)")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.commit()
    conn.close()
    return path.read_bytes()


def test_a_database_of_a_newer_agent_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "hvagent.db"
    data = _newer_db(db)
    with pytest.raises(HVError) as e:
        Store(db)
    msg = e.value.message
    assert str(db) in msg and f"schema version {len(MIGRATIONS) + 1}" in msg
    assert f"up to {len(MIGRATIONS)}" in msg
    assert db.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hvagent.db"]


def _truncated(path: Path) -> None:
    s = Store(path)
    for i in range(200):
        s.insert_vm(f"vm{i}", "{}" * 100, "defined")
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(os.urandom(8192)), "not a usable agent database"),
    (lambda p: p.write_bytes(b"SQLite format 3\0" + os.urandom(4000)), "database"),
    (lambda p: p.write_text("name: not a database\n"), "not a usable agent database"),
    (_truncated, "malformed"),
    (lambda p: p.mkdir(), "not a database file"),
], ids=["random", "bad-header", "text", "truncated", "directory"])
def test_an_unusable_database_file_is_one_clear_error(tmp_path: Path, make: Any,
                                                      words: str) -> None:
    db = tmp_path / "hvagent.db"
    make(db)
    with pytest.raises(HVError) as e:
        Store(db)
    assert str(db) in e.value.message and words in e.value.message
    assert "\n" not in e.value.message


# Bad configuration: one line naming the file and the key, never a traceback.


@pytest.mark.parametrize("listen, words", [
    ("127.0.0.1:99999", "not in 1..65535"),
    ("127.0.0.1:65536", "not in 1..65535"),
    ("127.0.0.1:0", "not in 1..65535"),
    ("127.0.0.1:-1", "is not a number"),
    ("127.0.0.1:https", "is not a number"),
    ("127.0.0.1:", "is not a number"),
    (":8443", "give HOST:PORT"),
    ("8443", "give HOST:PORT"),
    ("::1:8443", "needs brackets"),
    ("[::1]", "give HOST:PORT"),
    ("[::g]:8443", "not an IPv6 address"),
    ("[]:8443", "not an IPv6 address"),
    ("my host:8443", "not a host name"),
])
def test_a_bad_tls_listen_address_names_the_key(tmp_path: Path, listen: str,
                                                words: str) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(json.dumps({"tls": {"listen": listen}}))
    with pytest.raises(InvalidRequest) as e:
        load_config(f)
    assert e.value.message.startswith(f"{f}: tls.listen: ") and words in e.value.message


@pytest.mark.parametrize("listen", ["0.0.0.0:8443", "[::1]:1", "localhost:65535",
                                    "[fe80::1]:8443", "host-1.example.org:443"])
def test_good_tls_listen_addresses(tmp_path: Path, listen: str) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(json.dumps({"tls": {"listen": listen}}))
    assert load_config(f).tls.listen == listen


@pytest.mark.parametrize("loader", [load_config, load_policy], ids=["config", "policy"])
@pytest.mark.parametrize("data", [b"state_dir: /srv/\xff\xfe\n", b"\x89PNG\r\n\x1a\n\0\0",
                                  "accel: tcg\n".encode("utf-16")],
                         ids=["latin1", "binary", "utf16"])
def test_a_non_utf8_settings_file_is_one_line(tmp_path: Path, loader: Any,
                                              data: bytes) -> None:
    f = tmp_path / "s.yaml"
    f.write_bytes(data)
    with pytest.raises(InvalidRequest) as e:
        loader(f)
    assert e.value.message.startswith(f"{f}: not UTF-8 text")


def test_a_self_referencing_or_huge_settings_file_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("hostnames: &a [*a]\n")
    g = tmp_path / "t.yaml"
    g.write_text("tls: &a {hostnames: [*a]}\n")
    for path in (g,):
        with pytest.raises(InvalidRequest) as e:
            load_config(path)
        assert e.value.message.startswith(f"{path}: ")
    h = tmp_path / "big.yaml"
    h.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(InvalidRequest) as e:
        load_config(h)
    assert "not a settings file" in e.value.message


DIR_KEYS = ["state_dir", "storage_dir", "run_dir", "log_dir"]


def _config(tmp_path: Path, **bad: Path) -> AgentConfig:
    good = {k: tmp_path / k for k in DIR_KEYS}
    return AgentConfig(**{**good, "listen": tmp_path / "run_dir" / "hv.sock", **bad})


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "frozen"
    d.mkdir()
    subprocess.run(["chattr", "+i", str(d)], check=True, timeout=30)
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True, timeout=30)


@pytest.mark.parametrize("key", DIR_KEYS)
def test_an_unusable_directory_is_one_line_naming_the_key(tmp_path: Path, key: str,
                                                          immutable_dir: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for bad, words in ((afile / "sub", "Not a directory"),
                       (afile, "is not a directory"),
                       (Path("/proc/hvagent-test"), "not a writable directory"),
                       (immutable_dir, "Operation not permitted"),
                       (immutable_dir / "sub", "Operation not permitted"),
                       (Path(f"{tmp_path}/a\0b"), "not a usable path")):
        with pytest.raises(InvalidRequest) as e:
            _config(tmp_path, **{key: bad}).make_dirs()
        assert e.value.message.startswith(f"{key}: ") and words in e.value.message, (
            bad, e.value.message)
        assert "\n" not in e.value.message
    assert list(immutable_dir.iterdir()) == []


def test_a_socket_directory_that_is_a_file_names_listen(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(InvalidRequest) as e:
        _config(tmp_path, listen=tmp_path / "afile" / "hv.sock").make_dirs()
    assert e.value.message.startswith("listen: ")


# `hvagent serve` on bad input: exit 2, one line on stderr, before anything listens.


def _serve(config: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "hvagent.yaml"
    f.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "hvagent.cli.hvagent", "serve", "--config",
                           str(f)], capture_output=True, text=True, timeout=60)


def _base(tmp_path: Path) -> dict[str, object]:
    return {"listen": str(tmp_path / "hv.sock"), "state_dir": str(tmp_path / "state"),
            "storage_dir": str(tmp_path / "images"), "run_dir": str(tmp_path / "run"),
            "log_dir": str(tmp_path / "log"), "accel": "tcg"}


@pytest.mark.parametrize("case", ["port", "state-under-file", "garbage-db", "newer-db",
                                  "policy-latin1"])
def test_serve_refuses_bad_input_with_one_line(tmp_path: Path, case: str) -> None:
    config = _base(tmp_path)
    state = tmp_path / "state"
    expect = ""
    if case == "port":
        config["tls"] = {"listen": "127.0.0.1:99999"}
        expect = "tls.listen"
    elif case == "state-under-file":
        (tmp_path / "afile").write_text("")
        config["state_dir"] = str(tmp_path / "afile" / "state")
        expect = "state_dir"
    elif case in ("garbage-db", "newer-db"):
        state.mkdir()
        if case == "garbage-db":
            (state / "hvagent.db").write_bytes(os.urandom(4096))
        else:
            _newer_db(state / "hvagent.db")
        expect = "hvagent.db"
    else:
        (tmp_path / "policy.yaml").write_bytes(b"roles: {caf\xe9: {}}\n")
        config["policy"] = str(tmp_path / "policy.yaml")
        expect = "not UTF-8"
    r = _serve(config, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvagent: ") and expect in lines[0], (
        r.stderr)
    assert not (tmp_path / "hv.sock").exists()


# `hvagent token`: bad arguments are one line; a bad stored row never breaks `list`.


def _token(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str
           ) -> tuple[int, str, str]:
    f = tmp_path / "hvagent.yaml"
    if not f.exists():
        f.write_text(json.dumps(_base(tmp_path)))
    rc = hvagent_cli.main(["token", "--config", str(f), *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("path", ["/vms/../", "/vms/..", "/vms/.", "/./vms", "//vms",
                                  "/vms//a", "/vms/", "vms", "", "/vms/a\x01",
                                  "/" + "a" * 2000])
def test_token_grant_path_must_be_canonical(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            path: str) -> None:
    rc, out, err = _token(tmp_path, capsys, "create", "alice", "--role", "VMCreator",
                          "--path", path)
    assert rc == 2 and out == ""
    assert err.startswith("hvagent: --path: ") and err.count("\n") == 1, err
    rc, out, _ = _token(tmp_path, capsys, "--json", "list")
    assert rc == 0 and json.loads(out) == []  # nothing stored


@pytest.mark.parametrize("expires, words", [
    ("99999999999d", "longer than the maximum"), ("3651d", "longer than the maximum"),
    ("9999999999999999999999w", "not a duration"), ("0d", "not a duration"),
    ("-1d", "not a duration"), ("1e9y", "not a duration"), ("10y", "not a duration"),
    ("5 parsecs", "not a duration"), ("", "not a duration"), ("1.5d", "not a duration"),
])
def test_token_expiry_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 expires: str, words: str) -> None:
    rc, out, err = _token(tmp_path, capsys, "create", "alice", f"--expires={expires}")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("hvagent: --expires: ") and words in err, err
    assert parse_duration(f"{MAX_TTL_DAYS}d") == MAX_TTL_DAYS * 86400


def test_token_ttl_of_the_config_is_named_when_bad(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    (tmp_path / "hvagent.yaml").write_text(json.dumps({**_base(tmp_path),
                                                       "token_ttl": "99999999999d"}))
    rc, _, err = _token(tmp_path, capsys, "create", "alice")
    assert rc == 2 and err.startswith("hvagent: token_ttl: "), err


def test_token_list_survives_rows_no_date_can_show(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    rc, _, _ = _token(tmp_path, capsys, "create", "alice", "--expires", "1d")
    assert rc == 0
    store = Store(tmp_path / "state" / "hvagent.db")
    tokens = Tokens(store)
    # as an older agent stored `--expires 99999999999d`, and a damaged row
    far, _ = tokens.create("bob", 99999999999 * 86400.0)
    bad, _ = tokens.create("carol", 86400.0)
    store.execute("UPDATE tokens SET expires_at = 'garbage' WHERE id = ?", (bad.id,))
    store.close()
    rc, out, err = _token(tmp_path, capsys, "list")
    assert rc == 0, err
    assert far.id in out and bad.id in out
    rc, out, err = _token(tmp_path, capsys, "--json", "list")
    status = {t["id"]: t["status"] for t in json.loads(out)}
    assert status[far.id] == "valid"
    assert status[bad.id] == "expired"  # a damaged expiry fails closed
