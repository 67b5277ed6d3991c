"""Networking benchmark: NIC hot-add on a VLAN and TCP throughput, VLAN bridge against
QEMU user-mode networking, same tiny guests, same run.

A real `hvagent serve` runs inside a network namespace of its own (as
tests/integration/test_vlan.py runs it), so that its bridges, taps and user-mode
networks never touch the host's network. The guests are the integration tests' tiny
guest (stock Debian kernel, busybox initramfs) with one more initramfs layer appended:
a script started beside the tiny guest's own init (`rdinit=/bench-init`, which then
runs /init unchanged) that configures NICs by MAC as they appear (also hot-added ones,
as udev + ifupdown's `allow-hotplug` do on a full distribution; the tiny guest itself
configures only eth0, only at boot) and runs the busybox nc/dd loops below.

1. NIC hot-add, request -> first ping answered. A VM is created with no NIC and
   started; once its init runs, `POST /api/v1/vms/{name}/nics {"vlan": 10, "mac": M}`.
   The guest watches /sys/class/net every 20 ms, gives the NIC with MAC M its address
   and brings it up, then pings its peer every 50 ms. Measured on the host from just
   before the POST to: the POST's answer, the guest's `BENCH-NIC` line (NIC seen and
   configured), the guest's first ping reply (`BENCH-PING`), each as seen in the
   serial log (polled every 10 ms). The peer on VLAN 10 is a running tiny guest with
   its NIC on hvbr10 since boot. The same rounds, alternating, hot-add a user-mode NIC
   (`{"network": "user"}`, the guest pinging QEMU's user-mode gateway 10.0.2.2), the
   same virtio NIC without a tap: the ratio bridge/user-mode compares the two (the
   bridge NIC's request also makes its tap and puts it on hvbr10). A fresh VM per
   round, so every round is a VM's first hot-add.
2. TCP throughput between two guests. Each transfer is `dd if=/dev/zero bs=64k` into
   the socket (busybox `nc IP PORT -e`) of MIB MiB (+1 byte); the receiver (busybox
   `nc -e`, also reading the socket directly) reads the first byte, then the rest with
   `dd bs=64k iflag=fullblock`, and reports the bytes and its own /proc/uptime from
   the first byte to EOF (10 ms resolution): throughput = bytes / that time.
   - VLAN bridge: guest A -> guest B, both with a NIC on VLAN 10 (tap on hvbr10).
   - user-mode: user-mode guests cannot reach each other (and this agent sets up no
     hostfwd/guestfwd), so the sending and the receiving guest both connect out to
     10.0.2.2, which QEMU's user-mode stack connects to the namespace's 127.0.0.1,
     where this script relays one connection into the other (a 256 KiB-buffer copy
     in Python, far faster than these guests): guest A' -> slirp -> host relay ->
     slirp -> guest B', the path a hostfwd would give plus one host copy.
   - user-mode, guest -> host only: A' to a sink in this script (one slirp hop; timed
     on the host, first byte to EOF). No bridge counterpart: the agent gives the host
     no address on hvbr10, and this benchmark does not add one.
   - guest loopback: A -> A over lo, same dd/nc: the ceiling of the tools in a guest.
   The senders take their orders from this script over a user-mode NIC (A has one
   besides its VLAN NIC, idle during the transfers), so that the paths alternate
   within each round and machine noise hits all of them. An untimed warm-up transfer
   on each path comes first.

Accelerator: the agent's own choice (`accel: auto`, its probe; as in the other
benchmarks). On a host whose /dev/kvm cannot run a stock kernel that is TCG, and the
throughputs are TCG's: they compare the paths, they are no absolute figures.

Usage: python bench/network.py [--rounds N] [--mib N]   (as root; QEMU under TCG or KVM)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gzip
import os
import re
import shutil
import socket
import stat
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from support import REPO, say
from support.agent import START_TIMEOUT, Agent, library_for
from support.guest import build_guest, tinyguest

from hvagent.host import run

VLAN = 10
MEMORY_MIB = 256
# Bounds: ip(8) calls, one guest boot, one hot-add's guest side, one transfer.
IP_TIMEOUT = 60.0
BOOT_TIMEOUT = 180.0
HOTADD_TIMEOUT = 120.0
TRANSFER_TIMEOUT = 300.0
CPIO_TIMEOUT = 60.0
# Ports in the namespace (user-mode guests reach them as 10.0.2.2:PORT) and in guests.
GUEST_PORT = 5001
CTRL_BRIDGE, CTRL_USER = 7001, 7002
RELAY_IN, RELAY_OUT, SINK_PORT = 5101, 5102, 5103
USER_GW = "10.0.2.2"
USER_IP = "10.0.2.15/24"
BLOCK = 65536
CLONE_NEWNET = 0x40000000

# The layer appended to the tiny guest's initramfs (the kernel unpacks concatenated
# archives in order). /bench-init is the kernel's rdinit: it starts /bench-net.sh and
# becomes the tiny guest's /init.
BENCH_INIT = """#!/bin/busybox sh
/bin/busybox sh /bench-net.sh &
exec /init
"""

BENCH_NET = r"""# Beside the tiny guest's init: NICs by MAC, a ping, TCP loops (bench/network.py).
until [ -e /proc/cmdline ] && [ -e /bin/ip ] && [ -d /sys/class/net ]; do
  /bin/busybox sleep 0.02
