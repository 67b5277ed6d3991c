"""Checkpoint benchmark: hvagent against libvirt, same tiny guest (512 MiB, qcow2 disk),
same run.

1. Checkpoint create and revert of a running guest (memory + disk): per-round times,
   medians and the ratio hvagent/libvirt (`snapshot-create-as` / `snapshot-revert`
   through the libvirt API). Target: ratio <= 1.0.
2. Revert after a vCPU hot-add: hot-add a vCPU, checkpoint, power off, revert (QEMU
   must be started again for the load). libvirt starts QEMU without the hot-added vCPU
   and fails ("Unknown savevm section ... cpu_common"); hvagent plugs the hot-added
   devices again first. Success is checked on the guest: its counter goes back.
3. hvagent hot-add latency, request -> the guest reports the device on its console, for
   vCPU, memory (DIMM), disk and NIC. The guest reports every ~0.5 s: that is the
   resolution of these figures.

libvirt is only the peer of this benchmark (bench/support/libvirt.py: install,
daemons, /dev/kvm group; bench/lifecycle.py says why).

Usage: python bench/checkpoints.py [--rounds N]   (as root; QEMU under TCG or KVM)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from support import say
from support.agent import Agent, library_for
from support.guest import build_guest, tinyguest
from support.libvirt import end_leftover_qemus, libvirt_session, run_peer

from hvagent.host import run

MEMORY_MIB = 512


def last_state(agent: Agent, name: str) -> dict[str, str] | None:
    states = tinyguest.parse_states(agent.console(name))
    return states[-1] if states else None


def wait_guest(agent: Agent, name: str, test: Any, timeout: float = 120) -> float:
    """Seconds until the guest's newest state line passes `test`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        s = last_state(agent, name)
        if s and test(s):
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise RuntimeError(f"{name}: guest state never matched; last {last_state(agent, name)}")


def job(agent: Agent, method: str, path: str, **kw: Any) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    j = agent.ok(method, path, **kw)
    while j["status"] == "running":
        time.sleep(0.01)
        j = agent.ok("GET", f"/jobs/{j['id']}")
    return time.perf_counter() - t0, j


# hvagent side


