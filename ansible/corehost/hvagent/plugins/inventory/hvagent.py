"""Ansible inventory plugin corehost.hvagent.hvagent: the child VMs of every agent in
the fleet hosts file, with their state and resources as host variables."""

from __future__ import annotations

DOCUMENTATION = r"""
name: hvagent
short_description: The VMs of corehost hosts (hvagent) as an inventory
version_added: 0.1.0
description:
  - Reads the fleet hosts file (the file hvctl reads), asks each agent for its VMs
    (GET /api/v1/vms) and makes every VM an inventory host.
  - A VM is named as on its agent; when two agents have a VM of the same name, both
    are named C(<agent host>_<vm>).
  - Host variables C(hvagent_host) (the agent's name in the hosts file),
    C(hvagent_state), C(hvagent_vcpus), C(hvagent_memory_mib), C(hvagent_nics) (a list
    of C({mac, network, vlan, addresses}); C(addresses) lists what the agent knows of
    the guest's addresses, empty when it knows none) and C(hvagent_disks) (a list of
    C({path, format, bus})).
  - Groups C(hvagent_<agent host>) and C(hvagent_state_<state>); characters other
    than letters, digits and C(_) in a group name become C(_).
  - An agent that cannot be reached is a warning and its VMs are missing, or an error
    with O(strict).
  - The inventory file's name must end in C(hvagent.yml) or C(hvagent.yaml).
extends_documentation_fragment:
  - constructed
options:
  plugin:
    description: The name of this plugin.
    required: true
    choices: ["corehost.hvagent.hvagent"]
    type: str
  hosts_file:
    description:
      - The fleet hosts file.
      - Default C($HVCTL_CONFIG_DIR/hosts.yaml), else C(~/.config/hvctl/hosts.yaml).
    type: path
  hosts:
    description: Only the agents of these names (default every host of the file).
    type: list
    elements: str
  timeout:
    description: Seconds to wait for each agent.
    type: float
    default: 30
"""

EXAMPLES = r"""
# fleet.hvagent.yml
plugin: corehost.hvagent.hvagent
hosts_file: ~/.config/hvctl/hosts.yaml
hosts: [alpha, beta]
keyed_groups:
  - key: hvagent_vcpus
    prefix: vcpus
compose:
  big: hvagent_memory_mib >= 4096
groups:
  web: inventory_hostname.startswith('web')
"""

import re  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

from ansible.errors import AnsibleParserError  # noqa: E402
from ansible.plugins.inventory import BaseInventoryPlugin, Constructable  # noqa: E402
from ansible_collections.corehost.hvagent.plugins.module_utils.agent import (  # noqa: E402
    AgentError,
    Client,
    load_hosts,
)


def group_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts))


def nic_vars(nic: dict[str, Any]) -> dict[str, Any]:
    return {"mac": nic.get("mac"), "network": nic.get("network"), "vlan": nic.get("vlan"),
            "addresses": list(nic.get("addresses") or [])}


def disk_vars(disk: dict[str, Any]) -> dict[str, Any]:
    return {"path": disk.get("path"), "format": disk.get("format"),
            "bus": disk.get("bus", "virtio")}


class InventoryModule(BaseInventoryPlugin, Constructable):
    NAME = "corehost.hvagent.hvagent"

    def verify_file(self, path: str) -> bool:
        return super().verify_file(path) and path.endswith(("hvagent.yml", "hvagent.yaml"))

    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        strict = self.get_option("strict")
        try:
            fleet = load_hosts(self.get_option("hosts_file"))
        except AgentError as e:
            raise AnsibleParserError(e.message) from None
        wanted = self.get_option("hosts")
        targets = list(fleet.hosts)
        if wanted:
            unknown = [n for n in wanted if all(t.name != n for t in targets)]
            if unknown:
                raise AnsibleParserError(f"{path}: hosts: {', '.join(unknown)}: not in "
                                         f"{fleet.path}")
            targets = [t for t in targets if t.name in wanted]
        found: list[tuple[str, dict[str, Any]]] = []
        for t in targets:
            try:
                vms = Client(t, self.get_option("timeout")).get("/vms")
            except AgentError as e:
                if strict:
                    raise AnsibleParserError(f"{t.name}: {e.message}") from None
                self.display.warning(f"corehost.hvagent.hvagent: {t.name}: {e.message}; "
                                     "its VMs are left out")
                continue
            found += [(t.name, vm) for vm in vms]
        counts = Counter(vm["name"] for _, vm in found)
        for agent, vm in found:
            name = vm["name"] if counts[vm["name"]] == 1 else f"{agent}_{vm['name']}"
            self._add(name, agent, vm, strict)

    def _add(self, name: str, agent: str, vm: dict[str, Any], strict: bool) -> None:
        spec = vm["spec"]
        host = self.inventory.add_host(name)
        hostvars = {
            "hvagent_host": agent, "hvagent_vm": vm["name"], "hvagent_state": vm["state"],
            "hvagent_vcpus": spec["vcpus"], "hvagent_memory_mib": spec["memory_mib"],
            "hvagent_nics": [nic_vars(n) for n in spec.get("nics", [])],
            "hvagent_disks": [disk_vars(d) for d in spec.get("disks", [])],
        }
        for k, v in hostvars.items():
            self.inventory.set_variable(host, k, v)
        for g in (group_name("hvagent", agent), group_name("hvagent_state", vm["state"])):
            self.inventory.add_group(g)
            self.inventory.add_child(g, host)
        self._set_composite_vars(self.get_option("compose"), hostvars, host, strict=strict)
        self._add_host_to_composed_groups(self.get_option("groups"), hostvars, host,
                                          strict=strict)
        self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, host,
                                       strict=strict)
