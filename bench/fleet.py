"""`hvctl --all-hosts vm list` against the same listing done host by host.

10 real agents (HTTPS on loopback, pinned CAs, Auditor tokens in token files), 20
stopped VMs each. Per round, both as real `hvctl` processes: one `hvctl --all-hosts vm
list`, and 10 `hvctl --host NAME vm list` one after another (what a shell loop over the
fleet does). The CAs are pinned by a warm-up call first, as on any run after the first.
Prints the medians and the ratio fleet/sequential. Target: <= 0.3.

    .venv/bin/python bench/fleet.py [--hosts 10] [--vms 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from support import REPO, say
from support.fleet import start_fleet, stop_fleet, write_hosts_file

from hvagent.host import run

HVCTL = [sys.executable, "-m", "hvagent.cli.hvctl"]
HVCTL_TIMEOUT = 120.0
TARGET = 0.3


def hvctl(env: dict[str, str], *args: str) -> bytes:
    return run.run([*HVCTL, *args], timeout=HVCTL_TIMEOUT, env=env, cwd=REPO).stdout


def timed(fn: object, *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--vms", type=int, default=20, help="stopped VMs per host")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    agents = []
    try:
        say(f"starting {args.hosts} agents")
        agents = start_fleet(work, args.hosts)
        for a in agents:
            for i in range(args.vms):
                a.ok("POST", "/vms", json={"name": f"vm-{i:02d}", "vcpus": 1,
                                           "memory_mib": 64})
        config_dir = work / "hvctl"
        write_hosts_file(config_dir, agents)
        env = {**os.environ, "HVCTL_CONFIG_DIR": str(config_dir)}
        env.pop("HVCTL_TOKEN", None)
        # Warm-up (pins every CA) and a check that every host's VMs are there.
        answers = json.loads(hvctl(env, "--json", "--all-hosts", "vm", "list"))
        bad = [a["host"] for a in answers if not a["ok"] or len(a["result"]) != args.vms]
        if bad:
            raise RuntimeError(f"hosts without their {args.vms} VMs: {bad}")

        def sequential() -> None:
            for a in agents:
                hvctl(env, "--host", a.name, "vm", "list")

        fleet_s, seq_s = [], []
        say(f"{args.rounds} rounds")
        for _ in range(args.rounds):  # alternating, so that machine noise hits both
            fleet_s.append(timed(hvctl, env, "--all-hosts", "vm", "list"))
            seq_s.append(timed(sequential))
    finally:
        stop_fleet(agents)
        shutil.rmtree(work, ignore_errors=True)

    f, s = statistics.median(fleet_s), statistics.median(seq_s)
    print()
    print(f"{args.hosts} hosts x {args.vms} stopped VMs, {args.rounds} rounds (median s)")
    print(f"{'hvctl --all-hosts vm list':<40}{f:>8.3f}")
    print(f"{f'{args.hosts} x hvctl --host NAME vm list':<40}{s:>8.3f}")
    print(f"{'ratio all-hosts / one by one':<40}{f / s:>8.2f}   target <= {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
