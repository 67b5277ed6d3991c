"""A tiny Linux guest for tests and benchmarks: a stock Debian kernel plus a busybox
initramfs whose init reports its state on the serial console.

Serial protocol (one line each, stable for tests to parse):
  `TINY-BOOT ok`                       once, when init is up and the modules are loaded
  `TINY-TAG TAG`                       once, right after `TINY-BOOT ok`, with
                                       `tiny_tag=TAG` on the kernel command line (TAG:
                                       letters, digits, `._-`): which boot this was
  `TINY cpus=N memkb=N disks=vda,vdb nics=eth0 counter=N`
                                       every ~0.5 s; `counter` lives in guest memory, so a
                                       memory revert shows as a counter going back
  `TINY-POWEROFF`                      when the ACPI power button was pressed, or after
                                       N state lines with `tiny_poweroff_after=N` on the
                                       kernel command line
  `TINY-PANIC`                         then init exits (the kernel panics: "Attempted
                                       to kill init"), after N state lines with
                                       `tiny_panic_after=N` on the kernel command line
  `TINY-PING peer=IP ok|fail`          per peer and round with `tiny_ip=ADDR/PREFIX
                                       tiny_ping=IP,...` (eth0's address; peers to ping)
  `TINY-DHCP ip=A.B.C.D/PREFIX router=R dns=D`
  `TINY-DHCP fail`                     once, with `tiny_dhcp`: busybox udhcpc on eth0
                                       (retries for ~60 s) got a lease / gave up; R and D
                                       are the first router / DNS server, empty if the
                                       lease has none (`router= dns=`). The DNS servers
                                       go to /etc/resolv.conf; udhcpc keeps renewing
  `TINY-RESOLVE name=NAME ip=IP|fail`  per name and round with `tiny_resolve=NAME,...`
                                       (busybox nslookup, A record, against the DHCP
                                       DNS server, else /etc/resolv.conf)
  `TINY-TCP peer=IP:PORT ok DATA|fail` per peer and round with `tiny_tcp=IP:PORT,...`:
                                       busybox nc connects (3 s timeout, 5 s in all),
                                       DATA is the first line the server sent, trimmed
                                       (inner spaces kept); nothing received counts as
                                       fail; a server that keeps the connection open
                                       costs the round the full 5 s
More network switches: `tiny_vlans=VID:ADDR/PREFIX,...` adds 802.1Q interfaces eth0.VID
with those addresses (module 8021q), `tiny_forward` sets net.ipv4.ip_forward=1 (a router
guest), `tiny_route=DEST/PREFIX:GW,...` adds static routes. Order: modules, vlans,
`tiny_ip` or `tiny_dhcp`, routes, then rounds (~0.5 s apart) of pings, resolves and TCP
checks. With `tiny_dhcp` all that runs in the background, so the state lines start
right after `TINY-BOOT ok`; without it the addresses and routes are set before.
With `tiny_disk_log` on the kernel command line, each state line is also written to the
first disk (/dev/vda, no file system) as 512-byte block number `counter`, synced: what the
disk holds shows how far the guest got (a disk revert drops the later blocks).
Init onlines hot-added CPUs and memory blocks, and powers off on the ACPI power button
(the `button` + `evdev` modules expose it as an input device; one event read = press).
`pvpanic_mmio` drives QEMU's pvpanic device, so that a panic reaches the host.

Use `append()` as the kernel command line. For memory hotplug pass
`append(memory_hotplug=True)` (adds memhp_default_state=online_movable); the network
switches above are `append(ip=, ping=, dhcp=, resolve=, tcp=, vlans=, forward=, routes=)`,
the tag is `append(tag=)`.
"""

from __future__ import annotations

import glob
import gzip
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

KERNEL_CACHE = Path("/var/cache/corehost/kernel")
# An agent takes a kernel or initrd only from its storage directory or a policy
# `library`: the agents the tests start name the kernel cache and the directory the
# session builds the guest in (`session_dir`, set by conftest) as their library.
BUILD_DIR = "tinyguest"
session_dir: Path | None = None


def library(guest_dir: Path | None = None) -> list[str]:
    """The policy `library` that lets an agent boot the tiny guest built in `guest_dir`
    (default: the test session's)."""
    d = guest_dir or session_dir
    return [str(KERNEL_CACHE), *([str(d)] if d is not None else [])]
