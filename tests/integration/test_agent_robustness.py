"""The agent stays available when things around it misbehave: a VM's QMP monitor that
does not answer (another client holds it, QEMU is stopped), a second agent on the same
state directory, the TLS port taken by someone else, an agent restart under a client
that pinned its CA. Real agent processes, real QEMU (firmware only: no guest OS is
needed to have a monitor), real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import HVAGENT, REPO, Agent
from secure_agent import SecureAgent

pytestmark = pytest.mark.integration

# Generous next to the agent's own bounds (QMP deadline 15 s, exit deadline 60 s): these
# catch a hang, they do not measure speed.
ANSWER_TIMEOUT = 45
EXIT_TIMEOUT = 90


def _bare_vm(agent: Agent, name: str) -> dict[str, Any]:
    """A started VM without disks or kernel: QEMU and its monitor, nothing to boot."""
    agent.ok("POST", "/vms", json={"name": name, "memory_mib": 64})
    return agent.ok("POST", f"/vms/{name}/start")  # type: ignore[no-any-return]


def _prompt(agent: Agent) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)),
                        base_url="http://hvagent/api/v1", timeout=ANSWER_TIMEOUT)


def _hold_qmp(path: Path) -> socket.socket:
    """Be the one client QEMU's QMP chardev serves (its greeting proves it)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(path))
    assert b'"QMP"' in s.recv(4096)
    return s


def _wait_state(client: httpx.Client, name: str, state: str,
                timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        vm: dict[str, Any] = client.get(f"/vms/{name}").json()
        if vm["state"] == state or time.monotonic() > deadline:
            assert vm["state"] == state, vm
            return vm
        time.sleep(0.3)


def _serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HVAGENT, "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=EXIT_TIMEOUT, cwd=REPO)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvagent: "), r.stderr
    return lines[0]


def test_a_held_qmp_socket_makes_that_vm_unresponsive_not_the_agent(agent: Agent) -> None:
    for name in ("held", "wedged", "other"):
        _bare_vm(agent, name)
    agent.stop()  # the VMs keep running; the agent's QMP connections are gone
    holders = {n: _hold_qmp(agent.run_dir / f"{n}.qmp") for n in ("held", "wedged")}
    try:
        agent.start()  # answers /agent, or raises after 60 s (the bug: start-up blocks)
        with _prompt(agent) as c:
            vms = {v["name"]: v for v in c.get("/vms").json()}
            for n in holders:
                assert vms[n]["state"] == "unresponsive", vms[n]
                assert "QMP monitor does not answer" in vms[n]["last_error"]
                assert vms[n]["pid"]
            # the rest is served: the other VM takes commands
            assert vms["other"]["state"] == "running"
            assert c.post("/vms/other/pause").json()["state"] == "paused"
            assert c.post("/vms/other/resume").json()["state"] == "running"
            # an unresponsive VM refuses what needs its monitor, with a 409 ...
            r = c.post("/vms/wedged/pause")
            assert r.status_code == 409 and "unresponsive" in r.text
            assert c.post("/vms/wedged/reset").status_code == 409
            assert c.post("/vms/wedged/start").status_code == 409
            # ... and can still be stopped: killed by pid
            pid = vms["wedged"]["pid"]
            r = c.post("/vms/wedged/stop", json={})
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "stopped" and "did not answer" in r.json()["last_error"]
            assert pid not in agent.qemu_pids()
            # the holder lets go: the VM is back in its real state, the error gone
            holders.pop("held").close()
            vm = _wait_state(c, "held", "running")
            assert vm["last_error"] is None
            assert c.post("/vms/held/pause").json()["state"] == "paused"
            assert c.post("/vms/held/stop", json={"force": True}).json()["state"] == "stopped"
    finally:
        for s in holders.values():
            s.close()


