"""hvctl over a fleet: two real agents with HTTPS on loopback, a hosts file naming both
(their CA fingerprints as the agents log them, Auditor tokens made by the real
`hvagent token` in token files), and the real `hvctl` in a subprocess: `--all-hosts`
lists both hosts' VMs under a HOST column (and as JSON), `--host` and the file's
`default` pick one, a host that fails is an error row with exit status 3, and
`host info` reports the host's memory, CPUs, storage and what its running VMs hold.

The agents are shared by the module; the test that stops one of them runs last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinyguest
import yaml
from secure_agent import REPO, SecureAgent

pytestmark = pytest.mark.integration

VMS = {"alpha": ["web-1", "web-2"], "beta": ["db-1"]}


class Fleet:
    def __init__(self, root: Path, agents: dict[str, SecureAgent]) -> None:
        self.root = root
        self.agents = agents
        self.config_dir = root / "hvctl"
        self.hosts_file = self.config_dir / "hosts.yaml"

    def hvctl(self, *args: str, hosts_file: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
        # A wide terminal, so that rich does not wrap the table's rows.
        env = {**os.environ, "HVCTL_CONFIG_DIR": str(self.config_dir), "COLUMNS": "250"}
        env.pop("HVCTL_TOKEN", None)
        extra = ["--hosts-file", str(hosts_file)] if hosts_file else []
        return subprocess.run([sys.executable, "-m", "hvagent.cli.hvctl", *extra, *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO, env=env)

    def write_hosts(self, path: Path, hosts: list[dict[str, Any]],
                    default: str | None = None) -> Path:
        path.write_text(yaml.safe_dump({**({"default": default} if default else {}),
                                        "hosts": hosts}))
        return path

    def entry(self, name: str, token: bool = True, **extra: Any) -> dict[str, Any]:
        a = self.agents[name]
        return {"name": name, "url": a.url, "ca_fingerprint": a.fingerprint(),
                **({"token_file": f"./{name}.token"} if token else {}), **extra}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    for name in VMS:
        (root / name).mkdir()
    agents = {name: SecureAgent(root / name) for name in VMS}
    f = Fleet(root, agents)
    f.config_dir.mkdir()
    try:
        for name, a in agents.items():
            a.start()
            (f.config_dir / f"{name}.token").write_text(a.token("audrey", "Auditor")["token"])
            for vm in VMS[name]:
                r = a.root_client.post("/vms", json={"name": vm, "vcpus": 1, "memory_mib": 64})
                assert r.status_code == 201, r.text
        f.write_hosts(f.hosts_file, [f.entry("alpha"), f.entry("beta")], default="alpha")
        yield f
    finally:
        for a in agents.values():
            if a.proc is not None and a.proc.poll() is None:
                for vm in a.root_client.get("/vms").json():
                    if vm["state"] in ("running", "paused"):
                        a.root_client.post(f"/vms/{vm['name']}/stop", json={"force": True})
            a.stop()


def table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.strip()]


def meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/meminfo")


def test_all_hosts_lists_every_hosts_vms_under_a_host_column(fleet: Fleet) -> None:
    r = fleet.hvctl("--all-hosts", "vm", "list")
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert rows[0][:3] == ["HOST", "NAME", "STATE"] and "ERROR" not in rows[0]
    assert [row[:3] for row in rows[1:]] == [
        [host, vm, "defined"] for host, vms in VMS.items() for vm in vms]

    r = fleet.hvctl("--json", "--all-hosts", "vm", "list")
    assert r.returncode == 0, r.stderr
    answers = json.loads(r.stdout)
    assert [(a["host"], a["ok"]) for a in answers] == [("alpha", True), ("beta", True)]
    assert {a["host"]: [vm["name"] for vm in a["result"]] for a in answers} == VMS
    # the same answer as the agent's own list
    beta = fleet.agents["beta"].root_client.get("/vms").json()
    assert [vm["name"] for vm in answers[1]["result"]] == [vm["name"] for vm in beta]


def test_host_and_default_pick_one_agent(fleet: Fleet) -> None:
    r = fleet.hvctl("--host", "beta", "--json", "vm", "list")
    assert r.returncode == 0, r.stderr
    assert [vm["name"] for vm in json.loads(r.stdout)] == VMS["beta"]
    r = fleet.hvctl("vm", "list")  # the file's default: alpha; the single-host table
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert rows[0][0] == "NAME" and [row[0] for row in rows[1:]] == VMS["alpha"]
    r = fleet.hvctl("--host", "beta", "vm", "show", "web-1")
    assert r.returncode == 2 and r.stderr == "hvctl: web-1: no such VM (HTTP 404)\n"


def test_a_host_that_answers_an_error_is_an_error_row(fleet: Fleet) -> None:
    """Without its token the agent refuses (401); with a wrong pin hvctl refuses the
    agent. Each is that host's row; the good host is listed; exit status 3."""
    wrong_pin = ":".join(["00"] * 32)
    f = fleet.write_hosts(fleet.config_dir / "mixed.yaml", [
        fleet.entry("alpha"),
        {**fleet.entry("beta", token=False), "name": "beta-anonymous"},
        {**fleet.entry("beta"), "name": "beta-wrong-pin", "ca_fingerprint": wrong_pin}])
    r = fleet.hvctl("--json", "--all-hosts", "vm", "list", hosts_file=f)
    assert r.returncode == 3, r.stderr
    answers = {a["host"]: a for a in json.loads(r.stdout)}
    assert [vm["name"] for vm in answers["alpha"]["result"]] == VMS["alpha"]
    assert answers["beta-anonymous"]["ok"] is False
    assert "HTTP 401" in answers["beta-anonymous"]["error"]
    assert "result" not in answers["beta-anonymous"]
    assert f"not the pinned {wrong_pin}" in answers["beta-wrong-pin"]["error"]
    assert r.stderr == ("hvctl: 2 of 3 hosts did not answer "
                        "(beta-anonymous, beta-wrong-pin)\n")