BUSYBOX = Path("/bin/busybox")
# Modules the guest needs, dependencies are resolved from the modules themselves.
# A module the kernel lacks is skipped (and insmod errors are ignored at boot).
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev",
                  "pvpanic_mmio", "8021q")
BOOT_MARKER = "TINY-BOOT ok"
TAG_PATTERN = "A-Za-z0-9._-"  # what a tag may hold: one shell `[...]` class, one regex
TAG_RE = re.compile(rf"TINY-TAG (?P<tag>[{TAG_PATTERN}]+)")
POWEROFF_MARKER = "TINY-POWEROFF"
PANIC_MARKER = "TINY-PANIC"
PING_RE = re.compile(r"TINY-PING peer=(?P<peer>[0-9.]+) (?P<result>ok|fail)")
DHCP_RE = re.compile(
    r"TINY-DHCP (?:ip=(?P<ip>[0-9./]+) router=(?P<router>[0-9.]*) dns=(?P<dns>[0-9.]*)"
    r"|(?P<fail>fail))"
)
RESOLVE_RE = re.compile(r"TINY-RESOLVE name=(?P<name>\S+) (?:ip=(?P<ip>[0-9.]+)|fail)")
TCP_RE = re.compile(r"TINY-TCP peer=(?P<peer>[0-9.]+:\d+) (?:ok (?P<data>[^\r\n]*)|fail)")
STATE_RE = re.compile(
    r"TINY cpus=(?P<cpus>\d+) memkb=(?P<memkb>\d+) disks=(?P<disks>\S*) "
    r"nics=(?P<nics>\S*) counter=(?P<counter>\d+)"
)

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do insmod "/modules/$m" 2>/dev/null; done
ip link set lo up 2>/dev/null
# ACPI power button: open its evdev node before announcing the boot, so that a press
# right after the marker is queued for us, then block on one event (= a press).
pwrbtn=""
for i in $(seq 50); do
  for ev in /sys/class/input/event*; do
    [ -e "$ev/device/name" ] && [ "$(cat "$ev/device/name")" = "Power Button" ] \
      && [ -e "/dev/input/${ev##*/}" ] && pwrbtn="/dev/input/${ev##*/}"
  done
  [ -n "$pwrbtn" ] && break
  sleep 0.1
done
if [ -n "$pwrbtn" ]; then
  exec 3< "$pwrbtn"
  (
    n=$(dd bs=24 count=1 <&3 2>/dev/null | wc -c)
    if [ "$n" -ge 24 ]; then
      echo "TINY-POWEROFF"
      sync
      poweroff -f
    fi
  ) &
else
  echo "TINY-WARNING no ACPI power button"
fi
echo "TINY-BOOT ok"
cmdline=" $(cat /proc/cmdline) "
arg() { echo "$cmdline" | sed -n "s/.* $1=\([$2]*\) .*/\1/p"; }
flag() { case "$cmdline" in *" $1 "*) return 0 ;; esac; return 1; }
tiny_tag=$(arg tiny_tag @TAG_PATTERN@)
if [ -n "$tiny_tag" ]; then echo "TINY-TAG $tiny_tag"; fi

# Networking, see the module docstring: vlans, tiny_ip or tiny_dhcp, routes, then rounds
# of pings (tiny_ping=IP,...), lookups (tiny_resolve=NAME,...) and TCP checks
# (tiny_tcp=IP:PORT,...).
tiny_ip=$(arg tiny_ip 0-9./)
tiny_ping=$(arg tiny_ping 0-9.,)
tiny_vlans=$(arg tiny_vlans 0-9.:/,)
tiny_route=$(arg tiny_route 0-9.:/,)
tiny_resolve=$(arg tiny_resolve A-Za-z0-9._,-)
tiny_tcp=$(arg tiny_tcp 0-9.:,)
tiny_dhcp=""; flag tiny_dhcp && tiny_dhcp=1
flag tiny_forward && echo 1 > /proc/sys/net/ipv4/ip_forward
dns=""

