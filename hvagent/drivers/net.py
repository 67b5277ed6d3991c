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
import contextlib
import errno
import logging
import os
import re
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
# A managed network's bridge is hvn<num>; in per-VLAN-bridge mode VLAN <v> of it is the
# bridge hvn<num>v<v>, and VLAN <v> of its uplink the 802.1q link hvn<num>u<v>. None is a
# tap name (taps are hv + 12 hex digits: n, r, u, v are not hex).
NETWORK_PREFIX = "hvn"
VLAN_BRIDGE_RE = re.compile(rf"{NETWORK_PREFIX}\d+v\d+")
UPLINK_VLAN_RE = re.compile(rf"{NETWORK_PREFIX}\d+u\d+")
DEFAULT_PVID = 1  # a VLAN-aware bridge's untagged VLAN of a new port


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


def network_bridge(num: int, vlan: int | None = None) -> str:
    """The bridge of managed network number `num`, or of its VLAN `vlan`."""
    return f"{NETWORK_PREFIX}{num}" + (f"v{vlan}" if vlan is not None else "")


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


def _on_demand(bridge: str | None) -> bool:
    """A bridge made with its first port and removed with its last: a VLAN's bridge of
    `bridge` (hvbr<vlan>) or of a managed network (hvn<num>v<vlan>)."""
    return bridge is not None and bool(
        re.fullmatch(rf"{BRIDGE_PREFIX}\d+", bridge) or VLAN_BRIDGE_RE.fullmatch(bridge))


def _prune(ipr: IPRoute, bridge: str | None) -> None:
    """Remove an on-demand bridge once no port is left on it (its uplink VLAN link, if
    it has one, is not a port that keeps it)."""
    from pyroute2.netlink.exceptions import NetlinkError

    if not _on_demand(bridge):
        return
    idx = _index(ipr, str(bridge))
    if idx is None:
        return
    ports = [link for link in ipr.get_links() if link.get("IFLA_MASTER") == idx]
    if any(not UPLINK_VLAN_RE.fullmatch(str(p.get("ifname"))) for p in ports):
        return
    try:
        for p in ports:
            ipr.link("del", index=p["index"])
        ipr.link("del", index=idx)
        log.info("removed bridge %s (no ports left)", bridge)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise


