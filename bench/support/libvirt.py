"""The libvirt peer, installed and run as a Debian host would have it, for the duration
of a benchmark (see bench/lifecycle.py's docstring for why each step is there).

libvirt is only a benchmark's peer, never a dependency of the product or CI: when
missing, Debian's libvirt-daemon-system and python3-libvirt are installed, and
`virtlogd -d` / `libvirtd -d` are started and stopped again. The libvirt side of a
benchmark is a script run under Debian's /usr/bin/python3 (`run_peer`), where
python3-libvirt lives.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hvagent.host import run
from support import qemu_pids, say

KVM_DEV = Path("/dev/kvm")
SYSTEM_PYTHON = "/usr/bin/python3"
# Bounds: a quick query (pidof, a libvirt connection test), a daemon's start-up, the
# peer's apt-get install, and one benchmark's whole libvirt side.
QUERY_TIMEOUT = 30.0
DAEMON_TIMEOUT = 60.0
INSTALL_TIMEOUT = 1800.0
PEER_TIMEOUT = 3 * 3600.0


def run_through(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
    """Run a command with its output going straight through, not captured (a daemon that
    forks into the background would hold a capturing pipe open); ProcessFailed when it
    fails or outlasts `timeout`."""
    proc = run.spawn(argv, stdout=None, stderr=None, env=env)
    try:
        returncode = proc.wait(timeout=timeout)
    except run.TimeoutExpired:
        run.stop(proc)
        raise run.failure(argv, None, b"", timeout=timeout) from None
    if returncode != 0:
        raise run.failure(argv, returncode, b"")


def pids_named(name: str) -> list[int]:
    out = run.run(["pidof", name], timeout=QUERY_TIMEOUT, check=False).out
    return [int(p) for p in out.split()]


def ensure_libvirt() -> None:
    have = (shutil.which("libvirtd") and run.run(
        [SYSTEM_PYTHON, "-c", "import libvirt"], timeout=QUERY_TIMEOUT,
        check=False).returncode == 0)
    if have:
        return
    say("installing libvirt-daemon-system python3-libvirt (benchmark peer only)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_through(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                 "libvirt-daemon-system", "python3-libvirt"], INSTALL_TIMEOUT, env=env)


@contextlib.contextmanager
def stock_kvm_group() -> Iterator[None]:
    """/dev/kvm in group kvm (as udev makes it on Debian) for the duration, so that
    libvirt's capabilities cache stays valid; the previous group is put back afterwards."""
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
        old_gid = KVM_DEV.stat().st_gid
    except (KeyError, FileNotFoundError):
        old_gid = kvm_gid = -1  # no kvm group or no /dev/kvm: nothing to keep valid
    if old_gid == kvm_gid:
        yield
        return
    say(f"/dev/kvm: group {old_gid} -> kvm while libvirt runs (restored afterwards)")
    os.chown(KVM_DEV, -1, kvm_gid)
    try:
        yield
    finally:
        os.chown(KVM_DEV, -1, old_gid)


def start_libvirt() -> list[int]:
    """Start virtlogd and libvirtd unless they run; returns the pids started here."""
    started = []
    for daemon in ("virtlogd", "libvirtd"):
        if pids_named(daemon):
            continue
        before = set(pids_named(daemon))
        run_through([daemon, "-d"], DAEMON_TIMEOUT)
        deadline = time.monotonic() + 30
        while not (set(pids_named(daemon)) - before) and time.monotonic() < deadline:
            time.sleep(0.1)
        started += list(set(pids_named(daemon)) - before)
    # libvirtd answers once its socket is up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if run.run([SYSTEM_PYTHON, "-c",
                    "import libvirt; libvirt.open('qemu:///system').close()"],
                   timeout=QUERY_TIMEOUT, check=False).returncode == 0:
            break
        time.sleep(0.3)
    return started


@contextlib.contextmanager
def libvirt_session() -> Iterator[None]:
    """libvirt installed and running for the duration; the daemons started here are
    stopped afterwards."""
    ensure_libvirt()
    with stock_kvm_group():
        started = start_libvirt()
        try:
            yield
        finally:
            for pid in started:
                os.kill(pid, signal.SIGTERM)


def end_leftover_qemus(domain: str) -> list[int]:
    """SIGKILL the QEMU of libvirt domain `domain` when libvirt lost track of it: a
    revert libvirt reports as failed can leave its QEMU (started with -S) running, paused
    and orphaned, after libvirt already counts the domain as shut off."""
    ended = []
    for pid in qemu_pids(f"guest={domain},".encode()):  # libvirt's `-name guest=NAME,...`
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            ended.append(pid)
    return ended


def run_peer(script: str, cfg: dict[str, Any]) -> Any:
    """Run a benchmark's libvirt side (`script`, given `cfg` as JSON in argv[1]) and
    return the JSON it prints; its stderr (progress) goes straight through."""
    # spawn, not run: only stdout is captured, stderr goes straight through.
    proc = run.spawn([SYSTEM_PYTHON, "-c", script, json.dumps(cfg)], stdout=run.PIPE,
                     stderr=None, text=True)
    try:
        out, _ = proc.communicate(timeout=PEER_TIMEOUT)
    except run.TimeoutExpired:
        # SIGINT: the script's `finally` destroys and undefines its domain.
        run.stop(proc, sig=signal.SIGINT, grace=60)
        raise RuntimeError(f"libvirt side did not finish within {PEER_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        raise RuntimeError("libvirt side failed (see above)")
    return json.loads(out)
