"""The DHCP and DNS server of a `nat` or `isolated` network: one dnsmasq (Debian's
dnsmasq-base) per network, bound to the network's bridge only. It runs detached from the
agent, as the VMs do: an agent restart leaves the guests' leases and names served, and
the next agent finds it again by its pid file (checked against /proc, so a reused pid
is never taken for it).

The guests get an address from the network's DHCP range, the host's address as their
router (nat only) and DNS server, and the host's own name resolves to the host's
address on the network. A nat network's dnsmasq forwards other names to the host's
resolvers; an isolated network's answers only its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from hvagent.errors import OperationFailed
from hvagent.netspec import NetworkKind, NetworkSpec

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
USER, GROUP = "nobody", "nogroup"
START_TIMEOUT = 15.0
STOP_WAIT = 5.0


@dataclass(frozen=True)
class ServerFiles:
    pid: Path
    leases: Path
    log: Path


def files(run_dir: Path, state_dir: Path, log_dir: Path, name: str) -> ServerFiles:
    return ServerFiles(pid=run_dir / "networks" / f"{name}.pid",
                       leases=state_dir / "networks" / f"{name}.leases",
                       log=log_dir / "networks" / f"{name}.log")


def argv(spec: NetworkSpec, bridge: str, f: ServerFiles) -> list[str]:
    iface = spec.interface
    args = [DNSMASQ, "--conf-file=/dev/null", f"--pid-file={f.pid}",
            f"--log-facility={f.log}", "--bind-interfaces", f"--interface={bridge}",
            "--except-interface=lo", f"--listen-address={iface.ip}", "--strict-order",
            "--no-hosts", f"--host-record={socket.gethostname()},{iface.ip}",
            # It reads what guests send: it drops root once its sockets and files are
            # open, keeping only the network capabilities it needs.
            f"--user={USER}", f"--group={GROUP}"]
    if spec.kind == NetworkKind.ISOLATED:
        args.append("--no-resolv")
    if spec.dhcp:
        first, last = spec.dhcp_range
        args += [f"--dhcp-range={first},{last},{iface.network.netmask},1h",
                 f"--dhcp-leasefile={f.leases}", "--dhcp-authoritative",
                 f"--dhcp-option=option:dns-server,{iface.ip}"]
        # nat: the host routes the guests out; isolated: no router at all.
        args.append(f"--dhcp-option=option:router,{iface.ip}"
                    if spec.kind == NetworkKind.NAT else "--dhcp-option=option:router")
    return args


def running(f: ServerFiles) -> int | None:
    """The pid of the network's dnsmasq when it runs (its pid file names a live dnsmasq
    started with that pid file), else None."""
    try:
        pid = int(f.pid.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if os.path.basename(cmdline[0]) != DNSMASQ.encode() or \
            f"--pid-file={f.pid}".encode() not in cmdline:
        return None
    return pid


async def start(spec: NetworkSpec, bridge: str, f: ServerFiles) -> int:
    """Start the network's dnsmasq (it daemonizes once it has bound its sockets and read
    its options, so a bad option or a taken port is an error here)."""
    if shutil.which(DNSMASQ) is None:
        raise OperationFailed(f"network {spec.name}: dnsmasq is not installed (Debian "
                              "package dnsmasq-base); nat and isolated networks need it")
    for p in (f.pid, f.leases, f.log):
        p.parent.mkdir(parents=True, exist_ok=True)
    f.pid.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        *argv(spec, bridge, f), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationFailed(f"network {spec.name}: dnsmasq did not start within "
                              f"{START_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        line = err.decode(errors="replace").strip().splitlines()
        raise OperationFailed(f"network {spec.name}: dnsmasq failed: "
                              f"{line[-1] if line else f'exit {proc.returncode}'}")
    deadline = time.monotonic() + STOP_WAIT
    while (pid := running(f)) is None:
        if time.monotonic() > deadline:
            raise OperationFailed(f"network {spec.name}: dnsmasq started but wrote no "
                                  f"pid file {f.pid}")
        await asyncio.sleep(0.05)
    log.info("network %s: dnsmasq %d serves %s on %s", spec.name, pid, spec.address, bridge)
    return pid


async def stop(f: ServerFiles) -> None:
    """End the network's dnsmasq if it runs; remove its pid file."""
    pid = running(f)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while running(f) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if running(f) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    f.pid.unlink(missing_ok=True)
