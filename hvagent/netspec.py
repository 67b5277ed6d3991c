"""The network spec: what a managed host network is (desired state), validated. The
networks service (hvagent.services.networks) makes the host match it on every start.

Three kinds, after libvirt's forward modes:
- `bridged`: a Linux bridge, optionally with an uplink NIC of the host; NICs on it may
  carry an access VLAN or a trunk. No address, no DHCP: the guests share the uplink's L2.
- `nat`: a bridge with `address` (the guests' gateway and DNS server), DHCP from dnsmasq,
  and masquerading out of the host (nftables), like libvirt's `default` network.
- `isolated`: a bridge with `address` and DHCP, nothing forwarded in or out.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hvagent.spec import RESERVED_NETWORKS, Name, cross_field

# A host interface name (IFNAMSIZ - 1), not one of the agent's own links (hv...).
IFNAME_PATTERN = r"^(?!hv)(?!\.\.?$)[A-Za-z0-9_.:-]{1,15}$"
IFNAME_RE = re.compile(IFNAME_PATTERN)
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"^{_OCTET}(\.{_OCTET}){{3}}$"
IPV4_PREFIX_PATTERN = rf"^{_OCTET}(\.{_OCTET}){{3}}/([0-9]|[12][0-9]|3[0-2])$"
# The smallest network that holds the host's address and a DHCP range of one.
MAX_PREFIX = 29
DEFAULT_LEASE = "1h"


class NetworkKind(StrEnum):
    BRIDGED = "bridged"
    NAT = "nat"
    ISOLATED = "isolated"


ADDRESSED = (NetworkKind.NAT, NetworkKind.ISOLATED)


class NetworkSpec(BaseModel):
    """A managed network. `address` is the host's address on the bridge with its prefix
    (nat and isolated: required; bridged: none). `dhcp_start`/`dhcp_end` default to the
    addresses after the host's up to the last before broadcast."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    kind: NetworkKind
    uplink: str | None = Field(
        default=None, json_schema_extra={"pattern": IFNAME_PATTERN}, description=(
        "bridged: a host NIC to enslave to the bridge (the guests' way out)"))
    address: str | None = Field(
        default=None, json_schema_extra={"pattern": IPV4_PREFIX_PATTERN}, description=(
        "nat, isolated: the host's address on the network with its prefix, e.g. "
        "192.168.122.1/24 (the guests' gateway and DNS server)"))
    dhcp: bool = Field(default=True, description="nat, isolated: serve DHCP (dnsmasq)")
    dhcp_start: str | None = Field(default=None, json_schema_extra={"pattern": IPV4_PATTERN})
    dhcp_end: str | None = Field(default=None, json_schema_extra={"pattern": IPV4_PATTERN})

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_NETWORKS:
            raise cross_field(f"{v!r} is a built-in network name "
                              f"({', '.join(RESERVED_NETWORKS)})")
        return v

    @field_validator("uplink")
    @classmethod
    def _uplink(cls, v: str | None) -> str | None:
        # The schema's pattern says it; this is its one clear line.
        if v is not None:
            if v.startswith("hv"):
                raise ValueError(f"{v!r}: interfaces named hv... are the agent's own")
            if not IFNAME_RE.match(v):
                raise ValueError(f"{v!r} is not an interface name (1 to 15 of A-Z a-z 0-9 "
                                 "_ . : -)")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            iface = ipaddress.IPv4Interface(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 address with a prefix (e.g. "
                             "192.168.122.1/24)") from None
        if "/" not in v:
            raise ValueError(f"{v!r}: give the prefix, e.g. /24")
        # Rules the pattern cannot state:
        if iface.network.prefixlen > MAX_PREFIX:
            raise cross_field(f"address {v}: the prefix is at most /{MAX_PREFIX}")
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
            raise cross_field(f"address {v} is the network's own or broadcast address")
        if iface.ip.is_loopback or iface.ip.is_multicast or iface.ip.is_unspecified or \
                iface.ip.is_reserved:
            raise cross_field(f"address {v} is not a unicast address")
        return str(iface)

    @field_validator("dhcp_start", "dhcp_end")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 address") from None

    @model_validator(mode="after")
    def _kind_fields(self) -> NetworkSpec:
        if self.kind == NetworkKind.BRIDGED:
            if self.address is not None or self.dhcp_start or self.dhcp_end:
                raise cross_field("a bridged network has no address or DHCP range (its "
                                  "guests are on the uplink's network)")
            return self
        if self.uplink is not None:
            raise cross_field(f"a {self.kind} network has no uplink")
        if self.address is None:
            raise cross_field(f"a {self.kind} network needs an address (e.g. "
                              "192.168.122.1/24)")
        net = self.interface.network
        for field in ("dhcp_start", "dhcp_end"):
            ip = getattr(self, field)
            if ip is not None and (ipaddress.IPv4Address(ip) not in net or ip in (
                    str(net.network_address), str(net.broadcast_address),
                    str(self.interface.ip))):
                raise cross_field(f"{field} {ip} is not a guest address of {net}")
        start, end = self.dhcp_range
        if int(start) > int(end):
            raise cross_field(f"dhcp_start {start} is after dhcp_end {end}")
        if int(start) <= int(self.interface.ip) <= int(end):
            raise cross_field(f"the DHCP range {start}-{end} holds the host's address "
                              f"{self.interface.ip}")
        return self

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        assert self.address is not None
        return ipaddress.IPv4Interface(self.address)

    @property
    def dhcp_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """(first, last) address DHCP hands out: by default the addresses after the
        host's (before it, when the host has the last one)."""
        iface = self.interface
        net = iface.network
        if iface.ip + 1 < net.broadcast_address:
            first, last = iface.ip + 1, net.broadcast_address - 1
        else:
            first, last = net.network_address + 1, iface.ip - 1
        if self.dhcp_start:
            first = ipaddress.IPv4Address(self.dhcp_start)
        if self.dhcp_end:
            last = ipaddress.IPv4Address(self.dhcp_end)
        return first, last