done
export PATH=/bin
bench_if=""; bench_ping=""; bench_listen=""; bench_pull=""; bench_ctrl=""
for w in $(cat /proc/cmdline); do
  case "$w" in
    bench_if=*) bench_if=${w#bench_if=} ;;
    bench_ping=*) bench_ping=${w#bench_ping=} ;;
    bench_listen=*) bench_listen=${w#bench_listen=} ;;
    bench_pull=*) bench_pull=${w#bench_pull=} ;;
    bench_ctrl=*) bench_ctrl=${w#bench_ctrl=} ;;
  esac
done
mkdir -p /tmp
rm -f /tmp/bench-hold
mkfifo /tmp/bench-hold
exec 5<>/tmp/bench-hold  # a stdin that never ends, for nc waiting on the network

# bench_if=MAC=ADDR/PREFIX,...: give each NIC its address and bring it up as soon as it
# appears (at boot or hot-added): `BENCH-NIC mac=M dev=D t=UPTIME`.
pending=$(echo "$bench_if" | tr ',' ' ')
while [ -n "$pending" ]; do
  left=""
  for e in $pending; do
    mac=${e%%=*}; dev=""
    for f in /sys/class/net/*/address; do
      [ -e "$f" ] || continue
      read a < "$f"
      [ "$a" = "$mac" ] && { dev=${f%/address}; dev=${dev##*/}; }
    done
    if [ -n "$dev" ]; then
      ip addr add "${e#*=}" dev "$dev"
      ip link set "$dev" up
      read t _ < /proc/uptime
      echo "BENCH-NIC mac=$mac dev=$dev t=$t"
    else
      left="$left $e"
    fi
  done
  pending=$left
  [ -z "$pending" ] || sleep 0.02
done

# bench_ping=IP: ping every 50 ms until the first reply: `BENCH-PING peer=IP ok t=UPTIME
# seq=N` (N pings were unanswered before it), or `BENCH-PING peer=IP fail` after 60 s.
if [ -n "$bench_ping" ]; then
  (
    ping -i 0.05 -w 60 "$bench_ping" 2>/dev/null | {
      r=fail
      while read -r l; do
        case "$l" in *"bytes from"*)
          read t _ < /proc/uptime
          s=${l#*seq=}; s=${s%% *}
          echo "BENCH-PING peer=$bench_ping ok t=$t seq=$s"; r=ok; break ;;
        esac
      done
      [ "$r" = ok ] || echo "BENCH-PING peer=$bench_ping fail"
    }
  ) &
fi

