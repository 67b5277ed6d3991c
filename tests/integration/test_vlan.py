"""VLAN networking between child VMs and the host policy's VLAN rule, against a real
agent running inside a network namespace of its own (so its bridges and taps never touch
the host's network): real netlink, real QEMU, real tiny guests pinging each other."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinyguest
from netns_agent import NetnsAgent
from secure_agent import REPO

pytestmark = pytest.mark.integration

POLICY = {"vlans": {"VMCreator": [10]}}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsAgent]:
    netns = f"hvt-vlan-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=60)
    try:
        # The TLS listener binds 127.0.0.1 inside the namespace.
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=60)
        a = NetnsAgent(tmp_path_factory.mktemp("vlan"), netns, POLICY)
        a.start()
        # Made after the start: grants stored while the agent runs count at once.
        a.tokens = {"carol": a.token("carol", "VMCreator")["token"],
                    "ada": a.token("ada", "Administrator")["token"],
                    "oscar": a.token("oscar", "VMOperator", path="/vms")["token"]}
        try:
            yield a
        finally:
            for vm in a.root_client.get("/vms").json():
                if vm["state"] in ("running", "paused"):
                    a.root_client.post(f"/vms/{vm['name']}/stop", json={"force": True})
            a.stop()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=60)


def _ours(links: dict[str, str | None]) -> dict[str, str | None]:
    return {k: v for k, v in links.items() if k.startswith("hv")}


def test_policy_refuses_a_forbidden_vlan_and_creates_nothing(agent: NetnsAgent) -> None:
    carol, admin = agent.tokens["carol"], agent.tokens["ada"]
    with agent.uds(carol) as c:
        body: dict[str, Any] = {"name": "v-deny", "memory_mib": 64,
                                "disks": [{"size": "16M"}], "nics": [{"vlan": 20}]}
        r = c.post("/vms", json=body)
        assert r.status_code == 403, r.text
        detail = r.json()["detail"]
        assert "vlans.VMCreator=10" in detail and "VLAN 20" in detail, detail
        assert agent.root_client.get("/vms/v-deny").status_code == 404
        assert not list((agent.root / "images").glob("v-deny*"))
        assert _ours(agent.links()) == {}

        r = c.post("/vms", json={**body, "name": "v-ok", "nics": [{"vlan": 10}]})
        assert r.status_code == 201, r.text
        nic = r.json()["spec"]["nics"][0]
        assert (nic["network"], nic["vlan"]) == ("bridge", 10)
        tap = "hv" + nic["mac"].replace(":", "")
        assert _ours(agent.links()) == {}  # taps exist only while QEMU runs

        r = c.post("/vms/v-ok/start")
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        assert _ours(agent.links()) == {"hvbr10": None, tap: "hvbr10"}

        # Hot-add on a forbidden VLAN: refused, nothing plugged, spec unchanged.
        r = c.post("/vms/v-ok/nics", json={"vlan": 20})
        assert r.status_code == 403, r.text
        assert "VLAN 20" in r.json()["detail"]
        assert len(c.get("/vms/v-ok").json()["spec"]["nics"]) == 1
        assert _ours(agent.links()) == {"hvbr10": None, tap: "hvbr10"}

        # Hot-add and hot-remove on the allowed VLAN: a second port on hvbr10.
        r = c.post("/vms/v-ok/nics", json={"vlan": 10, "mac": "52:54:00:0a:00:02"})
        assert r.status_code == 201, r.text
        assert agent.links().get("hv5254000a0002") == "hvbr10"

        r = c.post("/vms/v-ok/stop", json={"force": True})
        assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
        assert _ours(agent.links()) == {}  # taps and the emptied bridge are gone
        assert c.delete("/vms/v-ok").status_code in (200, 204)

    # Administrator (and root) may use any VLAN.
    with agent.uds(admin) as a:
        r = a.post("/vms", json={"name": "v-admin", "memory_mib": 64, "nics": [{"vlan": 30}]})
        assert r.status_code == 201, r.text
        assert a.delete("/vms/v-admin").status_code in (200, 204)


def _wait_pings(logs: dict[str, Path], enough: dict[str, int],
                timeout: float = 300) -> dict[str, list[tuple[str, bool]]]:
    """Poll the guests' serial logs until each has `enough[name]` ping results."""
    deadline = time.monotonic() + timeout
    while True:
        pings = {n: tinyguest.parse_pings(p.read_text(errors="replace") if p.exists() else "")
                 for n, p in logs.items()}
        if all(len(pings[n]) >= k for n, k in enough.items()):
            return pings
        if time.monotonic() > deadline:
            raise AssertionError(f"not enough ping results in {timeout}s: {pings}")
        time.sleep(0.5)


