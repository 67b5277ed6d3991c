"""Cost of one Prometheus scrape of GET /metrics on a host with many VMs.

A real `hvagent serve` (unix socket and HTTPS on 127.0.0.1) with 100 VMs defined, of
which 3 run the tiny guest (each with a disk, so their scrape asks QMP for block
counters). Times ~50 scrapes over the unix socket (root, no token) and over HTTPS with
a MetricsReader token made by the real `hvagent token` (one kept-alive connection, as a
Prometheus server holds), prints median, p99 and the body size against the target:
< 100 ms per scrape.

    .venv/bin/python bench/metrics.py [--vms 100] [--running 3] [--scrapes 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from support import say
from support.agent import library_for
from support.fleet import TlsAgent
from support.guest import build_guest, tinyguest

TARGET_MS = 100.0
BOOT_TIMEOUT = 180.0


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def time_scrapes(client: httpx.Client, url: str, n: int) -> tuple[list[float], int]:
    for _ in range(3):  # warm-up: connection, TLS session, first collection
        client.get(url)
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(url)
        times.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"GET {url}: {r.status_code} {r.text[:200]}")
        size = len(r.content)
    return times, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--running", type=int, default=3)
    ap.add_argument("--scrapes", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hv-bench-metrics-"))
    agent = None
    try:
        guest = build_guest(work)
        (work / "agent").mkdir()
        agent = TlsAgent(work / "agent", "bench")
        (agent.root / "policy.yaml").write_text(json.dumps({"library": library_for(guest)}))
        agent.start()
        say(f"defining {args.vms} VMs, starting {args.running}")
        for i in range(args.vms):
            name = f"vm{i:03d}"
            if i < args.running:
                agent.create_tiny(name, guest, disks=[{"size": "16M", "format": "raw"}],
                                  append=guest.append() + " tiny_disk_log")
                agent.ok("POST", f"/vms/{name}/start")
            else:
                agent.ok("POST", "/vms", json={"name": name, "memory_mib": 256})
        deadline = time.monotonic() + BOOT_TIMEOUT
        for i in range(args.running):
            while tinyguest.BOOT_MARKER not in agent.console(f"vm{i:03d}"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vm{i:03d} did not boot in {BOOT_TIMEOUT:g}s")
                time.sleep(0.5)
        token = agent.token("prometheus", "MetricsReader")
        ca = ssl.create_default_context(cafile=str(agent.root / "state" / "tls" / "ca.pem"))
        results = {}
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)),
                          timeout=60) as uds:
            results["unix socket"] = time_scrapes(uds, "http://hvagent/metrics",
                                                  args.scrapes)
        with httpx.Client(verify=ca, timeout=60,
                          headers={"Authorization": f"Bearer {token}"}) as https:
            results["HTTPS + token"] = time_scrapes(https, agent.url + "/metrics",
                                                    args.scrapes)
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"GET /metrics, {args.vms} VMs defined ({args.running} running), "
          f"{args.scrapes} scrapes each")
    for how, (times, size) in results.items():
        p50, p99 = statistics.median(times) * 1e3, pct(times, 0.99) * 1e3
        verdict = "met" if p99 < TARGET_MS else "MISSED"
        print(f"  {how:14}: p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  body {size} bytes; "
              f"target < {TARGET_MS:g} ms: {verdict} (p99 {p99 / TARGET_MS:.2f}x of it)")


if __name__ == "__main__":
    main()
