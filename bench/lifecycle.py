"""Lifecycle benchmark: hvagent against libvirt, same tiny guest, same run.

For each side and round: create (define) -> start -> [guest boots: waited for, not
counted] -> stop (ACPI power-off, until QEMU is gone) -> delete. Prints per-phase
medians, the create+start+stop+delete total and the ratio hvagent/libvirt, then the idle
memory of hvagent against libvirtd + virtlogd (no VMs defined, after the runs): RSS (the
target), and PSS / private memory, which do not count shared library pages once per
process.

How libvirt is set up, and why (so that it is measured as a libvirt user would run it):
- Domain type `qemu` (TCG), the same accelerator hvagent picks here; QEMU runs as
  libvirt's default user (libvirt-qemu), with its default DAC relabelling.
- /dev/kvm group. libvirt caches QEMU's capabilities per binary and, before every use,
  checks the cache is still valid. One check: "KVM was enabled when probing, is it still
  usable?", where usable means /dev/kvm is read-writable by libvirt's QEMU user
  (libvirt-qemu, group kvm). The probe's QEMU reports KVM enabled (query-kvm) even
  where /dev/kvm is not in group kvm; there the check fails on every lookup and
  libvirt re-probes QEMU (~4 s, more on a busy host) several times per call:
  defineXML took 46-80 s (libvirtd's debug log: "KVM was enabled when probing
  '/usr/bin/qemu-system-x86_64', but it is not available now", and the cache file
  rewritten 11 times in one define). On a stock Debian host udev makes /dev/kvm
  root:kvm 0660 and the cache stays valid. When /dev/kvm is in another group, this
  script gives it Debian's group `kvm` while libvirt runs and puts the old group back
  afterwards; root (hvagent, other QEMUs) is not affected by the group.
- Capabilities cache warmed before timing: domain capabilities are queried and one
  domain is defined and undefined (not counted), as on a host where libvirtd has
  already run once. The cache files are watched during the timed rounds; a re-probe
  there is reported, since it would make libvirt's create look slow for a reason that
  is not libvirt's normal cost. (The re-probing also inflated libvirtd's idle RSS:
  ~60 MiB after it, ~33 MiB with a valid cache.)

Where hvagent's idle RSS goes (CPython 3.11, measured by importing in the daemon's
order): interpreter 10.6 MiB, asyncio + ssl (libssl/libcrypto) 9.4, uvicorn (with
click, email, multiprocessing, which its package imports) 5.2, pydantic 4.3, FastAPI
(starlette, anyio, opentelemetry-api, OpenAPI models) 14.3, pydantic.v1 (imported by
FastAPI while it builds routes) 1.4, yaml + sqlite3 + qemu.qmp 2.0, hvagent's own
modules (models, routes) 5.1, runtime ~3. cryptography (~8 MiB) and rich (~1.5 MiB) are
imported only when TLS certificates or tables are made. MALLOC_ARENA_MAX=2 is a
legitimate deployment setting but changed nothing measurable here (one worker thread).

libvirt is only the peer of this benchmark, never a dependency of the product or CI:
when missing, Debian's libvirt-daemon-system and python3-libvirt are installed and
`virtlogd -d` / `libvirtd -d` are started (and stopped again) by bench/support/libvirt.py.
The libvirt side runs under Debian's /usr/bin/python3, where python3-libvirt lives.

Usage: python bench/lifecycle.py [--rounds N]   (as root; QEMU under TCG or KVM)
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
from support.libvirt import libvirt_session, pids_named, run_peer

PHASES = ("create", "start", "stop", "delete")
MEMORY_MIB = 256
Runs = list[dict[str, float]]


def memory_kib(pids: list[int]) -> dict[str, int]:
    """Summed Rss, Pss and private (Private_Clean + Private_Dirty) of `pids`, in KiB."""
    out = {"rss": 0, "pss": 0, "private": 0}
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if not rest.strip().endswith("kB"):
                continue
            kib = int(rest.split()[0])
            if key == "Rss":
                out["rss"] += kib
            elif key == "Pss":
                out["pss"] += kib
            elif key in ("Private_Clean", "Private_Dirty"):
                out["private"] += kib
    return out


def wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_text(errors="replace"):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{path}: {text!r} did not appear in {timeout}s")


# hvagent side


def bench_hvagent(guest: Any, work: Path, rounds: int) -> tuple[Runs, dict[str, int]]:
    root = work / "hvagent"
    root.mkdir()
    agent = Agent(root, library_for(guest))
    agent.start()
    call = agent.ok
    try:
        results = []
        for i in range(rounds):
            name = f"bench{i}"
            t: dict[str, float] = {}
            t0 = time.perf_counter()
            call("POST", "/vms", json={
                "name": name, "vcpus": 1, "memory_mib": MEMORY_MIB,
                "kernel": str(guest.kernel), "initrd": str(guest.initrd),
                "append": guest.append(), "nics": [{"network": "user"}]})
            t["create"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            vm = call("POST", f"/vms/{name}/start")
            t["start"] = time.perf_counter() - t0
            wait_for(Path(vm["serial_log"]), tinyguest.BOOT_MARKER)
            t0 = time.perf_counter()
            vm = call("POST", f"/vms/{name}/stop", json={"timeout": 60})
            t["stop"] = time.perf_counter() - t0
            assert vm["state"] == "stopped" and vm["last_error"] is None, vm
            t0 = time.perf_counter()
            call("DELETE", f"/vms/{name}")
            t["delete"] = time.perf_counter() - t0
            results.append(t)
            say(f"hvagent round {i + 1}: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()))
        time.sleep(2)  # idle
        return results, memory_kib([agent.pid])
    finally:
        agent.stop()


# libvirt side (runs under Debian's python3 with python3-libvirt)

LIBVIRT_SCRIPT = r'''
import glob, json, os, sys, time
import libvirt

EMULATOR = "/usr/bin/qemu-system-x86_64"
CAPS_CACHE = "/var/cache/libvirt/qemu/capabilities/*.xml"
cfg = json.loads(sys.argv[1])
conn = libvirt.open("qemu:///system")
ports = "".join(
    f"<controller type='pci' index='{i + 1}' model='pcie-root-port'/>" for i in range(8))


def domain_xml(name, log):
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{cfg['memory']}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{cfg['kernel']}</kernel><initrd>{cfg['initrd']}</initrd>
    <cmdline>{cfg['append']}</cmdline></os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model>
    <feature policy='require' name='svm'/></cpu>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pcie-root'/>{ports}
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def cache_state():
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(CAPS_CACHE)}


# Warm-up, not timed: a host where libvirtd has run before has its capabilities cached.
t0 = time.perf_counter()
conn.getDomainCapabilities(EMULATOR, "x86_64", "q35", "qemu")
warm = f"hvbench-{cfg['tag']}-warmup"
conn.defineXML(domain_xml(warm, f"{cfg['logdir']}/{warm}.serial.log")).undefine()
warmup = time.perf_counter() - t0
print(f"warm-up (capabilities + define/undefine) {warmup:.3f}s", file=sys.stderr, flush=True)
caches = cache_state()
results = []
for i in range(cfg["rounds"]):
    name = f"hvbench-{cfg['tag']}-{i}"
    log = f"{cfg['logdir']}/{name}.serial.log"
    xml = domain_xml(name, log)
    t = {}
    t0 = time.perf_counter()
    dom = conn.defineXML(xml)
    t["create"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dom.create()
    t["start"] = time.perf_counter() - t0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if cfg["marker"] in open(log, errors="replace").read():
                break
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    else:
        raise SystemExit(f"{name}: guest did not boot")
    t0 = time.perf_counter()
    dom.shutdown()
    while dom.isActive():
        time.sleep(0.05)
    t["stop"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dom.undefine()
    t["delete"] = time.perf_counter() - t0
    results.append(t)
    print("round " + json.dumps(t), file=sys.stderr, flush=True)
reprobed = cache_state() != caches
print(json.dumps({"warmup": warmup, "reprobed": reprobed, "rounds": results}))
'''


def bench_libvirt(guest: Any, work: Path, rounds: int) -> tuple[Runs, dict[str, int]]:
    logdir = work / "libvirt"
    logdir.mkdir(mode=0o777)
    logdir.chmod(0o777)  # QEMU may run as libvirt-qemu
    cfg = {"rounds": rounds, "tag": str(os.getpid()), "logdir": str(logdir),
           "memory": MEMORY_MIB, "kernel": str(guest.kernel), "initrd": str(guest.initrd),
           "append": guest.append(), "marker": tinyguest.BOOT_MARKER}
    out = run_peer(LIBVIRT_SCRIPT, cfg)
    results = out["rounds"]
    say(f"libvirt warm-up (not counted): {out['warmup']:.3f}s")
    for i, t in enumerate(results):
        say(f"libvirt round {i + 1}: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()))
    if out["reprobed"]:
        say("WARNING: libvirt re-probed QEMU's capabilities during the timed rounds; its "
            "create/start times include that probing (see the module docstring)")
    time.sleep(2)  # idle
    return results, memory_kib([p for d in ("libvirtd", "virtlogd") for p in pids_named(d)])


def median(results: list[dict[str, float]], key: str) -> float:
    if key == "total":
        return statistics.median(sum(t[p] for p in PHASES) for t in results)
    return statistics.median(t[key] for t in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lifecycle-"))
    work.chmod(0o755)
    try:
        guest = build_guest(work)
        say(f"hvagent: {args.rounds} rounds")
        hv, hv_mem = bench_hvagent(guest, work, args.rounds)
        with libvirt_session():
            say(f"libvirt: {args.rounds} rounds")
            lv, lv_mem = bench_libvirt(guest, work, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'phase (median s)':<18}{'hvagent':>10}{'libvirt':>10}{'ratio':>8}")
    for key in (*PHASES, "total"):
        a, b = median(hv, key), median(lv, key)
        print(f"{key:<18}{a:>10.3f}{b:>10.3f}{a / b:>8.2f}")
    for key, label in (("rss", "idle RSS"), ("pss", "idle PSS"), ("private", "idle private")):
        a, b = hv_mem[key] / 1024, lv_mem[key] / 1024
        print(f"{label + ' (MiB)':<18}{a:>10.1f}{b:>10.1f}{a / b:>8.2f}"
              + ("   (libvirt = libvirtd + virtlogd)" if key == "rss" else ""))
    print(f"targets: total ratio <= 0.5 ({median(hv, 'total') / median(lv, 'total'):.2f}), "
          f"RSS ratio <= 0.5 ({hv_mem['rss'] / lv_mem['rss']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