def test_guests_on_one_vlan_reach_each_other_and_not_another_vlan(
        agent: NetnsAgent, tiny_guest: tinyguest.TinyGuest) -> None:
    guests = {  # name: (vlan, address, peers it pings)
        "v-a": (10, "10.77.0.1/24", ("10.77.0.2", "10.77.0.3")),
        "v-b": (10, "10.77.0.2/24", ("10.77.0.1",)),
        "v-c": (20, "10.77.0.3/24", ("10.77.0.1", "10.77.0.4")),
        # C's own VLAN peer: shows C's network works, so only the VLAN keeps A and C apart.
        "v-d": (20, "10.77.0.4/24", ("10.77.0.3",)),
    }
    c = agent.root_client
    logs: dict[str, Path] = {}
    for name, (vlan, ip, peers) in guests.items():
        r = c.post("/vms", json={
            "name": name, "vcpus": 1, "memory_mib": 256, "kernel": str(tiny_guest.kernel),
            "initrd": str(tiny_guest.initrd), "append": tiny_guest.append(ip=ip, ping=peers),
            "nics": [{"vlan": vlan}]})
        assert r.status_code == 201, r.text
        logs[name] = Path(r.json()["serial_log"])
    try:
        for name in guests:
            r = c.post(f"/vms/{name}/start")
            assert r.status_code == 200, r.text
        links = _ours(agent.links())
        assert sorted(v for v in links.values() if v) == ["hvbr10", "hvbr10", "hvbr20",
                                                          "hvbr20"]

        # A and B (VLAN 10) reach each other, so do C and D (VLAN 20).
        deadline = time.monotonic() + 300
        while True:
            pings = {n: tinyguest.parse_pings(p.read_text(errors="replace"))
                     for n, p in logs.items()}
            if (("10.77.0.2", True) in pings["v-a"] and ("10.77.0.1", True) in pings["v-b"]
                    and ("10.77.0.4", True) in pings["v-c"]):
                break
            assert time.monotonic() < deadline, f"peers on a VLAN never met: {pings}"
            time.sleep(0.5)
        # Once A-B works, C (VLAN 20, same subnet) and A never reach each other: every
        # attempt from here on, at least three rounds each way, fails.
        seen = {n: len(p) for n, p in pings.items()}
        pings = _wait_pings(logs, {"v-a": seen["v-a"] + 6, "v-c": seen["v-c"] + 6})
        a_to_c = [ok for peer, ok in pings["v-a"] if peer == "10.77.0.3"]
        c_to_a = [ok for peer, ok in pings["v-c"] if peer == "10.77.0.1"]
        assert len(a_to_c) >= 3 and not any(a_to_c), pings["v-a"]
        assert len(c_to_a) >= 3 and not any(c_to_a), pings["v-c"]
        a_to_b = [ok for peer, ok in pings["v-a"][seen["v-a"]:] if peer == "10.77.0.2"]
        assert a_to_b and all(a_to_b), pings["v-a"]
        c_to_d = [ok for peer, ok in pings["v-c"][seen["v-c"]:] if peer == "10.77.0.4"]
        assert c_to_d and all(c_to_d), pings["v-c"]
        print(f"\nA->B ok {len(a_to_b)}/{len(a_to_b)} after first contact; "
              f"A->C ok 0/{len(a_to_c)}; C->A ok 0/{len(c_to_a)}")

        # Moving C's tap to VLAN 10's bridge while C runs puts C on VLAN 10 at once.
        mac = next(n["mac"] for n in c.get("/vms/v-c").json()["spec"]["nics"])
        tap = "hv" + mac.replace(":", "")
        moved = c.put(f"/vms/v-c/nics/{mac}", json={"vlan": 10})
        assert moved.status_code == 200, moved.text
        assert [n["vlan"] for n in moved.json()["vm"]["spec"]["nics"]] == [10]
        assert agent.links()[tap] == "hvbr10"
        deadline = time.monotonic() + 120
        while ("10.77.0.1", True) not in tinyguest.parse_pings(logs["v-c"].read_text()):
            assert time.monotonic() < deadline, "C never reached A after the move"
            time.sleep(0.5)
        # D, left on VLAN 20, is cut off from C from then on.
        seen = {n: len(tinyguest.parse_pings(p.read_text())) for n, p in logs.items()}
        pings = _wait_pings(logs, {"v-d": seen["v-d"] + 3, "v-c": seen["v-c"] + 3})
        assert not any(ok for _, ok in pings["v-d"][seen["v-d"]:]), pings["v-d"]

        # An agent restart puts the taps back where the specs say: C's tap, moved back
        # to VLAN 20's bridge by hand while the agent was down, returns to VLAN 10.
        agent.stop()
        subprocess.run(["ip", "-n", agent.netns, "link", "set", tap, "master", "hvbr20"],
                       check=True, timeout=60)
        agent.restart()
        c = agent.root_client
        assert agent.links()[tap] == "hvbr10"
        seen = {n: len(tinyguest.parse_pings(p.read_text())) for n, p in logs.items()}
        pings = _wait_pings(logs, {"v-c": seen["v-c"] + 4, "v-d": seen["v-d"] + 3})
        assert ("10.77.0.1", True) in pings["v-c"][seen["v-c"]:], pings["v-c"]
        assert not any(ok for _, ok in pings["v-d"][seen["v-d"]:]), pings["v-d"]
    finally:
        for name in guests:
            c.post(f"/vms/{name}/stop", json={"force": True})
    assert _ours(agent.links()) == {}
    for name in guests:
        assert c.delete(f"/vms/{name}").status_code in (200, 204)