def _plug(tap: str, bridge: str, uplink: str | None = None, vlan: int | None = None,
          filtering: bool = False, trunk: tuple[int, ...] = ()) -> None:
    """`tap` exists, is up and is a port of `bridge` (an on-demand bridge is created if
    needed; with `uplink`, VLAN `vlan` of the uplink joins it). A tap on another bridge
    moves (live, when QEMU holds it open). `filtering`: `bridge` is VLAN-aware, and the
    tap's VLANs there are `vlan` (default 1; none for a trunk without it), untagged and
    its pvid, and the `trunk` VLANs tagged; the uplink carries them all tagged."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            if _on_demand(bridge):
                br = _ensure(ipr, bridge, kind="bridge")
                if uplink is not None and vlan is not None:
                    _uplink_vlan(ipr, bridge, br, uplink, vlan)
            else:
                found = _index(ipr, bridge)
                if found is None:
                    raise OperationFailed(f"bridge {bridge} is missing (restart the agent "
                                          "to restore its networks)")
                br = found
            ipr.link("set", index=br, state="up")
            t = _ensure(ipr, tap, kind="tuntap", mode="tap")
            old = _master(ipr, t)
            if old != bridge:
                ipr.link("set", index=t, master=br)
                _prune(ipr, old)
            if filtering:
                native = vlan if vlan is not None or trunk else DEFAULT_PVID
                _set_port_vlans(ipr, t, native, set(trunk))
                up = _index(ipr, uplink) if uplink is not None else None
                if up is not None:
                    have = _port_vlans(ipr, up)
                    for v in ({vlan} - {None}) | set(trunk):
                        if v not in have:
                            ipr.vlan_filter("add", index=up, vlan_info={"vid": v})
            ipr.link("set", index=t, state="up")
    except NetlinkError as e:
        raise OperationFailed(f"tap {tap} on {bridge}: {e}") from e


def _port_vlans(ipr: IPRoute, idx: int) -> set[int]:
    """The VLAN ids of bridge port `idx` (a VLAN-aware bridge's filter entries)."""
    vids: set[int] = set()
    for msg in ipr.get_vlans():
        if msg.get("index") != idx:
            continue
        spec = msg.get_attr("IFLA_AF_SPEC")
        if spec is not None:
            vids.update(int(info["vid"]) for info in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO"))
    return vids


def _set_port_vlans(ipr: IPRoute, idx: int, native: int | None, tagged: set[int]) -> None:
    """Port `idx` of a VLAN-aware bridge carries `native` untagged (its pvid) and the
    `tagged` VLANs tagged, no other (an access port: native only)."""
    have = _port_vlans(ipr, idx)
    for v in have - tagged - {native}:
        ipr.vlan_filter("del", index=idx, vlan_info={"vid": v})
    if native is not None:
        ipr.vlan_filter("add", index=idx, vlan_info={"vid": native, "flags": ["pvid",
                                                                               "untagged"]})
    for v in sorted(tagged):
        ipr.vlan_filter("add", index=idx, vlan_info={"vid": v})


def _uplink_vlan(ipr: IPRoute, bridge: str, br: int, uplink: str, vlan: int) -> None:
    """VLAN `vlan` of the host NIC `uplink` (an 802.1q link) is a port of `bridge`."""
    up = _index(ipr, uplink)
    if up is None:
        raise OperationFailed(f"uplink {uplink}: no such interface")
    name = re.sub(r"v(\d+)$", r"u\1", bridge)  # hvn<num>v<v> -> hvn<num>u<v>
    idx = _ensure(ipr, name, kind="vlan", link=up, vlan_id=vlan)  # type: ignore[arg-type]
    ipr.link("set", index=idx, master=br, state="up")


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


def _ensure_network(bridge: str, address: str | None, uplink: str | None,
                    filtering: bool = False) -> None:
    """A managed network's bridge exists and is up, with exactly `address` (IPv4) and,
    given `uplink`, that host NIC as a port; `filtering`: VLAN-aware."""
    import ipaddress

    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            br = _ensure(ipr, bridge, kind="bridge")
            if filtering:
                ipr.link("set", index=br, kind="bridge", br_vlan_filtering=1)
            want = ipaddress.IPv4Interface(address) if address else None
            for a in ipr.get_addr(index=br, family=2):
                have = ipaddress.IPv4Interface(
                    f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                if have != want:
                    ipr.addr("del", index=br, address=str(have.ip), prefixlen=a["prefixlen"])
            if want is not None and not any(
                    a.get("IFA_ADDRESS") == str(want.ip)
                    for a in ipr.get_addr(index=br, family=2)):
                ipr.addr("add", index=br, address=str(want.ip),
                         prefixlen=want.network.prefixlen)
            ipr.link("set", index=br, state="up")
            if uplink is not None:
                up = _index(ipr, uplink)
                if up is None:
                    raise OperationFailed(f"uplink {uplink}: no such interface")
                if _master(ipr, up) != bridge:
                    ipr.link("set", index=up, master=br)
                ipr.link("set", index=up, state="up")
    except NetlinkError as e:
        raise OperationFailed(f"bridge {bridge}: {e}") from e


def _remove_network(bridge: str) -> None:
    """Remove a managed network's bridge, its VLANs' bridges and their uplink VLAN links
    (the uplink itself is released, not removed). Taps on them go with their VMs."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = str(link.get("ifname"))
                if name == bridge or (name.startswith(bridge) and re.fullmatch(
                        rf"{re.escape(bridge)}[uv]\d+", name)):
                    if name != bridge and not _on_demand(name) and \
                            not UPLINK_VLAN_RE.fullmatch(name):
                        continue
                    try:
                        ipr.link("del", index=link["index"])
                    except NetlinkError as e:
                        if e.code != errno.ENODEV:
                            raise
            log.info("removed network bridge %s", bridge)
    except NetlinkError as e:
        raise OperationFailed(f"bridge {bridge}: cannot remove: {e}") from e


def _links() -> dict[str, str | None]:
    """The agent's links (names starting with hv) and the bridge each is a port of."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: str(link.get("ifname")) for link in ipr.get_links()}
        return {names[i]: names.get(link.get("IFLA_MASTER") or -1)
                for link in ipr.get_links()
                if (i := link["index"]) and names[i].startswith(TAP_PREFIX)}


def _vlan_filtering() -> str | None:
    """None when this kernel's bridges can filter VLANs (VLAN-aware mode), else why not:
    tried on a probe bridge that is removed again."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    probe = f"hvprobe{os.getpid() % 100000}"
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=probe, kind="bridge")
        except NetlinkError as e:
            return f"cannot make a bridge: {e}"
        try:
            idx = _index(ipr, probe)
            ipr.link("set", index=idx, kind="bridge", br_vlan_filtering=1)
            return None
        except NetlinkError as e:
            return f"the kernel's bridges do not filter VLANs ({os.strerror(e.code)})"
        finally:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", ifname=probe)


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
    await asyncio.to_thread(_plug, tap, bridge_name(vlan))


async def plug_on(tap: str, bridge: str, uplink: str | None = None,
                  vlan: int | None = None, filtering: bool = False,
                  trunk: list[int] | tuple[int, ...] = ()) -> None:
    """`tap` on a managed network's `bridge` (see _plug)."""
    await asyncio.to_thread(_plug, tap, bridge, uplink, vlan, filtering, tuple(trunk))


async def ensure_network(bridge: str, address: str | None, uplink: str | None,
                         filtering: bool = False) -> None:
    await asyncio.to_thread(_ensure_network, bridge, address, uplink, filtering)


async def port_vlans(tap: str) -> set[int]:
    """The VLAN ids of `tap` on a VLAN-aware bridge (empty: no tap, or no filtering)."""
    def read() -> set[int]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            t = _index(ipr, tap)
            return _port_vlans(ipr, t) if t is not None else set()
    return await asyncio.to_thread(read)


async def remove_network(bridge: str) -> None:
    await asyncio.to_thread(_remove_network, bridge)


async def links() -> dict[str, str | None]:
    return await asyncio.to_thread(_links)


async def vlan_filtering() -> str | None:
    return await asyncio.to_thread(_vlan_filtering)


async def unplug(tap: str) -> None:
    """Remove `tap` (if present) and its bridge when that was the last port."""
    await asyncio.to_thread(_unplug, tap)


async def vlan_of(tap: str) -> int | None:
    """The VLAN whose bridge `tap` is a port of (None: no such tap, or not on one)."""
    return await asyncio.to_thread(_vlan_of, tap)
