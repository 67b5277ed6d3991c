"""The agent's nftables table (`ip hvagent`): masquerading for `nat` networks and the
forwarding rules of `nat` and `isolated` ones. It is replaced whole, in one `nft -f`
transaction, whenever the set of networks changes, and removed when no network needs it.
Rules of other tables (a host firewall) still apply: an accept here does not override a
drop there.

- nat: guests may open connections out (masqueraded behind the host's address on the
  way out), and only replies come back in.
- isolated: nothing is forwarded to or from the bridge.
Both: traffic between guests of one network stays on its bridge.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from hvagent.errors import OperationFailed
from hvagent.netspec import NetworkKind, NetworkSpec

NFT = "nft"
TABLE = "hvagent"
TIMEOUT = 30.0
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


@dataclass(frozen=True)
class Rules:
    bridge: str
    spec: NetworkSpec


def ruleset(networks: list[Rules]) -> str:
    """The whole table (empty when no network needs one), as one nft transaction."""
    head = f"table ip {TABLE}\ndelete table ip {TABLE}\n"
    addressed = [n for n in networks if n.spec.kind != NetworkKind.BRIDGED]
    if not addressed:
        return head
    forward, post = [], []
    for n in addressed:
        br, net = n.bridge, n.spec.interface.network
        forward.append(f'iifname "{br}" oifname "{br}" accept')
        if n.spec.kind == NetworkKind.NAT:
            forward.append(f'iifname "{br}" ip saddr {net} accept')
            forward.append(f'oifname "{br}" ip daddr {net} ct state established,related '
                           "accept")
            post.append(f'ip saddr {net} ip daddr != {net} oifname != "{br}" masquerade')
        forward += [f'iifname "{br}" drop', f'oifname "{br}" drop']
    body = "\n".join(
        ["  chain forward {", "    type filter hook forward priority filter; policy accept;",
         *(f"    {r}" for r in forward), "  }",
         "  chain postrouting {",
         "    type nat hook postrouting priority srcnat; policy accept;",
         *(f"    {r}" for r in post), "  }"])
    return head + f"table ip {TABLE} {{\n{body}\n}}\n"


async def apply(networks: list[Rules]) -> None:
    text = ruleset(networks)
    needed = any(n.spec.kind != NetworkKind.BRIDGED for n in networks)
    if shutil.which(NFT) is None:
        if needed:
            raise OperationFailed("nft is not installed (Debian package nftables); nat "
                                  "and isolated networks need it")
        return
    if any(n.spec.kind == NetworkKind.NAT for n in networks):
        await asyncio.to_thread(_forwarding_on)
    proc = await asyncio.create_subprocess_exec(
        NFT, "-f", "-", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(text.encode()), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationFailed(f"nft did not answer within {TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise OperationFailed(f"nft refused the agent's rules: {lines[0] if lines else ''}")


def _forwarding_on() -> None:
    """A nat network routes its guests out: the host forwards IPv4."""
    try:
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1\n")
    except OSError as e:
        raise OperationFailed(f"{IP_FORWARD}: cannot turn IPv4 forwarding on: "
                              f"{e.strerror or e}") from e