def test_host_info_reports_memory_cpu_storage_and_committed(
        fleet: Fleet, tiny_guest: tinyguest.TinyGuest) -> None:
    alpha = fleet.agents["alpha"]
    r = alpha.root_client.post("/vms", json={
        "name": "tiny", "vcpus": 1, "memory_mib": 256, "kernel": str(tiny_guest.kernel),
        "initrd": str(tiny_guest.initrd), "append": tiny_guest.append()})
    assert r.status_code == 201, r.text
    try:
        assert alpha.root_client.post("/vms/tiny/start").json()["state"] == "running"
        r = fleet.hvctl("--host", "alpha", "--json", "host", "info")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        mem_total = meminfo_kb("MemTotal")
        assert info["memory"]["total_bytes"] == mem_total * 1024
        assert 0 < info["memory"]["free_bytes"] <= info["memory"]["total_bytes"]
        # only the running VM holds memory; the two stopped ones (64 MiB each) do not
        assert info["memory"]["committed_bytes"] == 256 * 2**20
        assert info["cpu"]["count"] == os.cpu_count() and info["cpu"]["model"]
        assert info["vm_states"]["running"] == 1 and info["vm_states"]["defined"] == 2
        assert sum(info["vm_states"].values()) == info["vms"] == 3
        st = os.statvfs(alpha.root)  # images/ is made on the agent's first disk
        assert info["storage"]["total_bytes"] == st.f_blocks * st.f_frsize
        assert 0 < info["storage"]["free_bytes"] <= info["storage"]["total_bytes"]
        assert info["storage"]["dir"] == str((alpha.root / "images").resolve())
        assert info["version"] and info["accel"] == "tcg"  # what it showed before, kept

        r = fleet.hvctl("--host", "alpha", "host", "info")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("version: ") and "vms: 3" in lines
        assert f"memory: total {mem_total // 1024} MiB, " in r.stdout
        assert "committed to VMs 256 MiB" in r.stdout
        assert f"cpu: {os.cpu_count()} logical (" in r.stdout
        assert "vms by state: defined 2, running 1" in lines

        r = fleet.hvctl("--all-hosts", "host", "info")
        assert r.returncode == 0, r.stderr
        rows = table(r.stdout)
        assert rows[0][:4] == ["HOST", "VERSION", "ACCEL", "CPUS"]
        assert [row[0] for row in rows[1:]] == ["alpha", "beta"]
        assert "256 MiB" in " ".join(rows[1]) and "0 MiB" in " ".join(rows[2])
    finally:
        alpha.root_client.post("/vms/tiny/stop", json={"force": True})
        alpha.root_client.delete("/vms/tiny")


def test_checkpoint_list_on_all_hosts(fleet: Fleet) -> None:
    """The VM exists on alpha only: beta's row is its 404, exit status 3."""
    r = fleet.hvctl("--all-hosts", "checkpoint", "list", "web-1")
    assert r.returncode == 3, r.stderr
    rows = table(r.stdout)
    assert rows[0][:2] == ["HOST", "CHECKPOINT"] and rows[0][-1] == "ERROR"
    assert rows[1][:2] == ["alpha", "(none)"]
    assert rows[2][0] == "beta" and "no such VM" in " ".join(rows[2])


def test_other_commands_refuse_all_hosts(fleet: Fleet) -> None:
    r = fleet.hvctl("--all-hosts", "vm", "start", "web-1")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("hvctl: --all-hosts: only vm list, host info and checkpoint list "
                        "run on all hosts\n")
    states = [vm["state"] for vm in fleet.agents["alpha"].root_client.get("/vms").json()]
    assert states == ["defined", "defined"]


def test_zz_a_stopped_agent_is_an_error_row_and_exit_status_3(fleet: Fleet) -> None:
    """Runs last: it stops beta."""
    fleet.agents["beta"].stop()
    r = fleet.hvctl("--all-hosts", "vm", "list")
    assert r.returncode == 3, r.stderr
    rows = table(r.stdout)
    assert rows[0][0] == "HOST" and rows[0][-1] == "ERROR"
    assert [row[:2] for row in rows[1:3]] == [["alpha", vm] for vm in VMS["alpha"]]
    beta = " ".join(rows[3])
    assert rows[3][0] == "beta" and "cannot reach the agent at https://127.0.0.1:" in beta
    assert r.stderr == "hvctl: 1 of 2 hosts did not answer (beta)\n"

    r = fleet.hvctl("--json", "--all-hosts", "vm", "list")
    assert r.returncode == 3
    answers = json.loads(r.stdout)
    assert answers[0]["ok"] is True and len(answers[0]["result"]) == 2
    assert answers[1]["host"] == "beta" and answers[1]["ok"] is False
    assert "\n" not in answers[1]["error"]

    only_beta = fleet.write_hosts(fleet.config_dir / "beta.yaml", [fleet.entry("beta")])
    r = fleet.hvctl("--all-hosts", "vm", "list", hosts_file=only_beta)
    assert r.returncode == 2 and r.stderr == "hvctl: no host answered (beta)\n"