wait_eth0() {
  for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
}
net_vlans() {
  [ -n "$tiny_vlans" ] || return 0
  wait_eth0
  ip link set eth0 up
  for v in $(echo "$tiny_vlans" | tr ',' ' '); do
    vid=${v%%:*}
    ip link add link eth0 name "eth0.$vid" type vlan id "$vid" 2>/dev/null \
      || vconfig add eth0 "$vid" >/dev/null 2>&1 \
      || echo "TINY-WARNING no vlan eth0.$vid"
    ip addr add "${v#*:}" dev "eth0.$vid"
    ip link set "eth0.$vid" up
  done
}
net_dhcp() {
  wait_eth0
  ip link set eth0 up
  rm -f /tmp/dhcp.env
  # 20 discovers 3 s apart (~60 s), then give up (-n); once bound udhcpc goes to the
  # background and renews.
  udhcpc -i eth0 -s /etc/udhcpc.script -t 20 -T 3 -n >/tmp/udhcpc.log 2>&1
  if [ -s /tmp/dhcp.env ]; then
    . /tmp/dhcp.env
    dns=$dhcp_dns
    echo "TINY-DHCP ip=$dhcp_ip router=$dhcp_router dns=$dhcp_dns"
  else
    echo "TINY-DHCP fail"
  fi
}
net_setup() {
  net_vlans
  if [ -n "$tiny_ip" ]; then
    wait_eth0
    ip addr add "$tiny_ip" dev eth0
    ip link set eth0 up
  elif [ -n "$tiny_dhcp" ]; then
    net_dhcp
  fi
  for r in $(echo "$tiny_route" | tr ',' ' '); do
    ip route add "${r%%:*}" via "${r#*:}"
  done
}
net_round() {
  for peer in $(echo "$tiny_ping" | tr ',' ' '); do
    if ping -c 1 -W 1 "$peer" >/dev/null 2>&1; then r=ok; else r=fail; fi
    echo "TINY-PING peer=$peer $r"
  done
  for name in $(echo "$tiny_resolve" | tr ',' ' '); do
    # nslookup exits 1 when any of its A/AAAA queries fails: go by the answer section.
    a=$(timeout 5 nslookup "$name" $dns 2>/dev/null \
        | sed -n '/^Name:/,$ s/^Address: *\([0-9][0-9.]*\)$/\1/p' | head -n 1)
    if [ -n "$a" ]; then echo "TINY-RESOLVE name=$name ip=$a"
    else echo "TINY-RESOLVE name=$name fail"; fi
  done
  for peer in $(echo "$tiny_tcp" | tr ',' ' '); do
    d=$(timeout 5 nc -w 3 "${peer%:*}" "${peer##*:}" </dev/null 2>/dev/null | head -n 1 \
        | tr -d '\r' | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
    if [ -n "$d" ]; then echo "TINY-TCP peer=$peer ok $d"
    else echo "TINY-TCP peer=$peer fail"; fi
  done
}
net_rounds() {
  [ -n "$tiny_ping$tiny_resolve$tiny_tcp" ] || return 0
  while true; do
    net_round
    sleep 0.5
  done
}
if [ -n "$tiny_dhcp" ] && [ -z "$tiny_ip" ]; then
  (net_setup; net_rounds) &
else
  net_setup
  net_rounds &
fi

disklog=""
case " $(cat /proc/cmdline) " in *" tiny_disk_log "*) disklog=1 ;; esac
# tiny_poweroff_after=N on the kernel command line: power off after N state lines.
poweroff_after=$(sed -n 's/.*tiny_poweroff_after=\([0-9]*\).*/\1/p' /proc/cmdline)
# tiny_panic_after=N: init exits after N state lines, which panics the kernel.
panic_after=$(sed -n 's/.*tiny_panic_after=\([0-9]*\).*/\1/p' /proc/cmdline)

