"""Per-request cost of authentication + authorization.

p50/p99 latency of `GET /api/v1/vms/<name>` through the real agent app (uvicorn on a unix
socket, real SQLite) with the full chain (bearer token -> principal -> ACL -> privilege)
against the same app with the checks switched off (`Security.enforce = False`, a switch
that exists for this comparison only), measured in the same run, in alternating blocks so
that machine noise hits both alike. Target: < 1 ms added at p50.

    .venv/bin/python bench/auth.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from hvagent.access.policy import AclEntry
from hvagent.api.app import create_app
from hvagent.api.listeners import PeerCredProtocol
from hvagent.cli.hvagent import bind_unix
from hvagent.config import AgentConfig
from hvagent.host.kvm import Accel

BLOCK = 100


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="per variant")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hv-bench-auth-"))
    config = AgentConfig(listen=root / "hv.sock", state_dir=root / "state",
                         storage_dir=root / "images", run_dir=root / "run",
                         log_dir=root / "log", accel=Accel.TCG, policy=root / "policy.yaml")
    app = create_app(config)
    sock = bind_unix(config.listen)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           lifespan="on", http=PeerCredProtocol))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    security = app.state.security
    # A principal whose access comes through an inherited ACL entry (the common case).
    security.tokens.grant(AclEntry(path="/vms", principal="bench", role="VMOperator"),
                          security.policy)
    _, token = security.tokens.create("bench", ttl=3600)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(config.listen)),
                          base_url="http://hvagent/api/v1",
                          headers={"Authorization": f"Bearer {token}"})
    assert client.post("/vms", json={"name": "bench"}).status_code == 403  # enforced
    security.enforce = False
    assert client.post("/vms", json={"name": "bench"}).status_code == 201
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(50):  # warm-up
        client.get("/vms/bench")
    done = 0
    while done < args.requests:
        for enforce in (True, False):
            security.enforce = enforce
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                r = client.get("/vms/bench")
                times[enforce].append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        done += BLOCK
    server.should_exit = True
    thread.join(timeout=10)
    shutil.rmtree(root, ignore_errors=True)
    on, off = times[True], times[False]
    p50_on, p50_off = statistics.median(on) * 1e3, statistics.median(off) * 1e3
    p99_on, p99_off = pct(on, 0.99) * 1e3, pct(off, 0.99) * 1e3
    print(f"GET /api/v1/vms/<name> over the unix socket, {len(on)} requests per variant")
    print(f"  auth chain on : p50 {p50_on:.3f} ms  p99 {p99_on:.3f} ms")
    print(f"  auth off      : p50 {p50_off:.3f} ms  p99 {p99_off:.3f} ms")
    print(f"  added: p50 {p50_on - p50_off:+.3f} ms ({p50_on / p50_off:.2f}x), "
          f"p99 {p99_on - p99_off:+.3f} ms ({p99_on / p99_off:.2f}x); "
          f"target < 1 ms at p50: {'met' if p50_on - p50_off < 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
