"""The networks service: the host's managed networks (hvagent.netspec) and the host side
of VMs' NICs.

Managed networks are rows in the store; on every start the agent makes the host match
them: each network's bridge (`hvn<num>`, with its address and uplink), its dnsmasq
(nat, isolated), the agent's nftables table; and it removes the bridges and dnsmasqs of
networks that no longer exist. Networks the agent's configuration declares (`networks:`)
are made on start and cannot be deleted through the API. A network some VM's NIC names
cannot be deleted (409 naming the VMs). A dnsmasq that dies is restarted within
SUPERVISE_INTERVAL.

Bridged networks are VLAN-aware where the kernel's bridges filter VLANs (detected once,
on a probe bridge): one bridge with `vlan_filtering`, each NIC's tap an access port of
its VLAN (untagged, pvid; VLAN 1 for a NIC without one), the uplink carrying the NICs'
VLANs tagged. Elsewhere they run in per-VLAN-bridge mode: a NIC with a VLAN sits on the
network's bridge of that VLAN (`hvn<num>v<vlan>`, with the uplink's 802.1q link of that
VLAN when the network has an uplink), one without on the network's own bridge. The API
reports which mode each network is in.

The built-in `bridge` network is the one-bridge-per-VLAN segments (hvbr<vlan>);
user-mode NICs (QEMU's own NAT) have nothing on the host and are skipped everywhere.
Each tapped NIC has a tap named after its MAC, plugged before QEMU opens it and removed
once QEMU has let it go; moving a NIC to another VLAN moves its tap, live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from hvagent.drivers import dnsmasq, firewall, net
from hvagent.errors import Conflict, HVError, InvalidRequest, NotFound, OperationFailed
from hvagent.netspec import ADDRESSED, NetworkKind, NetworkSpec
from hvagent.spec import (
    VLAN_BRIDGES,
    VLAN_MAX,
    VLAN_MIN,
    VLAN_RULE,
    NicSpec,
    VMSpec,
    random_mac,
)
from hvagent.store.networks import NetworkRow

if TYPE_CHECKING:
    from hvagent.config import AgentConfig
    from hvagent.store import Store

log = logging.getLogger(__name__)

DEFAULT_NETWORK = "default"  # new NICs use it, where the host has it
SUPERVISE_INTERVAL = 5.0
_TAP_RE = re.compile(rf"{net.TAP_PREFIX}[0-9a-f]{{12}}")


def check_vlan(vlan: int) -> None:
    """Refuse a VLAN id outside the 802.1Q range (hvagent.spec.VLAN_RULE)."""
    if not VLAN_MIN <= vlan <= VLAN_MAX:
        raise InvalidRequest(f"vlan: {vlan} is not in {VLAN_RULE}")


class NetworkInfo(BaseModel):
    """A managed network as the API shows it: its spec, where it lives on the host and
    who uses it."""

    name: str
    kind: NetworkKind
    uplink: str | None
    address: str | None
    dhcp: bool
    dhcp_start: str | None
    dhcp_end: str | None
    bridge: str
    vlan_mode: Literal["vlan-aware", "per-vlan-bridge", "none"]
    vlan_filtering: str  # "available", or why the kernel's bridges cannot filter VLANs
    dhcp_server: Literal["running", "stopped", "none"]
    declared: bool
    vms: list[str]
    error: str | None = None  # why the host does not match the network (last attempt)


class NetworkService:
    def __init__(self, config: AgentConfig | None = None, store: Store | None = None) -> None:
        self.config = config
        self.store = store
        self._lock = asyncio.Lock()
        self._errors: dict[str, str] = {}
        self._vlan_filtering: str | None = None  # "" when available
        self._supervisor: asyncio.Task[None] | None = None

    # managed networks

    def _rows(self) -> list[NetworkRow]:
        return self.store.networks.list() if self.store is not None else []

    def _row(self, name: str) -> NetworkRow:
        row = self.store.networks.get(name) if self.store is not None else None
        if row is None:
            raise NotFound(f"network {name}: no such network")
        return row

    def _files(self, name: str) -> dnsmasq.ServerFiles:
        assert self.config is not None
        return dnsmasq.files(self.config.run_dir, self.config.state_dir,
                             self.config.log_dir, name)

    def users(self, name: str) -> list[str]:
        """The VMs with a NIC on network `name` (any state)."""
        assert self.store is not None
        out = []
        for r in self.store.list_vms():
            try:
                spec = VMSpec.model_validate_json(r.spec)
            except ValueError:
                continue
            if any(n.network == name for n in spec.nics):
                out.append(r.name)
        return out

    async def _filtering(self) -> str:
        if self._vlan_filtering is None:
            why = await net.vlan_filtering()
            self._vlan_filtering = "" if why is None else why
        return self._vlan_filtering or "available"

    async def _aware(self, spec: NetworkSpec) -> bool:
        """The network's bridge filters VLANs (a bridged network on a kernel that can)."""
        return spec.kind == NetworkKind.BRIDGED and await self._filtering() == "available"

    async def _vlan_mode(self, spec: NetworkSpec) -> Literal["vlan-aware", "per-vlan-bridge",
                                                              "none"]:
        if spec.kind != NetworkKind.BRIDGED:
            return "none"
        return "vlan-aware" if await self._aware(spec) else "per-vlan-bridge"

    async def info(self, row: NetworkRow) -> NetworkInfo:
        s = row.spec
        addressed = s.kind in ADDRESSED
        first, last = s.dhcp_range if addressed and s.dhcp else (None, None)
        server: Literal["running", "stopped", "none"] = "none"
        if addressed:
            server = "running" if dnsmasq.running(self._files(s.name)) else "stopped"
        return NetworkInfo(
            name=s.name, kind=s.kind, uplink=s.uplink, address=s.address, dhcp=s.dhcp,
            dhcp_start=str(first) if first else None, dhcp_end=str(last) if last else None,
            bridge=net.network_bridge(row.num),
            vlan_mode=await self._vlan_mode(s),
            vlan_filtering=await self._filtering(), dhcp_server=server,
            declared=row.declared, vms=self.users(s.name), error=self._errors.get(s.name))

    async def list(self) -> list[NetworkInfo]:
        return [await self.info(r) for r in self._rows()]

    async def get(self, name: str) -> NetworkInfo:
        return await self.info(self._row(name))

    def _check_new(self, spec: NetworkSpec, others: list[NetworkRow]) -> None:
        if spec.uplink is not None and not (net.SYS_CLASS_NET / spec.uplink).exists():
            raise InvalidRequest(f"uplink: {spec.uplink}: no such interface on this host")
        for o in others:
            if o.name == spec.name:
                raise Conflict(f"network {spec.name}: a network with this name exists")
            if spec.address and o.spec.address and spec.interface.network.overlaps(
                    o.spec.interface.network):
                raise Conflict(f"network {spec.name}: {spec.interface.network} overlaps "
                               f"network {o.name} ({o.spec.interface.network})")
            if spec.uplink and spec.uplink == o.spec.uplink:
                raise Conflict(f"network {spec.name}: uplink {spec.uplink} is network "
                               f"{o.name}'s")

    async def create(self, spec: NetworkSpec, declared: bool = False) -> NetworkInfo:
        assert self.store is not None
        async with self._lock:
            self._check_new(spec, self._rows())
            row = self.store.networks.add(spec, declared)
            try:
                await self._realize(row)
                await self._firewall()
            except BaseException:
                # Nothing half-made: no bridge, no dnsmasq, no row, the old rules.
                await self._unrealize(row)
                self.store.networks.delete(spec.name)
                with contextlib.suppress(HVError):
                    await self._firewall()
                raise
            log.info("network %s (%s) created on %s", spec.name, spec.kind,
                     net.network_bridge(row.num))
        return await self.info(row)

    async def delete(self, name: str) -> None:
        assert self.store is not None
        async with self._lock:
            row = self._row(name)
            if row.declared:
                raise Conflict(f"network {name}: declared in the agent's configuration "
                               "(networks:); remove it there")
            used = self.users(name)
            if used:
                raise Conflict(f"network {name}: in use by VMs {', '.join(used)}; remove "
                               "their NICs on it first")
            self.store.networks.delete(name)
            self._errors.pop(name, None)
            await self._unrealize(row)
            await self._firewall()
            log.info("network %s deleted", name)

    async def _realize(self, row: NetworkRow) -> None:
        """The host matches the network: bridge, address, uplink, dnsmasq."""
        s, bridge = row.spec, net.network_bridge(row.num)
        await net.ensure_network(bridge, s.address, s.uplink, await self._aware(s))
        if s.kind in ADDRESSED and dnsmasq.running(self._files(s.name)) is None:
            await dnsmasq.start(s, bridge, self._files(s.name))

    async def _unrealize(self, row: NetworkRow) -> None:
        await dnsmasq.stop(self._files(row.name))
        await net.remove_network(net.network_bridge(row.num))

    async def _firewall(self) -> None:
        await firewall.apply([firewall.Rules(net.network_bridge(r.num), r.spec)
                              for r in self._rows()])

    async def startup(self, running: list[VMSpec]) -> None:
        """Make the host match the stored networks (those the configuration declares
        first made or updated), put the running VMs' taps back where their specs say,
        and remove the agent's links and dnsmasqs that nothing uses."""
        if self.store is None or self.config is None:
            return
        async with self._lock:
            self._declare()
            rows = self._rows()
            for row in rows:
                try:
                    await self._realize(row)
                    self._errors.pop(row.name, None)
                except HVError as e:
                    self._errors[row.name] = e.message
                    log.error("network %s: %s", row.name, e.message)
            try:
                await self._firewall()
            except HVError as e:
                log.error("networks: %s", e.message)
            await self._prune(rows, running)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def _declare(self) -> None:
        assert self.store is not None and self.config is not None
        declared = {s.name: s for s in self.config.networks}
        for row in self._rows():
            want = declared.pop(row.name, None)
            if want is not None and (want != row.spec or not row.declared):
                self.store.networks.update(row.name, want, declared=True)
            elif want is None and row.declared:
                self.store.networks.update(row.name, row.spec, declared=False)
        for spec in declared.values():
            try:
                self._check_new(spec, self._rows())
            except Conflict as e:
                log.error("configured %s", e.message)
                continue
            self.store.networks.add(spec, declared=True)

    async def _prune(self, rows: list[NetworkRow], running: list[VMSpec]) -> None:
        bridges = {net.network_bridge(r.num) for r in rows}
        taps = {net.tap_name(n.mac) for s in running for n in s.nics if n.tapped}
        for s in running:
            for n in s.nics:
                try:
                    await self.plug(n)
                except HVError as e:
                    log.error("%s: NIC %s: %s", s.name, n.mac, e.message)
        links = await net.links()
        for name in links:
            if _TAP_RE.fullmatch(name) and name not in taps:
                with contextlib.suppress(HVError):
                    await net.unplug(name)
                    log.info("removed tap %s (no running VM has it)", name)
            elif re.fullmatch(rf"{net.NETWORK_PREFIX}\d+", name) and name not in bridges:
                with contextlib.suppress(HVError):
                    await net.remove_network(name)
        assert self.config is not None
        names = {r.name for r in rows}
        for pid in (self.config.run_dir / "networks").glob("*.pid"):
            if pid.stem not in names:
                await dnsmasq.stop(self._files(pid.stem))

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL)
            async with self._lock:
                for row in self._rows():
                    if row.spec.kind in ADDRESSED and \
                            dnsmasq.running(self._files(row.name)) is None:
                        log.warning("network %s: dnsmasq is not running; restarting it",
                                    row.name)
                        try:
                            await self._realize(row)
                            self._errors.pop(row.name, None)
                        except HVError as e:
                            self._errors[row.name] = e.message

    async def shutdown(self) -> None:
        """Stop supervising; the networks and their dnsmasqs stay (like the VMs)."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    # NICs

    def resolve_nic(self, nic: NicSpec, where: str) -> NicSpec:
        """The NIC with its network defaulted (`default` where the host has it, for a NIC
        that names neither a network nor a VLAN) and checked against the host's
        networks: one line naming the field otherwise."""
        if "network" not in nic.model_fields_set and nic.vlan is None and \
                self.store is not None and self.store.networks.get(DEFAULT_NETWORK):
            nic = nic.model_copy(update={"network": DEFAULT_NETWORK})
        if not nic.managed:
            return nic
        row = self.store.networks.get(nic.network) if self.store is not None else None
        if row is None:
            have = ", ".join(r.name for r in self._rows()) or "none"
            raise InvalidRequest(f"{where}.network: no network {nic.network!r} on this host "
                                 f"(networks: {have}; built in: user, bridge)")
        for field in ("vlan", "trunk"):
            if getattr(nic, field) and row.spec.kind in ADDRESSED:
                raise InvalidRequest(f"{where}.{field}: network {nic.network} is "
                                     f"{row.spec.kind}, which has no VLANs (only bridged "
                                     "networks do)")
        return nic

    async def check_trunks(self, nics: list[NicSpec], where: str = "nics") -> None:
        """A trunk NIC needs a VLAN-aware bridge: refused, naming why, where the kernel's
        bridges cannot filter VLANs."""
        for i, n in enumerate(nics):
            if n.trunk and await self._filtering() != "available":
                raise InvalidRequest(f"{where}[{i}].trunk: trunk NICs need VLAN-aware "
                                     f"bridges, and here {await self._filtering()}")

    def resolve_nics(self, spec: VMSpec) -> VMSpec:
        nics = [self.resolve_nic(n, f"nics[{i}]") for i, n in enumerate(spec.nics)]
        nics = self.unique_macs(nics, spec.name)
        return spec.model_copy(update={"nics": nics}) if nics != spec.nics else spec

    def macs_in_use(self, but: str | None = None) -> dict[str, str]:
        """MAC address -> the VM whose NIC has it, over every VM but `but`."""
        assert self.store is not None
        out: dict[str, str] = {}
        for r in self.store.list_vms():
            if r.name == but:
                continue
            try:
                spec = VMSpec.model_validate_json(r.spec)
            except ValueError:
                continue
            out.update({n.mac: r.name for n in spec.nics})
        return out

    def unique_macs(self, nics: list[NicSpec], vm: str, where: str = "nics") -> list[NicSpec]:
        """The NICs with MAC addresses no other VM of the host has (a NIC's tap is named
        after its MAC): a generated one is drawn again, a given one is a 409."""
        if self.store is None:
            return nics
        used = self.macs_in_use(but=vm)
        out = []
        for i, n in enumerate(nics):
            if n.mac in used:
                if "mac" in n.model_fields_set:
                    field = f"{where}[{i}].mac" if where == "nics" else f"{where}.mac"
                    raise Conflict(f"{field}: {n.mac} is a NIC of VM {used[n.mac]}")
                while n.mac in used:
                    n = n.model_copy(update={"mac": random_mac()})
            out.append(n)
        return out

    @staticmethod
    def tap(nic: NicSpec) -> str:
        """The host tap of a tapped NIC (QEMU opens it by this name)."""
        return net.tap_name(nic.mac)

    async def plug(self, nic: NicSpec, vlan: int | None = None) -> None:
        """The NIC's tap exists, is up and is on its bridge: of VLAN `vlan` (default: the
        NIC's own) on `bridge` or a bridged network; a tap on another bridge moves there,
        live."""
        if not nic.tapped:
            return
        vlan = nic.vlan if vlan is None else vlan
        if nic.network == VLAN_BRIDGES:
            assert vlan is not None
            check_vlan(vlan)
            await net.plug(self.tap(nic), vlan)
            return
        row = self.store.networks.get(nic.network) if self.store is not None else None
        if row is None:
            raise OperationFailed(f"NIC {nic.mac}: network {nic.network} no longer exists")
        if vlan is not None:
            check_vlan(vlan)
        if await self._aware(row.spec):
            await net.plug_on(self.tap(nic), net.network_bridge(row.num), row.spec.uplink,
                              vlan, filtering=True, trunk=nic.trunk)
        else:
            await net.plug_on(self.tap(nic), net.network_bridge(row.num, vlan),
                              row.spec.uplink, vlan)

    async def unplug(self, nic: NicSpec) -> None:
        """Remove the NIC's tap (and an on-demand bridge when that was its last port)."""
        if nic.tapped:
            await net.unplug(self.tap(nic))

    async def plug_vm(self, spec: VMSpec) -> None:
        """The taps of every tapped NIC of the VM, before QEMU starts."""
        for n in spec.nics:
            await self.plug(n)

    async def unplug_vm(self, name: str, spec: VMSpec) -> None:
        """Remove the VM's taps once QEMU has ended. Cleanup: a failure is logged, never
        raised, so it cannot mask the state change that called it."""
        for n in spec.nics:
            try:
                await self.unplug(n)
            except HVError as e:
                log.warning("%s: %s", name, e.message)

    def addressed(self, network: str) -> bool:
        """Network `network` is a nat or isolated one (no VLANs)."""
        row = self.store.networks.get(network) if self.store is not None else None
        return row is not None and row.spec.kind in ADDRESSED

    async def vlan_of(self, nic: NicSpec) -> int | None:
        """The VLAN the NIC's tap is on now (None: no tap, or on none): its bridge's on
        `bridge` and per-VLAN bridges, its access VLAN on a VLAN-aware bridge."""
        row = self.store.networks.get(nic.network) if self.store is not None and \
            nic.managed else None
        if row is not None and await self._aware(row.spec):
            vids = await net.port_vlans(self.tap(nic))
            return next(iter(vids)) if len(vids) == 1 else None
        if row is not None:
            master = (await net.links()).get(self.tap(nic))
            m = re.fullmatch(rf"{net.network_bridge(row.num)}v(\d+)", master or "")
            return int(m.group(1)) if m else None
        return await net.vlan_of(self.tap(nic))
