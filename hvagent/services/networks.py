"""The networks service: the host side of VMs' bridge NICs. Each such NIC has a tap on
its VLAN's bridge (hvagent.drivers.net: one bridge per VLAN, made with its first port
and removed with its last), plugged before QEMU opens it and removed once QEMU has let
it go; moving a NIC to another VLAN moves its tap, live.

User-mode NICs (QEMU's own NAT) have nothing on the host and are skipped everywhere.
"""

from __future__ import annotations

import logging

from hvagent.drivers import net
from hvagent.errors import HVError, InvalidRequest
from hvagent.spec import VLAN_MAX, VLAN_MIN, VLAN_RULE, NicSpec, VMSpec

log = logging.getLogger(__name__)


def check_vlan(vlan: int) -> None:
    """Refuse a VLAN id outside the 802.1Q range (hvagent.spec.VLAN_RULE)."""
    if not VLAN_MIN <= vlan <= VLAN_MAX:
        raise InvalidRequest(f"vlan: {vlan} is not in {VLAN_RULE}")


class NetworkService:
    @staticmethod
    def tap(nic: NicSpec) -> str:
        """The host tap of a bridge NIC (QEMU opens it by this name)."""
        return net.tap_name(nic.mac)

    async def plug(self, nic: NicSpec, vlan: int | None = None) -> None:
        """The NIC's tap exists, is up and is on the bridge of `vlan` (default: the
        NIC's own); a tap on another VLAN's bridge moves there, live."""
        vlan = nic.vlan if vlan is None else vlan
        if vlan is not None:
            check_vlan(vlan)
            await net.plug(self.tap(nic), vlan)

    async def unplug(self, nic: NicSpec) -> None:
        """Remove the NIC's tap (and its bridge when that was the last port)."""
        if nic.vlan is not None:
            await net.unplug(self.tap(nic))

    async def plug_vm(self, spec: VMSpec) -> None:
        """The taps of every bridge NIC of the VM, before QEMU starts."""
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

    async def vlan_of(self, nic: NicSpec) -> int | None:
        """The VLAN whose bridge the NIC's tap is on now (None: no tap, or on none)."""
        return await net.vlan_of(self.tap(nic))
