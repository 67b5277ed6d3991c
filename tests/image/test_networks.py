"""VLANs inside the booted host image, whose Debian kernel has bridge VLAN filtering: a
bridged network there is VLAN-aware, and child VMs (tiny guests, nested) started
through the agent on it are separated by VLAN, and joined when one moves, live.

The tiny guest (a Debian kernel and a busybox initramfs, tests/integration/tinyguest.py)
is built on the machine that runs the checks and copied into the agent's storage."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from testinfra.host import Host

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
import tinyguest  # noqa: E402

NETWORK = "vlans"
GUESTS = {  # name: (vlan, address, peers it pings)
    "nv-a": (10, "10.77.0.1/24", ("10.77.0.2", "10.77.0.3")),
    "nv-b": (10, "10.77.0.2/24", ("10.77.0.1",)),
    "nv-c": (20, "10.77.0.3/24", ("10.77.0.1",)),
    # VLAN 20's own peer, on another subnet: the router reaches it over its trunk.
    "nv-d": (20, "10.78.0.4/24", ("10.78.0.9",)),
}
# A router guest on a trunk port (VLANs 10 and 20 tagged, no native VLAN): one 802.1Q
# interface per VLAN, on the subnet of each side.
ROUTER = "nv-r"
TRUNK = (10, 20)
ROUTER_VLANS = {10: "10.77.0.9/24", 20: "10.78.0.9/24"}
ROUTER_PINGS = ("10.77.0.1", "10.78.0.4")
PING_WAIT_S = 300


@pytest.fixture(scope="module")
def guest_files(host: Host, request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(kernel, initrd) of the tiny guest, in the host's storage_dir."""
    tiny = tinyguest.build(tmp_path_factory.mktemp("tinyguest"))
    storage = yaml.safe_load(host.file("/etc/hvagent/hvagent.yaml").content_string).get(
        "storage_dir", "/var/lib/hvagent/images")
    port = request.config.getoption("hosts").rsplit(":", 1)[1]
    dest = [f"{storage}/tiny-vmlinuz", f"{storage}/tiny-initrd.gz"]
    for src, dst in zip((tiny.kernel, tiny.initrd), dest, strict=True):
        subprocess.run(["scp", "-q", "-F", request.config.getoption("ssh_config"), "-P", port,
                        str(src), f"root@127.0.0.1:{dst}"], check=True, timeout=300)
    return dest[0], dest[1]


@pytest.fixture
def network(host: Host) -> Iterator[dict[str, object]]:
    made = host.run(f"hvctl --json net create {NETWORK} --kind bridged")
    assert made.rc == 0, made.stderr
    yield json.loads(made.stdout)
    for name in (*GUESTS, ROUTER):
        host.run(f"hvctl vm stop {name} --force")
        host.run(f"hvctl vm delete {name}")
    host.run(f"hvctl net delete {NETWORK}")


def _pings(host: Host, logs: dict[str, str]) -> dict[str, list[tuple[str, bool]]]:
    return {n: tinyguest.parse_pings(host.run(f"cat {shlex.quote(p)}").stdout)
            for n, p in logs.items()}


def _until(host: Host, logs: dict[str, str], done: object, what: str) -> dict[str, list]:
    deadline = time.monotonic() + PING_WAIT_S
    while True:
        pings = _pings(host, logs)
        if done(pings):  # type: ignore[operator]
            return pings
        assert time.monotonic() < deadline, f"{what} within {PING_WAIT_S}s: {pings}"
        time.sleep(2)


