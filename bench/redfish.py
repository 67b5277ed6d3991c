"""Redfish benchmark: the agent's Redfish face against its own REST API and against
sushy-tools' Redfish emulator over libvirt, same tiny guest, same run.

Measured per side:
- GET latency, p50 and p99 over `--gets` requests after 20 warm-ups: the agent's
  `GET /redfish/v1/Systems/{vm}` and `GET /api/v1/vms/{vm}` (both over the agent's HTTPS
  listener, one keep-alive connection, a bearer token), and sushy-tools'
  `GET /redfish/v1/Systems/{uuid}` (plain HTTP on loopback, its libvirt driver);
- Reset On -> running: the VM off, `POST .../Actions/ComputerSystem.Reset {"ResetType":
  "On"}`, then GETs until PowerState is On (the agent's REST side: POST start, then GETs
  until its state is running); then ForceOff, `--rounds` times.
Ratios printed: agent Redfish / agent REST (target <= 1.2) and agent Redfish /
sushy-tools (target <= 0.5).

sushy-tools is only this benchmark's peer: it is installed into a virtual environment
made under the work directory from Debian's /usr/bin/python3 with its system packages
(python3-libvirt, which bench/support/libvirt.py installs with libvirt), never into the
project's environment. libvirt runs QEMU under TCG (domain type qemu), as the agent does
here.

Usage: python bench/redfish.py [--gets N] [--rounds N]   (as root)
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from support import REPO, say
from support.agent import library_for
from support.guest import build_guest
from support.libvirt import SYSTEM_PYTHON, libvirt_session, run_peer

from hvagent.host import run

HVAGENT = [sys.executable, "-m", "hvagent.cli.hvagent"]
WARMUP = 20
INSTALL_TIMEOUT = 900.0
START_TIMEOUT = 60.0
POWER_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def time_gets(client: httpx.Client, url: str, n: int) -> tuple[float, float]:
    for _ in range(WARMUP):
        client.get(url).raise_for_status()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(url)
        samples.append(time.perf_counter() - t0)
        r.raise_for_status()
    return percentiles(samples)


def wait_power(client: httpx.Client, url: str, want: str) -> None:
    deadline = time.monotonic() + POWER_TIMEOUT
    while time.monotonic() < deadline:
        if client.get(url).json()["PowerState"] == want:
            return
        time.sleep(0.01)
    raise RuntimeError(f"{url}: PowerState not {want} after {POWER_TIMEOUT:g} s")


def redfish_reset_rounds(client: httpx.Client, system: str, rounds: int,
                         side: str) -> list[float]:
    """Reset On -> PowerState On, `rounds` times (ForceOff in between, not timed)."""
    reset = f"{system}/Actions/ComputerSystem.Reset"
    out = []
    for i in range(rounds):
        t0 = time.perf_counter()
        r = client.post(reset, json={"ResetType": "On"})
        if r.status_code >= 300:
            raise RuntimeError(f"{side} Reset On: {r.status_code} {r.text}")
        wait_power(client, system, "On")
        out.append(time.perf_counter() - t0)
        say(f"{side} round {i + 1}: Reset On -> On {out[-1]:.3f}s")
        r = client.post(reset, json={"ResetType": "ForceOff"})
        if r.status_code >= 300:
            raise RuntimeError(f"{side} ForceOff: {r.status_code} {r.text}")
        wait_power(client, system, "Off")
    return out


# the agent


def bench_agent(guest: Any, work: Path, gets: int, rounds: int) -> dict[str, Any]:
    root = work / "hvagent"
    root.mkdir()
    port = free_port()
    (root / "policy.yaml").write_text(json.dumps({"library": library_for(guest)}))
    config = root / "hvagent.yaml"
    config.write_text(json.dumps({
        "listen": str(root / "hv.sock"), "state_dir": str(root / "state"),
        "storage_dir": str(root / "images"), "run_dir": str(root / "run"),
        "log_dir": str(root / "log"), "accel": "auto", "policy": str(root / "policy.yaml"),
        "tls": {"listen": f"127.0.0.1:{port}"}}))
    log = (root / "agent.log").open("ab")
    proc = run.spawn([*HVAGENT, "serve", "--config", config], stdout=log, stderr=log,
                     cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on https://" not in (root / "agent.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "agent.log").read_text())
            time.sleep(0.1)
        token = json.loads(run.run([*HVAGENT, "token", "--config", config, "--json",
                                    "create", "bench", "--role", "Administrator"],
                                   timeout=60, cwd=REPO).out)["token"]
        ctx = ssl.create_default_context(cafile=str(root / "state" / "tls" / "ca.pem"))
        client = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=120,
                              headers={"Authorization": f"Bearer {token}"})
        r = client.post("/api/v1/vms", json={
            "name": "rf", "vcpus": 1, "memory_mib": 256, "kernel": str(guest.kernel),
            "initrd": str(guest.initrd), "append": guest.append()})
        r.raise_for_status()
        out: dict[str, Any] = {}
        out["redfish_get"] = time_gets(client, "/redfish/v1/Systems/rf", gets)
        out["rest_get"] = time_gets(client, "/api/v1/vms/rf", gets)
        say("agent GET p50/p99: Redfish {:.2f}/{:.2f} ms, REST {:.2f}/{:.2f} ms".format(
            *(x * 1000 for x in (*out["redfish_get"], *out["rest_get"]))))
        out["redfish_on"] = redfish_reset_rounds(client, "/redfish/v1/Systems/rf", rounds,
                                                 "agent Redfish")
        rest = []
        for i in range(rounds):
            t0 = time.perf_counter()
            client.post("/api/v1/vms/rf/start").raise_for_status()
            deadline = time.monotonic() + POWER_TIMEOUT
            while client.get("/api/v1/vms/rf").json()["state"] != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError("REST start: not running")
                time.sleep(0.01)
            rest.append(time.perf_counter() - t0)
            say(f"agent REST round {i + 1}: start -> running {rest[-1]:.3f}s")
            client.post("/api/v1/vms/rf/stop", json={"force": True}).raise_for_status()
        out["rest_on"] = rest
        client.close()
        return out
    finally:
        run.stop(proc, grace=30)


# sushy-tools over libvirt

DEFINE_SCRIPT = r'''
import json, sys
import libvirt
cfg = json.loads(sys.argv[1])
conn = libvirt.open("qemu:///system")
if cfg.get("undefine"):
    for name in (cfg["name"],):
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            continue
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    print(json.dumps({}))
    raise SystemExit
xml = f"""<domain type='qemu'>
  <name>{cfg['name']}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{cfg['kernel']}</kernel><initrd>{cfg['initrd']}</initrd>
    <cmdline>{cfg['append']}</cmdline></os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{cfg['log']}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""
