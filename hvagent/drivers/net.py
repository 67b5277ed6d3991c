"""The network driver: host bridges per VLAN and the VMs' tap devices, over netlink
(pyroute2). Nothing else in the agent creates or removes links.

One bridge per VLAN: VLAN N is the bridge `hvbr<N>`, made when its first port is plugged
and removed when its last port goes. The bridge has no address and no uplink, so the
VLAN is an L2 segment between the VMs on it, isolated from the host and from every other
VLAN. This works on any kernel with bridges. (A kernel with 802.1q and bridge
`vlan_filtering` allows the alternative of a single VLAN-aware bridge with one
`bridge vlan add vid N pvid untagged` entry per tap and a tagged uplink; not built here.)

A NIC's tap is persistent and named after the NIC's MAC address (`hv` + 12 hex digits,
within the 15-character limit of interface names), so QEMU opens it by name
(`-netdev tap,ifname=...`), a start after a crash finds and reuses it, and moving the
NIC to another VLAN is moving its tap to another bridge, live.

pyroute2's synchronous IPRoute runs its own event loop, so inside the agent's loop each
operation runs in a worker thread (`plug`, `unplug`, `vlan_of` are coroutines).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hvagent.errors import OperationFailed

# pyroute2 is imported when a NIC first needs a tap (~9 MiB of the agent's RSS and half a
# second of its start-up; an agent whose VMs use user-mode NICs never loads it).
if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

BRIDGE_PREFIX = "hvbr"
TAP_PREFIX = "hv"


SYS_CLASS_NET = Path("/sys/class/net")


def tap_counters(tap: str) -> dict[str, int] | None:
    """The kernel's counters of a tap, from the host's side (its rx is what the guest
    sent); None when the tap does not exist."""
    d = SYS_CLASS_NET / tap / "statistics"
    try:
        return {k: int((d / k).read_text()) for k in
                ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")}
    except (OSError, ValueError):
        return None


def bridge_name(vlan: int) -> str:
    return f"{BRIDGE_PREFIX}{vlan}"


def tap_name(mac: str) -> str:
    """The tap of the NIC with MAC address `mac` (52:54:00:12:34:56 -> hv525400123456)."""
    return TAP_PREFIX + mac.lower().replace(":", "")


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _ensure(ipr: IPRoute, ifname: str, **kind: str) -> int:
    """The index of `ifname`, created (of `kind`) when missing; tolerates a concurrent
    creator of the same bridge."""
    from pyroute2.netlink.exceptions import NetlinkError

    idx = _index(ipr, ifname)
    if idx is None:
        try:
            ipr.link("add", ifname=ifname, **kind)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        idx = _index(ipr, ifname)
        if idx is None:
            raise OperationFailed(f"{ifname}: created but not found")
        log.info("created %s %s", kind.get("kind"), ifname)
    return idx


def _master(ipr: IPRoute, idx: int) -> str | None:
    master = ipr.get_links(idx)[0].get("IFLA_MASTER")
    if not master:
        return None
    return str(ipr.get_links(master)[0].get("ifname"))


def _prune(ipr: IPRoute, bridge: str | None) -> None:
    """Remove one of our VLAN bridges once no port is left on it."""
    from pyroute2.netlink.exceptions import NetlinkError

    if bridge is None or not bridge.startswith(BRIDGE_PREFIX):
        return
    idx = _index(ipr, bridge)
    if idx is None:
        return
    if any(link.get("IFLA_MASTER") == idx for link in ipr.get_links()):
        return
    try:
        ipr.link("del", index=idx)
        log.info("removed bridge %s (no ports left)", bridge)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise


def _plug(tap: str, vlan: int) -> None:
    """`tap` exists, is up and is a port of VLAN `vlan`'s bridge (created if needed).
    A tap on another VLAN's bridge moves (live, when QEMU holds it open)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            br = _ensure(ipr, bridge_name(vlan), kind="bridge")
            ipr.link("set", index=br, state="up")
            t = _ensure(ipr, tap, kind="tuntap", mode="tap")
            old = _master(ipr, t)
            if old != bridge_name(vlan):
                ipr.link("set", index=t, master=br)
                _prune(ipr, old)
            ipr.link("set", index=t, state="up")
    except NetlinkError as e:
        raise OperationFailed(f"tap {tap} on VLAN {vlan}: {e}") from e


def _unplug(tap: str) -> None:
    """Remove `tap` (if present) and its bridge when that was the last port."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            t = _index(ipr, tap)
            if t is None:
                return
            old = _master(ipr, t)
            ipr.link("del", index=t)
            log.info("removed tap %s", tap)
            _prune(ipr, old)
    except NetlinkError as e:
        raise OperationFailed(f"tap {tap}: cannot remove: {e}") from e


def _vlan_of(tap: str) -> int | None:
    """The VLAN whose bridge `tap` is a port of (None: no such tap, or not on one)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        t = _index(ipr, tap)
        master = _master(ipr, t) if t is not None else None
    if master is None or not master.startswith(BRIDGE_PREFIX):
        return None
    return int(master.removeprefix(BRIDGE_PREFIX))


async def plug(tap: str, vlan: int) -> None:
    """`tap` exists, is up and is a port of VLAN `vlan`'s bridge (created if needed).
    A tap on another VLAN's bridge moves (live, when QEMU holds it open)."""
    await asyncio.to_thread(_plug, tap, vlan)


async def unplug(tap: str) -> None:
    """Remove `tap` (if present) and its bridge when that was the last port."""
    await asyncio.to_thread(_unplug, tap)


async def vlan_of(tap: str) -> int | None:
    """The VLAN whose bridge `tap` is a port of (None: no such tap, or not on one)."""
    return await asyncio.to_thread(_vlan_of, tap)
