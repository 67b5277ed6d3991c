"""A real agent's report of its host (GET /api/v1/agent, `hvctl host info`): whether its
state survives a power-off; its configuration drop-ins (conf.d/*.yaml); the host
config's bootstrap token, known to the agent only by its hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import HVAGENT, REPO, Agent

from hvagent.config import AgentConfig, load_config
from hvagent.errors import InvalidRequest
from hvagent.host.persistence import STATE_IN_RAM_WARNING

pytestmark = pytest.mark.integration


def hvctl(agent: Agent, *args: str, token: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hvagent.cli.hvctl", "--socket", str(agent.socket),
         *(["--token", token] if token else []), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO)


def fs_type(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def drop_in(agent: Agent, name: str, settings: object) -> Path:
    d = agent.root / "conf.d"
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text(settings if isinstance(settings, str) else yaml.safe_dump(settings))
    return f


def serve_fails(agent: Agent) -> subprocess.CompletedProcess[str]:
    """`hvagent serve` that is expected to stop before it listens (a bounded wait: one
    that starts instead fails the test by its timeout)."""
    return subprocess.run([*HVAGENT, "serve", "--config", str(agent.config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture
def ram_agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent whose state directory is a tmpfs (as on a diskless host)."""
    state = tmp_path / "state"
    state.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(state)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    a = Agent(tmp_path)
    try:
        a.start()
        yield a
    finally:
        a.stop()
        a.client.close()
        subprocess.run(["umount", "-l", str(state)], capture_output=True, timeout=60)


def test_state_in_ram_is_reported_with_a_warning(ram_agent: Agent) -> None:
    state = ram_agent.root / "state"
    info = ram_agent.ok("GET", "/agent")
    assert info["persistent"] is False
    assert info["state_dir"] == str(state)
    assert info["warnings"] == [STATE_IN_RAM_WARNING]
    assert info["persistence"] == f"{state} is on tmpfs ({state}): state is lost at power-off"
    # logged once at start
    log = (ram_agent.root / "agent.log").read_text()
    assert log.count(STATE_IN_RAM_WARNING) == 1

    r = hvctl(ram_agent, "host", "info")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"state dir: {state}" in lines
    assert f"persistent: no ({info['persistence']})" in lines
    assert f"warning: {STATE_IN_RAM_WARNING}" in lines
    assert r.stderr.splitlines() == [f"warning: {STATE_IN_RAM_WARNING}"]
    assert "vms: 0" in lines and lines[0].startswith("version: ")
    assert any(line.startswith(f"accelerator: {info['accel']} (") for line in lines)

    for args in (("--json", "host", "info"), ("host", "info", "--json")):
        r = hvctl(ram_agent, *args)
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        # Free memory and free space are live figures: the same keys, read again.
        live = ("memory", "storage")
        assert {k: v for k, v in shown.items() if k not in live} == \
            {k: v for k, v in info.items() if k not in live}
        for k in live:
            assert shown[k].keys() == info[k].keys()
        assert r.stderr.splitlines() == [f"warning: {STATE_IN_RAM_WARNING}"]


def test_state_on_disk_is_persistent_without_warning(agent: Agent) -> None:
    if fs_type(agent.root) in ("tmpfs", "ramfs"):
        pytest.skip(f"{agent.root} is itself in RAM")
    info = agent.ok("GET", "/agent")
    assert info["persistent"] is True and info["warnings"] == []
    assert info["state_dir"] == str(agent.root / "state")
    r = hvctl(agent, "host", "info")
    assert r.returncode == 0 and r.stderr == ""
    assert "persistent: yes (" in r.stdout and "warning" not in r.stdout
    assert STATE_IN_RAM_WARNING not in (agent.root / "agent.log").read_text()


def test_drop_ins_are_merged_in_name_order(tmp_path: Path) -> None:
    a = Agent(tmp_path)
    other = tmp_path / "other.sock"
    drop_in(a, "20-accel.yaml", {"accel": "tcg", "listen": str(other)})
    drop_in(a, "10-accel.yaml", {"accel": "kvm"})  # earlier by name: overridden
    drop_in(a, ".50-editor-leftover.yaml", "not: [valid")  # hidden: skipped
    drop_in(a, "30-notes.txt", "not: [valid")  # not *.yaml: skipped
    a.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(other)),
                            base_url="http://hvagent/api/v1", timeout=120)
    try:
        a.start()
        assert a.ok("GET", "/agent")["accel"] == "tcg"
        assert not a.socket.exists()  # the drop-in's socket replaced the main file's
    finally:
        a.stop()
        a.client.close()