def test_vlan_aware_bridge_separates_and_joins_guests(
        host: Host, guest_files: tuple[str, str], network: dict[str, object]) -> None:
    assert network["vlan_mode"] == "vlan-aware", network
    bridge = str(network["bridge"])
    assert host.check_output(f"cat /sys/class/net/{bridge}/bridge/vlan_filtering") == "1"
    kernel, initrd = guest_files
    logs: dict[str, str] = {}
    for name, (vlan, ip, peers) in GUESTS.items():
        append = tinyguest.TinyGuest.append(ip=ip, ping=peers)
        made = host.run(f"hvctl --json vm create {name} --vcpus 1 --memory 160 "
                        f"--kernel {kernel} --initrd {initrd} --append {shlex.quote(append)} "
                        f"--nic {NETWORK},vlan={vlan}")
        assert made.rc == 0, made.stderr
        logs[name] = json.loads(made.stdout)["serial_log"]
    append = tinyguest.TinyGuest.append(vlans=ROUTER_VLANS, ping=ROUTER_PINGS)
    made = host.run(f"hvctl --json vm create {ROUTER} --vcpus 1 --memory 160 "
                    f"--kernel {kernel} --initrd {initrd} --append {shlex.quote(append)} "
                    f"--nic {NETWORK},trunk={':'.join(map(str, TRUNK))}")
    assert made.rc == 0, made.stderr
    logs[ROUTER] = json.loads(made.stdout)["serial_log"]
    for name in (*GUESTS, ROUTER):
        started = host.run(f"hvctl vm start {name}")
        assert started.rc == 0, started.stderr

    # Each tap is an access port of its VLAN (untagged, pvid) on the one bridge.
    ports = json.loads(host.check_output("bridge -j vlan show"))
    macs = {n: json.loads(host.check_output(f"hvctl --json vm show {n}"))["spec"]["nics"][0]
            ["mac"] for n in (*GUESTS, ROUTER)}
    taps = {n: "hv" + m.replace(":", "") for n, m in macs.items()}
    by_port = {p["ifname"]: p["vlans"] for p in ports}
    for name, (vlan, _, _) in GUESTS.items():
        assert [(v["vlan"], sorted(v.get("flags", []))) for v in by_port[taps[name]]] == [
            (vlan, ["Egress Untagged", "PVID"])], by_port[taps[name]]
    # The trunk: both VLANs tagged, nothing untagged.
    assert [(v["vlan"], v.get("flags", [])) for v in by_port[taps[ROUTER]]] == [
        (10, []), (20, [])], by_port[taps[ROUTER]]
    links = host.check_output(f"ip -o link show master {bridge}")
    assert all(t in links for t in taps.values()), links

    # A and B (VLAN 10) meet; C (VLAN 20) never reaches A, nor A C.
    pings = _until(host, logs, lambda p: ("10.77.0.2", True) in p["nv-a"]
                   and ("10.77.0.1", True) in p["nv-b"], "A and B on VLAN 10 meet")
    seen = {n: len(p) for n, p in pings.items()}
    pings = _until(host, logs, lambda p: len(p["nv-a"]) >= seen["nv-a"] + 6
                   and len(p["nv-c"]) >= seen["nv-c"] + 3, "three more rounds")
    assert not any(ok for peer, ok in pings["nv-a"] if peer == "10.77.0.3"), pings["nv-a"]
    assert not any(ok for _, ok in pings["nv-c"]), pings["nv-c"]
    # The router reaches both sides over its trunk.
    _until(host, logs, lambda p: {("10.77.0.1", True), ("10.78.0.4", True)} <= set(p[ROUTER]),
           "the trunk router reaches VLAN 10 and VLAN 20")

    # C moved to VLAN 10, live: it reaches A.
    moved = host.run(f"hvctl vm set-nic-vlan nv-c {macs['nv-c']} 10")
    assert moved.rc == 0, moved.stderr
    ports = {p["ifname"]: p["vlans"] for p in json.loads(host.check_output("bridge -j vlan show"))}
    assert [v["vlan"] for v in ports[taps["nv-c"]]] == [10], ports[taps["nv-c"]]
    _until(host, logs, lambda p: ("10.77.0.1", True) in p["nv-c"][seen["nv-c"]:],
           "C reaches A once on VLAN 10")