dom = conn.defineXML(xml)
print(json.dumps({"uuid": dom.UUIDString()}))
'''


def sushy_tools_venv(work: Path) -> Path:
    venv = work / "sushy-tools-venv"
    run.run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv], timeout=120)
    say("installing sushy-tools into a peer-only venv")
    run.run([venv / "bin" / "pip", "install", "-q", "sushy-tools"], timeout=INSTALL_TIMEOUT)
    return venv / "bin" / "sushy-emulator"


def bench_sushy_tools(guest: Any, work: Path, gets: int, rounds: int) -> dict[str, Any]:
    emulator = sushy_tools_venv(work)
    logdir = work / "libvirt"
    logdir.mkdir(mode=0o777)
    logdir.chmod(0o777)
    name = f"hvbench-redfish-{int(time.time())}"
    cfg = {"name": name, "kernel": str(guest.kernel), "initrd": str(guest.initrd),
           "append": guest.append(), "log": str(logdir / f"{name}.serial.log")}
    uuid = run_peer(DEFINE_SCRIPT, cfg)["uuid"]
    port = free_port()
    log = (work / "sushy-emulator.log").open("ab")
    proc = run.spawn([emulator, "--interface", "127.0.0.1", "--port", str(port),
                      "--libvirt-uri", "qemu:///system"], stdout=log, stderr=log)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if client.get("/redfish/v1/").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "sushy-emulator.log").read_text())
            time.sleep(0.2)
        system = f"/redfish/v1/Systems/{uuid}"
        out: dict[str, Any] = {"get": time_gets(client, system, gets)}
        say("sushy-tools GET p50/p99: {:.2f}/{:.2f} ms".format(
            *(x * 1000 for x in out["get"])))
        out["on"] = redfish_reset_rounds(client, system, rounds, "sushy-tools")
        client.close()
        return out
    finally:
        run.stop(proc, grace=10)
        run_peer(DEFINE_SCRIPT, {"name": name, "undefine": True})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gets", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-redfish-"))
    work.chmod(0o755)
    try:
        guest = build_guest(work)
        agent = bench_agent(guest, work, args.gets, args.rounds)
        with libvirt_session():
            peer = bench_sushy_tools(guest, work, args.gets, args.rounds)
        ms = 1000.0
        rf_p50, rf_p99 = agent["redfish_get"]
        rest_p50, rest_p99 = agent["rest_get"]
        st_p50, st_p99 = peer["get"]
        rf_on = statistics.median(agent["redfish_on"])
        rest_on = statistics.median(agent["rest_on"])
        st_on = statistics.median(peer["on"])
        print()
        print(f"{'':34} {'agent Redfish':>14} {'agent REST':>11} {'sushy-tools':>12} "
              f"{'Redfish/REST':>13} {'Redfish/sushy-tools':>20}")
        for label, a, b, c in (("GET System p50 (ms)", rf_p50 * ms, rest_p50 * ms, st_p50 * ms),
                               ("GET System p99 (ms)", rf_p99 * ms, rest_p99 * ms, st_p99 * ms),
                               ("Reset On -> On, median (s)", rf_on, rest_on, st_on)):
            print(f"{label:34} {a:14.3f} {b:11.3f} {c:12.3f} {a / b:13.2f} {a / c:20.2f}")
        print("targets: Redfish/REST <= 1.2, Redfish/sushy-tools <= 0.5")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