def test_sigterm_ends_an_agent_with_a_stuck_qmp_command(agent: Agent) -> None:
    pid = _bare_vm(agent, "frozen")["pid"]
    os.kill(pid, signal.SIGSTOP)  # QEMU takes the command and never answers
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["vm"] = agent.client.get("/vms/frozen").json()
        except httpx.HTTPError as e:
            answer["error"] = e

    try:
        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(1.0)  # the request is now waiting for QMP
        assert agent.proc is not None
        agent.proc.terminate()
        agent.proc.wait(timeout=EXIT_TIMEOUT)  # the bug: it never exits
        asker.join(timeout=EXIT_TIMEOUT)
        assert answer.get("vm", {}).get("state") == "unresponsive", answer
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_second_agent_on_the_same_state_dir_refuses_to_start(agent: Agent,
                                                               tmp_path: Path) -> None:
    _bare_vm(agent, "one")
    second = tmp_path / "second"
    second.mkdir()
    cfg = json.loads(agent.config.read_text())
    config = second / "hvagent.yaml"
    config.write_text(json.dumps({**cfg, "listen": str(second / "hv.sock"),
                                  "run_dir": str(second / "run"),
                                  "log_dir": str(second / "log")}))
    assert agent.proc is not None
    line = _one_line(_serve_once(config))  # the bug: it runs (and the wait times out)
    assert f"state directory {cfg['state_dir']} is in use by pid {agent.proc.pid}" in line
    assert not (second / "hv.sock").exists()
    # the first is unaffected
    assert agent.ok("GET", "/vms/one")["state"] == "running"
    # the lock ends with the agent, not with its VMs (QEMU must not inherit it)
    agent.stop()
    agent.start()
    assert agent.ok("GET", "/vms/one")["state"] == "running"


def test_the_tls_port_in_use_is_one_line(tmp_path: Path) -> None:
    agent = SecureAgent(tmp_path)
    taken = socket.create_server(("127.0.0.1", agent.port))
    try:
        line = _one_line(_serve_once(agent.config))
    finally:
        taken.close()
        agent.root_client.close()
    assert line == (f"hvagent: tls.listen: cannot listen on 127.0.0.1:{agent.port}: "
                    "Address already in use")
    assert not agent.socket.exists()


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:-1",
                                    "[::1]", "::1:8443", ":8443", "no-such-host.invalid:8443"])
def test_a_bad_tls_listen_address_is_one_line(tmp_path: Path, listen: str) -> None:
    agent = SecureAgent(tmp_path)
    agent.root_client.close()
    cfg = json.loads(agent.config.read_text())
    agent.config.write_text(json.dumps({**cfg, "tls": {"listen": listen}}))
    line = _one_line(_serve_once(agent.config))
    assert "tls.listen" in line and listen in line
    assert not agent.socket.exists()


def _hvctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvagent.cli.hvctl", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, **env})


def test_a_pinned_hvctl_keeps_working_across_agent_restarts(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir()
    agent = SecureAgent(tmp_path / "agent")
    agent.start()
    try:
        token = agent.token("ann", "Auditor")["token"]
        pin = agent.fingerprint()
        env = {"HVCTL_CONFIG_DIR": str(tmp_path / "hvctl"), "HVCTL_TOKEN": token}
        r = _hvctl("--url", agent.url, "--ca-fingerprint", pin, "--json", "vm", "list",
                   env=env)
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
        ca = agent.ca_pem.read_bytes()
        for restart, renew in enumerate((False, True)):
            agent.stop()
            # a fresh log: start() waits for the new agent's "listening" line
            (agent.root / "agent.log").rename(agent.root / f"agent.{restart}.log")
            if renew:  # a new server certificate (deleted, expired): the same CA signs it
                (agent.state / "tls" / "server.pem").unlink()
                (agent.state / "tls" / "server.key").unlink()
            agent.start()
            assert agent.fingerprint() == pin
            r = _hvctl("--url", agent.url, "--json", "vm", "list", env=env)  # no pin given
            assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
            assert agent.ca_pem.read_bytes() == ca
    finally:
        agent.stop()


def test_systemd_hears_ready_only_once_both_listeners_answer(tmp_path: Path) -> None:
    """hvagent.service is Type=notify: the unit is active (and the image checks start)
    only when the agent has said READY=1 on $NOTIFY_SOCKET, and by then the unix socket
    and the HTTPS port both answer."""
    agent = SecureAgent(tmp_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(ANSWER_TIMEOUT)
    out = (tmp_path / "agent.log").open("ab")
    proc = subprocess.Popen([*HVAGENT, "serve", "--config", str(agent.config)], stdout=out,
                            stderr=out, cwd=REPO,
                            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        message = notify.recv(4096).decode()
        assert "READY=1" in message.splitlines(), message
        # No wait: what READY promises holds the moment it arrives.
        assert agent.root_client.get("/agent").status_code == 200
        with socket.create_connection(("127.0.0.1", agent.port), timeout=ANSWER_TIMEOUT):
            pass
        notify.settimeout(2)
        with pytest.raises(TimeoutError):  # said once
            notify.recv(4096)
    finally:
        notify.close()
        agent.root_client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=EXIT_TIMEOUT)
