"""Managed networks (nat, isolated, bridged) against a real agent inside a network
namespace the test makes, joined by a veth pair to an "outside" namespace that runs a
TCP server: real bridges, a real dnsmasq per network, real nftables masquerading, real
tiny guests that take their address by DHCP. No address leaves the two namespaces."""

from __future__ import annotations

import json
import os
import socket
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

NAT = {"name": "default", "kind": "nat", "address": "192.168.150.1/24"}
OUTSIDE, AGENT_SIDE = "10.201.0.1", "10.201.0.2"
SERVER_PORT = 7070
GREETING = "hello-from-outside"
ISOLATED_NET = "10.202.0.0/24"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=60, capture_output=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetnsAgent, str]]:
    """(the agent, the outside namespace). The agent's namespace routes everything to
    the outside one; the outside one has no route back to any guest network, so a guest
    reaches its server only when masqueraded."""
    inside, outside = f"hvt-net-{os.getpid()}", f"hvt-out-{os.getpid()}"
    for ns in (inside, outside):
        _ip("netns", "add", ns)
    server = None
    agent = None
    try:
        veth_in, veth_out = f"hvtv{os.getpid() % 100000}a", f"hvtv{os.getpid() % 100000}b"
        _ip("link", "add", veth_in, "netns", inside, "type", "veth", "peer", "name", veth_out,
            "netns", outside)
        for ns, dev, addr in ((inside, veth_in, AGENT_SIDE), (outside, veth_out, OUTSIDE)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", inside, "route", "add", "default", "via", OUTSIDE)
        # The way back to the isolated network only: its guests (which route to the
        # outside through the host) are then kept in by the agent's rules alone.
        _ip("-n", outside, "route", "add", ISOLATED_NET, "via", AGENT_SIDE)
        server = subprocess.Popen(
            ["ip", "netns", "exec", outside, "socat",
             f"TCP-LISTEN:{SERVER_PORT},bind={OUTSIDE},fork,reuseaddr",
             f"SYSTEM:echo {GREETING}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        agent = NetnsAgent(tmp_path_factory.mktemp("net"), inside,
                           {"networks": {"VMCreator": ["default"]}}, {"networks": [NAT]})
        agent.start()
        agent.tokens = {"carol": agent.token("carol", "VMCreator")["token"]}
        yield agent, outside
    finally:
        if agent is not None:
            for vm in agent.root_client.get("/vms").json():
                if vm["state"] in ("running", "paused"):
                    agent.root_client.post(f"/vms/{vm['name']}/stop", json={"force": True})
            agent.stop()
            subprocess.run(["pkill", "-f", "--", f"--pid-file={agent.root}/"], timeout=60,
                           check=False)
        if server is not None:
            server.kill()
            server.wait(timeout=60)
        for ns in (inside, outside):
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=60)


def _guest(agent: NetnsAgent, tiny: tinyguest.TinyGuest, name: str, nic: dict[str, Any],
           resolve: tuple[str, ...] = (), routes: dict[str, str] | None = None) -> Path:
    r = agent.root_client.post("/vms", json={
        "name": name, "vcpus": 1, "memory_mib": 256, "kernel": str(tiny.kernel),
        "initrd": str(tiny.initrd),
        "append": tiny.append(dhcp=True, resolve=resolve, routes=routes,
                              tcp=(f"{OUTSIDE}:{SERVER_PORT}",)),
        "nics": [nic]})
    assert r.status_code == 201, r.text
    return Path(r.json()["serial_log"])


def _wait(log: Path, done: Any, what: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if done(text):
            return text
        assert time.monotonic() < deadline, f"{what} within {timeout}s:\n{text[-2000:]}"
        time.sleep(0.5)


def _dnsmasq_pids(agent: NetnsAgent) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (agent.root / "run" / "networks").glob("*.pid")}


def test_nat_and_isolated_networks(world: tuple[NetnsAgent, str],
                                   tiny_guest: tinyguest.TinyGuest) -> None:
    agent, _ = world
    c = agent.root_client
    nets = {n["name"]: n for n in c.get("/networks").json()}
    assert nets["default"]["declared"] and nets["default"]["dhcp_server"] == "running"
    r = c.post("/networks", json={"name": "iso", "kind": "isolated",
                                  "address": "10.202.0.1/24"})
    assert r.status_code == 201, r.text
    iso_bridge = r.json()["bridge"]

    # A NIC that names no network is on `default`.
    nat_log = _guest(agent, tiny_guest, "n-nat", {}, resolve=(socket.gethostname(),))
    assert c.get("/vms/n-nat").json()["spec"]["nics"][0]["network"] == "default"
    # DHCP gives it no router: it is given one to the outside through the host, which
    # the outside routes back, so only the isolated network's rules keep it in.
    iso_log = _guest(agent, tiny_guest, "n-iso", {"network": "iso"},
                     routes={"10.201.0.0/24": "10.202.0.1"})
    for name in ("n-nat", "n-iso"):
        r = c.post(f"/vms/{name}/start")
        assert r.status_code == 200, r.text
    try:
        text = _wait(nat_log, lambda t: tinyguest.parse_tcp(t), "the nat guest tried TCP")
        lease = tinyguest.parse_dhcp(text)
        assert lease and lease.get("ip", "").startswith("192.168.150."), text[-2000:]
        assert lease["router"] == "192.168.150.1" and lease["dns"] == "192.168.150.1"
        text = _wait(nat_log, lambda t: any(ok for _, ok in tinyguest.parse_tcp(t)),
                     "the nat guest reached the outside server")
        assert any(d == GREETING for _, d in tinyguest.parse_tcp(text)), text[-2000:]
        # A lookup can time out on a loaded machine: one answer is enough, and every
        # answer is the host's address on the network.
        text = _wait(nat_log, lambda t: any(ip for _, ip in tinyguest.parse_resolves(t)),
                     "the nat guest resolved the host's name")
        answers = {ip for _, ip in tinyguest.parse_resolves(text) if ip}
        assert answers == {"192.168.150.1"}, tinyguest.parse_resolves(text)

        text = _wait(iso_log, lambda t: len(tinyguest.parse_tcp(t)) >= 3,
                     "three TCP attempts of the isolated guest")
        lease = tinyguest.parse_dhcp(text)
        assert lease and lease.get("ip", "").startswith("10.202.0."), text[-2000:]
        assert not lease["router"], lease
        assert not any(d for _, d in tinyguest.parse_tcp(text)), text[-2000:]

        # A used network is not deleted, and nothing changes.
        before = _dnsmasq_pids(agent)
        r = c.delete("/networks/iso")
        assert r.status_code == 409 and "n-iso" in r.json()["detail"], r.text
        assert c.get("/networks/iso").status_code == 200
        assert iso_bridge in agent.links()
        r = c.delete("/networks/default")
        assert r.status_code == 409 and "configuration" in r.json()["detail"], r.text

        # An agent restart keeps the networks, their dnsmasqs and the guests' taps.
        agent.restart()
        c = agent.root_client
        assert _dnsmasq_pids(agent) == before
        assert {n["name"] for n in c.get("/networks").json()} == {"default", "iso"}
        seen = len(tinyguest.parse_tcp(nat_log.read_text()))
        _wait(nat_log, lambda t: any(ok for _, ok in tinyguest.parse_tcp(t)[seen:]),
              "the nat guest reached the outside server after the agent restart")
    finally:
        for name in ("n-nat", "n-iso"):
            c.post(f"/vms/{name}/stop", json={"force": True})
    for name in ("n-nat", "n-iso"):
        assert c.delete(f"/vms/{name}").status_code in (200, 204)
    r = c.delete("/networks/iso")
    assert r.status_code == 204, r.text
    assert iso_bridge not in agent.links()
    assert "iso" not in _dnsmasq_pids(agent)
    rules = agent.run("nft", "list", "table", "ip", "hvagent").stdout
    assert iso_bridge not in rules and "masquerade" in rules, rules


def test_bad_networks_are_refused_and_nothing_is_made(
        world: tuple[NetnsAgent, str]) -> None:
    agent, _ = world
    c = agent.root_client
    links = set(agent.links())
    for body, status, words in (
        ({"name": "x", "kind": "nat"}, 422, "needs an address"),
        ({"name": "x", "kind": "nat", "address": "10.9.0.0/24"}, 422, "address"),
        ({"name": "x", "kind": "nat", "address": "192.168.150.9/16"}, 409, "overlaps"),
        ({"name": "x", "kind": "bridged", "uplink": "nosuch0"}, 400, "uplink: nosuch0"),
        ({"name": "user", "kind": "bridged"}, 422, "built-in"),
        ({"name": "default", "kind": "bridged"}, 409, "exists"),
        ({"name": "x", "kind": "isolated", "address": "10.9.0.1/24",
          "dhcp_start": "10.9.1.5"}, 422, "dhcp_start"),
    ):
        r = c.post("/networks", json=body)
        assert r.status_code == status and words in r.text, (body, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    assert set(agent.links()) == links
    assert c.get("/networks/x").status_code == 404

    # A NIC naming a missing network, or a VLAN on a nat one: one line, no VM.
    for nic, words in (({"network": "nosuch"}, "nics[0].network"),
                       ({"network": "default", "vlan": 10}, "nics[0].vlan")):
        r = c.post("/vms", json={"name": "n-bad", "memory_mib": 64, "nics": [nic]})
        assert r.status_code == 400 and words in r.json()["detail"], r.text
        assert c.get("/vms/n-bad").status_code == 404

    # A MAC names its NIC's tap: one host has it once (create and hot-add alike).
    mac = "52:54:00:0c:00:01"
    r = c.post("/vms", json={"name": "n-m1", "memory_mib": 64, "nics": [{"mac": mac}]})
    assert r.status_code == 201, r.text
    r = c.post("/vms", json={"name": "n-m2", "memory_mib": 64, "nics": [{"mac": mac}]})
    assert r.status_code == 409 and "n-m1" in r.json()["detail"], r.text
    assert c.get("/vms/n-m2").status_code == 404
    r = c.post("/vms", json={"name": "n-m2", "memory_mib": 64})
    assert r.status_code == 201, r.text
    r = c.post("/vms/n-m2/nics", json={"mac": mac.upper()})
    assert r.status_code == 409 and "nic.mac" in r.json()["detail"], r.text
    assert c.get("/vms/n-m2").json()["spec"]["nics"] == []
    for vm in ("n-m1", "n-m2"):
        assert c.delete(f"/vms/{vm}").status_code in (200, 204)


def test_bridged_network_vlans_and_policy(world: tuple[NetnsAgent, str]) -> None:
    """A bridged network's NICs: one without a VLAN on its bridge, one with a VLAN on
    that VLAN's bridge (per-VLAN-bridge mode here), moved live; the policy's networks
    rule decides who may attach to which network."""
    agent, _ = world
    c = agent.root_client
    r = c.post("/networks", json={"name": "lan", "kind": "bridged"})
    assert r.status_code == 201, r.text
    info = r.json()
    bridge = info["bridge"]
    assert info["vlan_mode"] == "per-vlan-bridge" and info["dhcp_server"] == "none"
    r = c.post("/vms", json={"name": "n-br", "memory_mib": 64, "nics": [
        {"network": "lan", "mac": "52:54:00:0b:00:01"},
        {"network": "lan", "vlan": 30, "mac": "52:54:00:0b:00:02"}]})
    assert r.status_code == 201, r.text
    # A trunk needs a VLAN-aware bridge, which this kernel cannot make: one line.
    r = c.post("/vms", json={"name": "n-trunk", "memory_mib": 64, "nics": [
        {"network": "lan", "trunk": [10, 20]}]})
    assert r.status_code == 400 and "nics[0].trunk" in r.json()["detail"], r.text
    assert "VLAN-aware" in r.json()["detail"] and c.get("/vms/n-trunk").status_code == 404
    assert c.post("/vms/n-br/start").status_code == 200
    try:
        links = agent.links()
        assert links["hv5254000b0001"] == bridge
        assert links["hv5254000b0002"] == f"{bridge}v30"
        r = c.put("/vms/n-br/nics/52:54:00:0b:00:02", json={"vlan": 31})
        assert r.status_code == 200, r.text
        links = agent.links()
        assert links["hv5254000b0002"] == f"{bridge}v31" and f"{bridge}v30" not in links
    finally:
        c.post("/vms/n-br/stop", json={"force": True})
    links = agent.links()
    assert f"{bridge}v31" not in links and bridge in links  # the network's bridge stays
    assert c.delete("/vms/n-br").status_code in (200, 204)

    # VMCreator may attach to `default` only (policy networks.VMCreator), and may not
    # create networks (no Network.Allocate), but sees them (Network.Audit).
    with agent.uds(agent.tokens["carol"]) as carol:
        r = carol.post("/vms", json={"name": "n-carol", "memory_mib": 64,
                                     "nics": [{"network": "lan"}]})
        assert r.status_code == 403 and "networks.VMCreator=default" in r.text, r.text
        assert c.get("/vms/n-carol").status_code == 404
        r = carol.post("/vms", json={"name": "n-carol", "memory_mib": 64, "nics": [{}]})
        assert r.status_code == 201, r.text
        assert r.json()["spec"]["nics"][0]["network"] == "default"
        r = carol.post("/vms/n-carol/nics", json={"network": "lan"})
        assert r.status_code == 403, r.text
        r = carol.post("/networks", json={"name": "mine", "kind": "bridged"})
        assert r.status_code == 403, r.text
        assert {n["name"] for n in carol.get("/networks").json()} >= {"default", "lan"}
        assert carol.delete("/vms/n-carol").status_code in (200, 204)
    assert c.delete("/networks/lan").status_code == 204
    assert bridge not in agent.links()


def _hvctl(agent: NetnsAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hvagent.cli.hvctl", "--socket", str(agent.socket), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO)


def test_hvctl_net(world: tuple[NetnsAgent, str]) -> None:
    agent, _ = world
    r = _hvctl(agent, "net", "create", "lab", "--kind", "isolated", "--address",
               "10.203.0.1/24", "--dhcp-start", "10.203.0.100", "--dhcp-end", "10.203.0.110")
    assert r.returncode == 0, r.stderr
    assert "10.203.0.100-10.203.0.110 (running)" in r.stdout, r.stdout
    r = _hvctl(agent, "net", "list")
    assert r.returncode == 0 and "lab" in r.stdout and "default" in r.stdout, r.stdout
    r = _hvctl(agent, "net", "create", "lab2", "--kind", "isolated")
    assert r.returncode != 0 and "needs an address" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _hvctl(agent, "vm", "create", "n-cli", "--vcpus", "1", "--memory", "64", "--nic", "lab")
    assert r.returncode == 0, r.stderr
    r = _hvctl(agent, "vm", "create", "n-cli2", "--vcpus", "1", "--memory", "64",
               "--nic", "lab,vlan=5")
    assert r.returncode != 0 and "nics[0].vlan" in r.stderr, r.stderr
    mac = agent.root_client.get("/vms/n-cli").json()["spec"]["nics"][0]["mac"]
    r = _hvctl(agent, "vm", "set-nic-vlan", "n-cli", mac, "5")
    assert r.returncode != 0 and "no VLAN" in r.stderr, r.stderr
    r = _hvctl(agent, "net", "delete", "lab")
    assert r.returncode != 0 and "n-cli" in r.stderr, r.stderr
    r = _hvctl(agent, "--json", "net", "show", "lab")
    assert json.loads(r.stdout)["vms"] == ["n-cli"], r.stdout
    assert _hvctl(agent, "vm", "delete", "n-cli").returncode == 0
    r = _hvctl(agent, "net", "delete", "lab")
    assert r.returncode == 0, r.stderr
    assert agent.root_client.get("/networks/lab").status_code == 404