def bench_hvagent(guest: Any, work: Path, rounds: int) -> dict[str, Any]:
    root = work / "hvagent"
    root.mkdir()
    agent = Agent(root, library_for(guest))
    agent.start()
    out: dict[str, Any] = {"create": [], "revert": []}
    try:
        agent.create_tiny("bench", guest, vcpus=1, max_vcpus=2, memory_mib=MEMORY_MIB,
                          max_memory_mib=MEMORY_MIB + 256, disks=[{"size": "64M"}],
                          append=guest.append(memory_hotplug=True))
        agent.ok("POST", "/vms/bench/start")
        wait_guest(agent, "bench", lambda s: int(s["counter"]) >= 2)
        for i in range(rounds):
            t, j = job(agent, "POST", "/vms/bench/checkpoints", json={"name": f"r{i}"})
            assert j["status"] == "succeeded", j
            out["create"].append(t)
            wait_guest(agent, "bench", lambda s: True)
            t, j = job(agent, "POST", f"/vms/bench/checkpoints/r{i}/revert")
            assert j["status"] == "succeeded", j
            out["revert"].append(t)
            wait_guest(agent, "bench", lambda s: True)  # running again
            say(f"hvagent round {i + 1}: create {out['create'][-1]:.3f}s, "
                f"revert {out['revert'][-1]:.3f}s")

        # hot-add latency, request -> guest-visible
        base = last_state(agent, "bench")
        assert base is not None
        lat = {}
        t0 = time.perf_counter()
        agent.ok("PUT", "/vms/bench/vcpus", json={"vcpus": 2})
        wait_guest(agent, "bench", lambda s: s["cpus"] == "2")
        lat["vcpu"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        agent.ok("PUT", "/vms/bench/memory", json={"memory_mib": MEMORY_MIB + 128})
        wait_guest(agent, "bench", lambda s: int(s["memkb"]) > int(base["memkb"]) + 100_000)
        lat["memory"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        agent.ok("POST", "/vms/bench/disks", json={"size": "16M"})
        wait_guest(agent, "bench", lambda s: "vdb" in s["disks"])
        lat["disk"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        agent.ok("POST", "/vms/bench/nics", json={"network": "user"})
        wait_guest(agent, "bench", lambda s: "eth0" in s["nics"])
        lat["nic"] = time.perf_counter() - t0
        out["hotadd"] = lat

        # revert after hotplug: checkpoint with the hot-added devices, revert to it
        wait_guest(agent, "bench", lambda s: True)
        t, j = job(agent, "POST", "/vms/bench/checkpoints", json={"name": "hot"})
        at = int(last_state(agent, "bench")["counter"])  # type: ignore[index]
        wait_guest(agent, "bench", lambda s: int(s["counter"]) >= at + 6)
        agent.ok("POST", "/vms/bench/stop", json={"force": True})
        t, j = job(agent, "POST", "/vms/bench/checkpoints/hot/revert")
        ok = j["status"] == "succeeded"
        if ok:
            wait_guest(agent, "bench", lambda s: True)
            first = tinyguest.parse_states(agent.console("bench"))[0]
            ok = int(first["counter"]) <= at + 1 and first["cpus"] == "2"
        out["hotplug_revert"] = {"ok": ok, "error": j.get("error")}
        agent.ok("POST", "/vms/bench/stop", json={"force": True})
        return out
    finally:
        agent.stop()


# libvirt side (runs under Debian's python3 with python3-libvirt)

LIBVIRT_SCRIPT = r'''
import json, sys, time
import libvirt

cfg = json.loads(sys.argv[1])
conn = libvirt.open("qemu:///system")
ports = "".join(
    f"<controller type='pci' index='{i + 1}' model='pcie-root-port'/>" for i in range(8))
name = f"hvbench-ckpt-{cfg['tag']}"
log = f"{cfg['dir']}/{name}.serial.log"
xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{cfg['memory']}</memory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{cfg['kernel']}</kernel><initrd>{cfg['initrd']}</initrd>
    <cmdline>{cfg['append']}</cmdline></os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model>
    <feature policy='require' name='svm'/></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pcie-root'/>{ports}
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{cfg['disk']}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def states():
    try:
        text = open(log, errors="replace").read()
    except FileNotFoundError:
        return []
    return [l for l in text.splitlines() if l.startswith("TINY cpus=")]


def wait(test, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = states()
        if s and test(s[-1]):
            return s[-1]
        time.sleep(0.05)
    raise SystemExit(f"guest state never matched: {states()[-1:]}")


def counter(line):
    return int(line.rsplit("counter=", 1)[1])


dom = conn.defineXML(xml)
out = {"create": [], "revert": []}
try:
    dom.create()
    wait(lambda s: counter(s) >= 2)
    for i in range(cfg["rounds"]):
        t0 = time.perf_counter()
        snap = dom.snapshotCreateXML(f"<domainsnapshot><name>r{i}</name></domainsnapshot>")
        out["create"].append(time.perf_counter() - t0)
        wait(lambda s: True)
        t0 = time.perf_counter()
        dom.revertToSnapshot(snap)
        out["revert"].append(time.perf_counter() - t0)
        wait(lambda s: True)
        print(f"round {i + 1}: create {out['create'][-1]:.3f}s revert {out['revert'][-1]:.3f}s",
              file=sys.stderr, flush=True)
    # revert after a vCPU hot-add
    dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    wait(lambda s: "cpus=2" in s)
    snap = dom.snapshotCreateXML("<domainsnapshot><name>hot</name></domainsnapshot>")
    dom.destroy()
    try:
        dom.revertToSnapshot(snap)
        out["hotplug_revert"] = {"ok": True, "error": None}
    except libvirt.libvirtError as e:
        out["hotplug_revert"] = {"ok": False, "error": str(e).splitlines()[0][:200]}
finally:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    for s in dom.listAllSnapshots():
        s.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    dom.undefine()
print(json.dumps(out))
'''


def bench_libvirt(guest: Any, work: Path, rounds: int) -> dict[str, Any]:
    d = work / "libvirt"
    d.mkdir(mode=0o777)
    d.chmod(0o777)  # QEMU may run as libvirt-qemu
    disk = d / "disk.qcow2"
    run.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "64M"], timeout=60)
    disk.chmod(0o666)
    cfg = {"rounds": rounds, "tag": str(os.getpid()), "dir": str(d), "disk": str(disk),
           "memory": MEMORY_MIB, "kernel": str(guest.kernel), "initrd": str(guest.initrd),
           "append": guest.append()}
    try:
        return dict(run_peer(LIBVIRT_SCRIPT, cfg))
    finally:
        if end_leftover_qemus(f"hvbench-ckpt-{cfg['tag']}"):
            say("libvirt left a QEMU behind after its failed revert; ended it")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoints-"))
    work.chmod(0o755)
    try:
        guest = build_guest(work)
        say(f"hvagent: {args.rounds} rounds")
        hv = bench_hvagent(guest, work, args.rounds)
        with libvirt_session():
            say(f"libvirt: {args.rounds} rounds")
            lv = bench_libvirt(guest, work, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'checkpoint (median s)':<24}{'hvagent':>10}{'libvirt':>10}{'ratio':>8}")
    for key in ("create", "revert"):
        a, b = statistics.median(hv[key]), statistics.median(lv[key])
        print(f"{key:<24}{a:>10.3f}{b:>10.3f}{a / b:>8.2f}")
    for side, res in (("hvagent", hv), ("libvirt", lv)):
        h = res["hotplug_revert"]
        print(f"revert after vCPU hot-add, {side}: "
              + ("ok" if h["ok"] else f"FAILED ({h['error']})"))
    print("hvagent hot-add, request -> guest sees it (s, +-0.5 s guest report interval): "
          + ", ".join(f"{k} {v:.2f}" for k, v in hv["hotadd"].items()))
    print("targets: create and revert ratio <= 1.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