# bench_listen=PORT: a persistent receiver; bench_pull=IP:PORT: a receiver that connects
# out (user-mode), again after every transfer. Both report with /bench-sink.sh.
[ -z "$bench_listen" ] || nc -ll -p "$bench_listen" -e /bench-sink.sh &
if [ -n "$bench_pull" ]; then
  (
    while true; do
      nc "${bench_pull%:*}" "${bench_pull##*:}" -e /bench-sink.sh 2>/dev/null
      sleep 0.2
    done
  ) &
fi

# bench_ctrl=IP:PORT: a sender that takes `ID IP PORT BLOCKS` from the host, sends 1 +
# BLOCKS*64 KiB there and reports `BENCH-SEND id=ID rc=RC t0=UPTIME t1=UPTIME` (its own
# view, up to the socket's close; the receiver's report is the measurement).
if [ -n "$bench_ctrl" ]; then
  (
    while true; do
      cmd=$(nc "${bench_ctrl%:*}" "${bench_ctrl##*:}" <&5 2>/dev/null)
      if [ -z "$cmd" ]; then sleep 0.2; continue; fi
      set -- $cmd
      read t0 _ < /proc/uptime
      BENCH_BLOCKS=$4 nc "$2" "$3" -e /bench-source.sh 2>/dev/null
      rc=$?
      read t1 _ < /proc/uptime
      echo "BENCH-SEND id=$1 rc=$rc t0=$t0 t1=$t1"
    done
  ) &
fi
"""

BENCH_SOURCE = """#!/bin/sh
# stdout is the socket (nc -e): one byte, then $BENCH_BLOCKS blocks of 64 KiB
dd if=/dev/zero bs=1 count=1 2>/dev/null
exec dd if=/dev/zero bs=65536 count="$BENCH_BLOCKS" 2>/dev/null
"""

BENCH_SINK = """#!/bin/sh
# stdin is the socket (nc -e): time from the first byte to EOF.
dd of=/dev/null bs=1 count=1 2>/dev/null
read t0 _ < /proc/uptime
r=$(dd of=/dev/null bs=65536 iflag=fullblock 2>&1 | sed -n 's/ records in$//p')
read t1 _ < /proc/uptime
echo "BENCH-RECV records=$r t0=$t0 t1=$t1" > /dev/console
"""

NIC_RE = re.compile(r"BENCH-NIC mac=(?P<mac>\S+) dev=(?P<dev>\S+) t=(?P<t>[0-9.]+)")
PING_RE = re.compile(r"BENCH-PING peer=(?P<peer>\S+) (?:ok t=(?P<t>[0-9.]+) seq=(?P<seq>\d+)"
                     r"|(?P<fail>fail))")
RECV_RE = re.compile(r"BENCH-RECV records=(?P<full>\d+)\+(?P<part>\d+) "
                     r"t0=(?P<t0>[0-9.]+) t1=(?P<t1>[0-9.]+)")
SEND_RE = re.compile(r"BENCH-SEND id=(?P<id>\S+) rc=(?P<rc>\d+)")

T = TypeVar("T")


@dataclass(frozen=True)
class NetGuest:
    """The tiny guest with the benchmark's layer (its kernel, the combined initrd)."""

    kernel: Path
    initrd: Path

    @staticmethod
    def append(ifs: dict[str, str], ping: str | None = None, listen: int | None = None,
               pull: str | None = None, ctrl: str | None = None) -> str:
        args = tinyguest.TinyGuest.append() + " rdinit=/bench-init"
        args += " bench_if=" + ",".join(f"{mac}={addr}" for mac, addr in ifs.items())
        for key, value in (("ping", ping), ("listen", listen), ("pull", pull),
                           ("ctrl", ctrl)):
            if value is not None:
                args += f" bench_{key}={value}"
        return args