def _hvctl(agent: NetnsAgent, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hvagent.cli.hvctl", "--socket", str(agent.socket),
         "--token", token, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_hvctl_nic_vlan(agent: NetnsAgent) -> None:
    carol = agent.tokens["carol"]
    r = _hvctl(agent, carol, "vm", "create", "v-cli", "--vcpus", "1", "--memory", "64",
               "--nic", "vlan=10,mac=52:54:00:0a:0c:01", "--nic", "user")
    assert r.returncode == 0, r.stderr
    nics = agent.root_client.get("/vms/v-cli").json()["spec"]["nics"]
    assert [(n["network"], n["vlan"], n["mac"]) for n in nics][0] == (
        "bridge", 10, "52:54:00:0a:0c:01")
    assert nics[1]["network"] == "user" and nics[1]["vlan"] is None
    assert "VLAN 10" in _hvctl(agent, carol, "vm", "show", "v-cli").stdout

    r = _hvctl(agent, carol, "vm", "add-nic", "v-cli", "--nic", "vlan=20")
    assert r.returncode != 0 and "VLAN 20" in r.stderr, (r.stdout, r.stderr)
    r = _hvctl(agent, carol, "vm", "add-nic", "v-cli", "--nic", "vlan=10")
    assert r.returncode == 0, r.stderr
    assert [n["vlan"] for n in agent.root_client.get("/vms/v-cli").json()["spec"]["nics"]] \
        == [10, None, 10]

    r = _hvctl(agent, carol, "vm", "create", "v-bad", "--vcpus", "1", "--memory", "64",
               "--nic", "vlan=5000")
    assert r.returncode == 2 and "--nic" in r.stderr and "1..4094" in r.stderr, r.stderr
    assert agent.root_client.delete("/vms/v-cli").status_code in (200, 204)


def test_operator_reconfigures_a_vm_on_a_vlan_it_may_not_add(agent: NetnsAgent) -> None:
    """The VLAN rule guards what a change adds: a VMOperator allowed no VLAN still grows
    the memory of a VM root put on VLAN 20, but cannot add a NIC on it."""
    c = agent.root_client
    r = c.post("/vms", json={"name": "v-op", "memory_mib": 128, "max_memory_mib": 256,
                             "nics": [{"vlan": 20}]})
    assert r.status_code == 201, r.text
    assert c.post("/vms/v-op/start").status_code == 200
    try:
        with agent.uds(agent.tokens["oscar"]) as oscar:
            r = oscar.put("/vms/v-op/memory", json={"memory_mib": 256})
            assert r.status_code == 200, r.text
            r = oscar.post("/vms/v-op/nics", json={"vlan": 20})
            assert r.status_code == 403, r.text
            assert "vlans.VMOperator=none" in r.json()["detail"], r.text
    finally:
        c.post("/vms/v-op/stop", json={"force": True})
    assert _ours(agent.links()) == {}
    assert c.delete("/vms/v-op").status_code in (200, 204)