join() { tr '\n' ',' | sed 's/,$//'; }
counter=0
while true; do
  for f in /sys/devices/system/cpu/cpu*/online /sys/devices/system/memory/memory*/online; do
    [ -e "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 > "$f" 2>/dev/null
  done
  cpus=$(grep -c ^processor /proc/cpuinfo)
  memkb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
  disks=$(ls /sys/block | grep ^vd | join)
  nics=$(ls /sys/class/net | grep -v ^lo$ | join)
  echo "TINY cpus=$cpus memkb=$memkb disks=$disks nics=$nics counter=$counter"
  if [ -n "$disklog" ] && [ -b /dev/vda ]; then
    echo "TINY-DISK counter=$counter" \
      | dd of=/dev/vda bs=512 seek="$counter" conv=sync,notrunc,fsync 2>/dev/null
  fi
  counter=$((counter + 1))
  if [ -n "$poweroff_after" ] && [ "$counter" -ge "$poweroff_after" ]; then
    echo "TINY-POWEROFF"
    sync
    poweroff -f
  fi
  if [ -n "$panic_after" ] && [ "$counter" -ge "$panic_after" ]; then
    echo "TINY-PANIC"
    exit 1
  fi
  sleep 0.5
done
""".replace("@TAG_PATTERN@", TAG_PATTERN)

# busybox udhcpc runs this on its events (-s): apply the lease to eth0 and leave it in
# /tmp/dhcp.env for init to report.
UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    prefix=$mask
    [ -n "$prefix" ] || prefix=$(ipcalc -p "$ip" "$subnet" | sed 's/^PREFIX=//')
    [ -n "$prefix" ] || prefix=32
    if [ "$1" = bound ] || ! ip -4 addr show dev "$interface" | grep -q " $ip/"; then
      ip -4 addr flush dev "$interface"
      ip addr add "$ip/$prefix" dev "$interface"
    fi
    if [ -n "$router" ]; then
      while ip route del default dev "$interface" 2>/dev/null; do :; done
      for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    fi
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    set -- $router; first_router=$1
    set -- $dns; first_dns=$1
    {
      echo "dhcp_ip=$ip/$prefix"
      echo "dhcp_router=$first_router"
      echo "dhcp_dns=$first_dns"
    } > /tmp/dhcp.env.new
    mv /tmp/dhcp.env.new /tmp/dhcp.env
    ;;
esac
exit 0
"""


@dataclass(frozen=True)
class TinyGuest:
    kernel: Path
    initrd: Path

    @staticmethod
    def append(memory_hotplug: bool = False, ip: str | None = None,
               ping: Sequence[str] = (), *, dhcp: bool = False,
               resolve: Sequence[str] = (), tcp: Sequence[str] = (),
               vlans: Mapping[int, str] | None = None, forward: bool = False,
               routes: Mapping[str, str] | None = None, tag: str | None = None) -> str:
        """The kernel command line. `ip` ("ADDR/PREFIX") or `dhcp` configure eth0;
        `ping` (IPs), `resolve` (names) and `tcp` ("IP:PORT") are checked every round;
        `vlans` maps a VLAN id to the "ADDR/PREFIX" of eth0.VID; `forward` makes the
        guest route; `routes` maps "DEST/PREFIX" to the gateway IP; `tag` is echoed
        once as `TINY-TAG TAG` (ValueError unless letters, digits and `._-`)."""
        if tag is not None and not re.fullmatch(f"[{TAG_PATTERN}]+", tag):
            raise ValueError(f"tiny guest tag {tag!r}: only letters, digits and ._-")
        args = "console=ttyS0 quiet loglevel=1"
        if ip:
            args += f" tiny_ip={ip}"
        if ping:
            args += f" tiny_ping={','.join(ping)}"
        if dhcp:
            args += " tiny_dhcp"
        if resolve:
            args += f" tiny_resolve={','.join(resolve)}"
        if tcp:
            args += f" tiny_tcp={','.join(tcp)}"
        if vlans:
            args += " tiny_vlans=" + ",".join(f"{int(v)}:{a}" for v, a in vlans.items())
        if forward:
            args += " tiny_forward"
        if routes:
            args += " tiny_route=" + ",".join(f"{d}:{g}" for d, g in routes.items())
        if tag is not None:
            args += f" tiny_tag={tag}"
        return args + (" memhp_default_state=online_movable" if memory_hotplug else "")


def find_kernel(cache: Path = KERNEL_CACHE) -> tuple[Path, Path]:
    """(vmlinuz, modules dir) of the unpacked stock kernel (ci/host-deps.sh puts it there)."""
    kernels = sorted(glob.glob(str(cache / "boot" / "vmlinuz-*")))
    if not kernels:
        raise FileNotFoundError(f"no kernel under {cache}/boot (run ci/host-deps.sh)")
    kernel = Path(kernels[-1])
    version = kernel.name.removeprefix("vmlinuz-")
    return kernel, cache / "lib" / "modules" / version


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def _module_index(moddir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        name = p.name.split(".ko")[0].replace("-", "_")
        index.setdefault(name, p)
    return index


def _deps_from_modules_dep(moddir: Path) -> dict[str, list[str]] | None:
    dep = moddir / "modules.dep"
    if not dep.exists():
        return None
    out: dict[str, list[str]] = {}
    for line in dep.read_text().splitlines():
        mod, _, rest = line.partition(":")
        name = Path(mod).name.split(".ko")[0].replace("-", "_")
        out[name] = [Path(d).name.split(".ko")[0].replace("-", "_") for d in rest.split()]
    return out


def _depends_field(path: Path) -> list[str]:
    # The .modinfo section holds NUL-separated key=value strings, `depends=` among them.
    m = re.search(rb"\x00depends=([^\x00]*)\x00", _read_module(path))
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",")]