def build_net_guest(work: Path) -> NetGuest:
    guest = build_guest(work)
    layer = Path(tempfile.mkdtemp(prefix="bench-layer-", dir=work))
    try:
        (layer / "tmp").mkdir()
        # sh gives a background job /dev/null as stdin; devtmpfs is not mounted yet
        (layer / "dev").mkdir()
        os.mknod(layer / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        for name, text in (("bench-init", BENCH_INIT), ("bench-net.sh", BENCH_NET),
                           ("bench-source.sh", BENCH_SOURCE), ("bench-sink.sh", BENCH_SINK)):
            (layer / name).write_text(text)
            (layer / name).chmod(0o755)
        files = sorted(str(p.relative_to(layer)) for p in layer.rglob("*"))
        cpio = run.run(["cpio", "-o", "-H", "newc", "--quiet"], input="\n".join(files).encode(),
                       cwd=layer, timeout=CPIO_TIMEOUT).stdout
    finally:
        shutil.rmtree(layer, ignore_errors=True)
    initrd = guest.initrd.parent / "bench-initrd.gz"
    initrd.write_bytes(guest.initrd.read_bytes() + gzip.compress(cpio, compresslevel=6))
    initrd.chmod(0o644)
    return NetGuest(kernel=guest.kernel, initrd=initrd)


def mac(n: int) -> str:
    return f"52:54:00:be:{n >> 8:02x}:{n & 0xff:02x}"


# the agent, in a network namespace of its own


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    run.run(["ip", "netns", "add", name], timeout=IP_TIMEOUT)
    try:
        # user-mode networking connects 10.0.2.2 to the namespace's 127.0.0.1
        run.run(["ip", "-n", name, "link", "set", "lo", "up"], timeout=IP_TIMEOUT)
        yield name
    finally:
        run.run(["ip", "netns", "del", name], timeout=IP_TIMEOUT, check=False)


class NetnsAgent(Agent):
    """An Agent whose `hvagent serve` runs under `ip netns exec` (which execs it: the
    process is the agent's). Clients use its unix socket, a file any namespace sees."""

    def __init__(self, root: Path, library: list[str], ns: str) -> None:
        super().__init__(root, library)
        self.ns = ns

    def start(self) -> None:
        log = (self.root / "agent.log").open("ab")
        self.proc = run.spawn(["ip", "netns", "exec", self.ns, sys.executable, "-m",
                               "hvagent.cli.hvagent", "serve", "--config", self.config],
                              stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hvagent exited: {(self.root / 'agent.log').read_text()}")
            try:
                if self.client.get("/agent").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"hvagent did not answer in {START_TIMEOUT:g} s")


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """fn() run by a thread that entered namespace `ns` first (a socket stays in the
    namespace it was made in, whichever thread uses it later)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(IP_TIMEOUT)
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


class Console:
    """A VM's serial log, read as it grows: `wait(regex)` is the next matching line
    after the previous wait's, and the moment this poll (every 10 ms) saw it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def skip(self) -> None:
        """Ignore what is in the log now."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def wait(self, regex: re.Pattern[str], timeout: float) -> tuple[re.Match[str], float]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.path.open("rb") as f:
                    f.seek(self.offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            seen = time.perf_counter()
            end = data.rfind(b"\n") + 1  # whole lines only
            m = regex.search(data[:end].decode("latin-1"))  # one char per byte
            if m:
                self.offset += m.end()
                return m, seen
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path.name}: no {regex.pattern[:30]!r} line in "
                                   f"{timeout:g} s; tail: {data[-300:]!r}")
            time.sleep(0.01)


def boot(agent: Agent, guest: NetGuest, name: str, append: str,
         nics: list[dict[str, Any]]) -> Console:
    vm = agent.ok("POST", "/vms", json={
        "name": name, "vcpus": 1, "memory_mib": MEMORY_MIB, "kernel": str(guest.kernel),
        "initrd": str(guest.initrd), "append": append, "nics": nics})
    agent.ok("POST", f"/vms/{name}/start")
    log = Path(vm["serial_log"])
    Console(log).wait(tinyguest.STATE_RE, BOOT_TIMEOUT)  # the tiny guest's init loops
    return Console(log)  # from the start: BENCH-NIC lines may precede the state line


def remove(agent: Agent, name: str) -> None:
    agent.ok("POST", f"/vms/{name}/stop", json={"force": True})
    agent.ok("DELETE", f"/vms/{name}")


# 1. hot-add


HOTADD = {  # kind: (the NIC's body without its MAC, the guest's address, its peer)
    "bridge": ({"vlan": VLAN}, "10.78.0.10/24", "10.78.0.2"),
    "user": ({"network": "user"}, USER_IP, USER_GW),
}


def hotadd_round(agent: Agent, guest: NetGuest, kind: str, i: int) -> dict[str, float]:
    body, addr, peer = HOTADD[kind]
    name, m = f"hot-{kind}-{i}", mac(0x100 + i * 2 + (kind == "user"))
    con = boot(agent, guest, name, guest.append({m: addr}, ping=peer), nics=[])
    try:
        t0 = time.perf_counter()
        agent.ok("POST", f"/vms/{name}/nics", json={**body, "mac": m})
        t: dict[str, float] = {"request": time.perf_counter() - t0}
        nic, seen = con.wait(NIC_RE, HOTADD_TIMEOUT)
        t["configured"] = seen - t0
        ping, seen = con.wait(PING_RE, HOTADD_TIMEOUT)
        if ping["fail"]:
            raise RuntimeError(f"{name}: the hot-added NIC never reached {peer}")
        t["ping"] = seen - t0
        t["guest"] = float(ping["t"]) - float(nic["t"])  # guest clock, NIC up -> reply
        t["lost"] = float(ping["seq"])
        return t
    finally:
        remove(agent, name)


# 2. throughput


class HostEnd:
    """This script's sockets in the agent's namespace: the senders' order ports, the
    relay between two user-mode guests, and the sink."""

    def __init__(self, ns: str) -> None:
        def listen() -> dict[int, socket.socket]:
            return {p: socket.create_server(("127.0.0.1", p))
                    for p in (CTRL_BRIDGE, CTRL_USER, RELAY_IN, RELAY_OUT, SINK_PORT)}

        self.srv = in_netns(ns, listen)
        for s in self.srv.values():
            s.settimeout(TRANSFER_TIMEOUT)

    def close(self) -> None:
        for s in self.srv.values():
            s.close()

    def order(self, ctrl: int, line: str) -> None:
        """Give the sender waiting on port `ctrl` its next transfer."""
        conn, _ = self.srv[ctrl].accept()
        with conn:
            conn.sendall(line.encode() + b"\n")

    def relay(self) -> dict[str, Any]:
        """One relayed transfer, RELAY_IN -> RELAY_OUT (the receiver is already
        connected and waiting)."""
        out, _ = self.srv[RELAY_OUT].accept()
        inp, _ = self.srv[RELAY_IN].accept()
        n = 0
        with out, inp:
            for s in (out, inp):
                s.settimeout(TRANSFER_TIMEOUT)
            buf = bytearray(256 * 1024)
            view = memoryview(buf)
            while k := inp.recv_into(buf):
                out.sendall(view[:k])
                n += k
            out.shutdown(socket.SHUT_WR)
            while out.recv(4096):  # the receiver closes once it has it all
                pass
        return {"bytes": n}

    def sink(self) -> dict[str, Any]:
        conn, _ = self.srv[SINK_PORT].accept()
        with conn:
            conn.settimeout(TRANSFER_TIMEOUT)
            buf = bytearray(256 * 1024)
            n = conn.recv_into(buf)
            t0 = time.perf_counter()
            while k := conn.recv_into(buf):
                n += k
            return {"bytes": n, "seconds": time.perf_counter() - t0}


class Background:
    """fn() in a thread; `result()` joins it and returns its value or raises."""

    def __init__(self, fn: Callable[[], dict[str, Any]]) -> None:
        self.out: dict[str, Any] = {}

        def target() -> None:
            try:
                self.out["value"] = fn()
            except BaseException as e:
                self.out["error"] = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def result(self) -> dict[str, Any]:
        self.thread.join(TRANSFER_TIMEOUT)
        if self.thread.is_alive():
            raise RuntimeError(f"host side did not finish in {TRANSFER_TIMEOUT:g} s")
        if "error" in self.out:
            raise self.out["error"]
        return self.out["value"]  # type: ignore[no-any-return]


PATHS = ("bridge", "relay", "sink", "loopback")


class Pairs:
    """The four throughput guests: A and B on VLAN 10 (A with a user-mode NIC for its
    orders), A' and B' on user-mode networking."""

    def __init__(self, agent: Agent, guest: NetGuest, host: HostEnd) -> None:
        self.agent, self.host = agent, host
        ctrl_b, ctrl_u = f"{USER_GW}:{CTRL_BRIDGE}", f"{USER_GW}:{CTRL_USER}"
        specs = {
            "net-a": ({mac(1): "10.78.0.1/24", mac(2): USER_IP},
                      {"listen": GUEST_PORT, "ctrl": ctrl_b},
                      [{"vlan": VLAN, "mac": mac(1)}, {"network": "user", "mac": mac(2)}]),
            "net-b": ({mac(3): "10.78.0.2/24"}, {"listen": GUEST_PORT},
                      [{"vlan": VLAN, "mac": mac(3)}]),
            "net-ua": ({mac(4): USER_IP}, {"ctrl": ctrl_u},
                       [{"network": "user", "mac": mac(4)}]),
            "net-ub": ({mac(5): USER_IP}, {"pull": f"{USER_GW}:{RELAY_OUT}"},
                       [{"network": "user", "mac": mac(5)}]),
        }
        self.con: dict[str, Console] = {}
        for name, (ifs, roles, nics) in specs.items():
            self.con[name] = boot(agent, guest, name, guest.append(ifs, **roles), nics)
        for name, (ifs, _, _) in specs.items():
            for _ in ifs:
                self.con[name].wait(NIC_RE, BOOT_TIMEOUT)

    def remove(self) -> None:
        for name in self.con:
            with contextlib.suppress(Exception):
                remove(self.agent, name)

    def transfer(self, path: str, tag: str, blocks: int) -> float:
        """One transfer on `path`: the receiver's seconds from the first byte to EOF."""
        expect = 1 + blocks * BLOCK
        job = None
        if path == "bridge":
            sender, ctrl, receiver, dest = "net-a", CTRL_BRIDGE, "net-b", f"10.78.0.2 {GUEST_PORT}"
        elif path == "loopback":
            sender, ctrl, receiver, dest = "net-a", CTRL_BRIDGE, "net-a", f"127.0.0.1 {GUEST_PORT}"
        elif path == "relay":
            sender, ctrl, receiver, dest = "net-ua", CTRL_USER, "net-ub", f"{USER_GW} {RELAY_IN}"
            job = Background(self.host.relay)
        else:
            sender, ctrl, receiver, dest = "net-ua", CTRL_USER, None, f"{USER_GW} {SINK_PORT}"
            job = Background(self.host.sink)
        # One reader each, also when both are A (the receiver may report first).
        send_log = Console(self.con[sender].path)
        recv_log = Console(self.con[receiver].path) if receiver else None
        for c in (send_log, recv_log):
            if c is not None:
                c.skip()
        self.host.order(ctrl, f"{tag} {dest} {blocks}")
        send, _ = send_log.wait(SEND_RE, TRANSFER_TIMEOUT)
        if send["id"] != tag or send["rc"] != "0":
            raise RuntimeError(f"{path} {tag}: sender reports {send.group(0)}")
        host = job.result() if job else {}
        if receiver is None:
            if host["bytes"] != expect:
                raise RuntimeError(f"sink got {host['bytes']} bytes of {expect}")
            return float(host["seconds"])
        if "bytes" in host and host["bytes"] != expect:
            raise RuntimeError(f"relay moved {host['bytes']} bytes of {expect}")
        assert recv_log is not None
        recv, _ = recv_log.wait(RECV_RE, TRANSFER_TIMEOUT)
        if (int(recv["full"]), int(recv["part"])) != (blocks, 0):
            raise RuntimeError(f"{path} {tag}: {receiver} got {recv.group(0)}, "
                               f"not {blocks} blocks")
        time.sleep(0.2)  # the receiver listens (or connects) again
        return float(recv["t1"]) - float(recv["t0"])


def bench_throughput(pairs: Pairs, rounds: int, mib: int) -> dict[str, list[float]]:
    blocks = mib * 1024 * 1024 // BLOCK
    for path in PATHS:
        pairs.transfer(path, f"warm-{path}", max(1, blocks // 8))
    out: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(rounds):
        order = PATHS[i % len(PATHS):] + PATHS[:i % len(PATHS)]  # a different first each round
        for path in order:
            secs = pairs.transfer(path, f"r{i}-{path}", blocks)
            out[path].append((1 + blocks * BLOCK) / 2**20 / secs)
        say(f"throughput round {i + 1}: " + ", ".join(
            f"{p} {out[p][-1]:.1f} MiB/s" for p in PATHS))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64, help="MiB per transfer")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-network-"))
    work.chmod(0o755)
    hot: dict[str, list[dict[str, float]]] = {k: [] for k in HOTADD}
    try:
        guest = build_net_guest(work)
        with netns(f"hvb-net-{os.getpid()}") as ns:
            (work / "agent").mkdir()
            agent = NetnsAgent(work / "agent", library_for(guest), ns)
            agent.start()
            host = None
            pairs = None
            try:
                accel = agent.ok("GET", "/agent")
                say(f"accelerator: {accel['accel']} ({accel['accel_reason']})")
                host = HostEnd(ns)
                say("booting the throughput guests (A, B on VLAN 10; A', B' user-mode)")
                pairs = Pairs(agent, guest, host)
                say(f"hot-add: {args.rounds} rounds, each kind in a fresh VM")
                for i in range(args.rounds):
                    for kind in (HOTADD if i % 2 == 0 else reversed(HOTADD)):
                        t = hotadd_round(agent, guest, kind, i)
                        hot[kind].append(t)
                        say(f"hot-add {kind} round {i + 1}: " + ", ".join(
                            f"{k} {v:.3f}" for k, v in t.items()))
                say(f"throughput: {args.rounds} rounds of {args.mib} MiB per path")
                tput = bench_throughput(pairs, args.rounds, args.mib)
            finally:
                if pairs is not None:
                    pairs.remove()
                if host is not None:
                    host.close()
                agent.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(t[key] for t in hot[kind])

    user = statistics.median(tput["relay"])
    bridge = statistics.median(tput["bridge"])
    print()
    print(f"NIC hot-add to a running VM ({args.rounds} rounds, a fresh VM each), from the "
          "request to:")
    print(f"{'(median s)':<50}{'VLAN 10':>10}{'user-mode':>11}{'ratio':>8}")
    for key, label in (("request", "POST /nics answered"),
                       ("configured", "guest has the NIC up and addressed"),
                       ("ping", "first ping answered (VLAN peer / 10.0.2.2)")):
        a, b = med("bridge", key), med("user", key)
        print(f"  {label:<48}{a:>10.3f}{b:>11.3f}{a / b:>8.2f}")
    print(f"  {'guest clock, NIC up -> first reply':<48}{med('bridge', 'guest'):>10.3f}"
          f"{med('user', 'guest'):>11.3f}")
    print()
    print(f"TCP, {args.mib} MiB per transfer, {args.rounds} rounds, timed by the receiver "
          "(first byte to EOF):")
    print(f"{'(median MiB/s, min-max)':<50}{'MiB/s':>10}{'/bridge':>11}")
    for path, label in (("bridge", "guest -> guest, VLAN 10 bridge (tap, hvbr10)"),
                        ("relay", "guest -> guest, user-mode (slirp, relay, slirp)"),
                        ("sink", "guest -> host, user-mode (one slirp hop)"),
                        ("loopback", "guest loopback (the tools' ceiling)")):
        v = statistics.median(tput[path])
        print(f"  {label:<48}{v:>10.1f}{v / bridge:>11.2f}"
              f"   ({min(tput[path]):.1f}-{max(tput[path]):.1f})")
    print(f"guest to guest, bridge / user-mode: {bridge / user:.2f}x faster; "
          "no numeric target was set for these figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