def test_drop_in_mappings_merge_key_by_key(tmp_path: Path) -> None:
    main = tmp_path / "hvagent.yaml"
    main.write_text(yaml.safe_dump({"state_dir": "/srv/hv", "tls": {
        "listen": "0.0.0.0:8443", "hostnames": ["a.example"]}}))
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-host-config.yaml").write_text(yaml.safe_dump({
        "tls": {"hostnames": ["b.example"]}, "token_ttl": "30d"}))
    c = load_config(main)
    assert c.tls.listen == "0.0.0.0:8443"  # kept: the drop-in's tls did not name it
    assert c.tls.hostnames == ["b.example"]  # a list is replaced, not appended to
    assert c.token_ttl == "30d" and c.state_dir == Path("/srv/hv")
    assert load_config(main) != AgentConfig()


BAD_DROP_INS = {
    "wrong type": ({"tls": {"listen": "nope"}}, "tls.listen: 'nope': give HOST:PORT"),
    "unknown key": ({"stat_dir": "/x"}, "stat_dir: unknown key"),
    "not a mapping": ("- a\n- b\n", "expected a mapping of settings"),
    "not YAML": ("accel: [kvm\n", "not valid YAML"),
    "bad token hash": ({"bootstrap_token_sha256": "ABC"},
                       "bootstrap_token_sha256: 'ABC' is not a sha256"),
    "replaces a mapping with a scalar": ({"tls": "on"}, "tls: "),
}


@pytest.mark.parametrize("content, message", BAD_DROP_INS.values(), ids=BAD_DROP_INS.keys())
def test_bad_drop_in_exits_2_naming_the_file(tmp_path: Path, content: object,
                                             message: str) -> None:
    a = Agent(tmp_path)
    drop_in(a, "10-good.yaml", {"accel": "tcg"})
    bad = drop_in(a, "50-bad.yaml", content)
    r = serve_fails(a)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()]  # one line, no traceback
    assert r.stderr.startswith(f"hvagent: {bad}: ")
    assert message in r.stderr
    assert not a.socket.exists()
    # the host-side token command reads the same configuration
    t = subprocess.run([*HVAGENT, "token", "--config", str(a.config), "list"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert t.returncode == 2 and t.stderr.startswith(f"hvagent: {bad}: ")


def test_conf_d_that_is_not_a_directory_exits_2(tmp_path: Path) -> None:
    a = Agent(tmp_path)
    (tmp_path / "conf.d").write_text("")
    with pytest.raises(InvalidRequest, match="conf.d: not a directory"):
        load_config(a.config)
    r = serve_fails(a)
    assert r.returncode == 2 and "conf.d: not a directory" in r.stderr


def tokens(a: Agent) -> list[dict[str, object]]:
    r = subprocess.run([*HVAGENT, "token", "--config", str(a.config), "--json", "list"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    return list(json.loads(r.stdout))


def test_bootstrap_token_by_hash_is_an_administrator(tmp_path: Path) -> None:
    secret = "chosen-off-the-host-7f3a9c"  # any string: the host only sees its hash
    a = Agent(tmp_path)
    drop_in(a, "50-host-config.yaml",
            {"bootstrap_token_sha256": hashlib.sha256(secret.encode()).hexdigest()})
    bearer = {"Authorization": f"Bearer {secret}"}
    try:
        a.start()
        r = a.client.post("/vms", json={"name": "boot1", "vcpus": 1, "memory_mib": 64},
                          headers=bearer)
        assert r.status_code == 201, r.text
        assert a.client.get("/vms/boot1", headers=bearer).status_code == 200
        assert hvctl(a, "host", "info", token=secret).returncode == 0
        # the plain token is nowhere on the host
        for f in tmp_path.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
        made = tokens(a)
        assert [(t["principal"], t["comment"], t["expires_at"]) for t in made] == [
            ("admin", "bootstrap (host config)", None)]
        audit = a.ok("GET", "/audit")
        assert [e for e in audit if e["action"] == "hvagent bootstrap token"
                and str(made[0]["id"]) in e["detail"]]

        a.stop()
        a.start()  # a restart finds it: nothing new
        assert tokens(a) == made
        assert [e["action"] for e in a.ok("GET", "/audit")].count(
            "hvagent bootstrap token") == 1
        r = a.client.post("/vms", json={"name": "boot2", "vcpus": 1, "memory_mib": 64},
                          headers=bearer)
        assert r.status_code == 201, r.text

        # A revocation stands across restarts: the token is not made again.
        subprocess.run([*HVAGENT, "token", "--config", str(a.config), "revoke",
                        str(made[0]["id"])], capture_output=True, timeout=120, cwd=REPO,
                       check=True)
        a.stop()
        a.start()
        assert a.client.get("/vms", headers=bearer).status_code == 401
        assert [t["status"] for t in tokens(a)] == ["revoked"]
    finally:
        a.stop()
        a.client.close()


def test_without_bootstrap_hash_the_token_is_unknown(agent: Agent) -> None:
    r = agent.client.get("/vms", headers={"Authorization": "Bearer chosen-off-the-host"})
    assert r.status_code == 401
    assert tokens(agent) == []