def resolve_modules(moddir: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[Path]:
    """Module files in load order (dependencies first). modules.dep when present, else
    the `depends=` field of each module (an unpacked, never installed kernel has no
    modules.dep). Built-in modules are skipped."""
    index = _module_index(moddir)
    table = _deps_from_modules_dep(moddir)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path = index.get(name)
        if path is None:
            return  # built into the kernel
        deps = table.get(name, []) if table is not None else _depends_field(path)
        for d in deps:
            visit(d)
        order.append(path)

    for w in wanted:
        visit(w)
    return order


def build(dest: Path, cache: Path = KERNEL_CACHE) -> TinyGuest:
    """Build the initramfs into `dest` (created) and return the guest's boot files."""
    kernel, moddir = find_kernel(cache)
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tinyguest-root-", dir=dest))
    try:
        for d in ("bin", "proc", "sys", "dev", "modules", "etc", "tmp"):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        names = []
        for i, mod in enumerate(resolve_modules(moddir)):
            # Numbered so that the file order is the load order.
            name = f"{i:02d}-{mod.name.split('.ko')[0]}.ko"
            (root / "modules" / name).write_bytes(_read_module(mod))
            names.append(name)
        (root / "modules.list").write_text("\n".join(names) + "\n")
        init = root / "init"
        init.write_text(INIT)
        init.chmod(0o755)
        script = root / "etc" / "udhcpc.script"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input="\n".join(files).encode(),
            stdout=subprocess.PIPE, check=True, timeout=60,
        ).stdout
        initrd = dest / "tiny-initrd.gz"
        tmp = initrd.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(cpio, compresslevel=6))
        os.replace(tmp, initrd)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return TinyGuest(kernel=kernel, initrd=initrd)


def parse_tag(serial_log: str) -> str | None:
    """The tag of a serial log's `TINY-TAG` line (the first), None when there is none (yet)."""
    m = TAG_RE.search(serial_log)
    return m["tag"] if m else None


def parse_pings(serial_log: str) -> list[tuple[str, bool]]:
    """All `TINY-PING` results of a serial log, oldest first: (peer, reached)."""
    return [(m["peer"], m["result"] == "ok") for m in PING_RE.finditer(serial_log)]


def parse_states(serial_log: str) -> list[dict[str, str]]:
    """All `TINY ...` state lines of a serial log, oldest first."""
    return [m.groupdict() for m in STATE_RE.finditer(serial_log)]


def parse_dhcp(serial_log: str) -> dict[str, str | bool | None] | None:
    """The last `TINY-DHCP` line of a serial log: {"ok": True, "ip": "A.B.C.D/PREFIX",
    "router": IP or None, "dns": IP or None}, {"ok": False} when DHCP failed, None when
    there is no such line (yet)."""
    matches = list(DHCP_RE.finditer(serial_log))
    if not matches:
        return None
    m = matches[-1]
    if m["fail"]:
        return {"ok": False}
    return {"ok": True, "ip": m["ip"], "router": m["router"] or None, "dns": m["dns"] or None}


def parse_resolves(serial_log: str) -> list[tuple[str, str | None]]:
    """All `TINY-RESOLVE` results of a serial log, oldest first: (name, IP or None)."""
    return [(m["name"], m["ip"]) for m in RESOLVE_RE.finditer(serial_log)]


def parse_tcp(serial_log: str) -> list[tuple[str, str | None]]:
    """All `TINY-TCP` results of a serial log, oldest first: ("IP:PORT", the first line
    the server sent, or None when the connection failed)."""
    return [(m["peer"], None if m["data"] is None else m["data"].strip())
            for m in TCP_RE.finditer(serial_log)]
