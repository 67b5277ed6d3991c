"""Ansible module corehost.hvagent.vm: one child VM of a corehost host, its existence,
power state, memory and vCPUs, through the agent's REST API."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vm
short_description: Child VMs of a corehost host (hvagent)
version_added: 0.1.0
description:
  - Creates, starts, stops, resizes and removes a VM through the agent's REST API.
  - Raising O(memory_mib) or O(vcpus) on a running VM hot-adds memory (a DIMM, in
    steps of 128 MiB) or vCPUs, which the guest sees at once. Lowering them on a running
    VM hot-removes whole hot-added DIMMs (newest first) and hot-added vCPUs; what the
    agent cannot remove fails the task with the agent's message. A stopped VM takes any
    value up to its maxima.
  - The other spec options (O(max_memory_mib), O(max_vcpus), O(kernel), O(disks), ...)
    are used when the VM is created; on an existing VM a different value is reported as a
    warning, never applied.
extends_documentation_fragment:
  - corehost.hvagent.connection
options:
  name:
    description: The VM's name (1 to 63 of C(A-Z a-z 0-9 _ . -), starting with a letter or digit).
    type: str
    required: true
  state:
    description:
      - V(present) the VM exists (created if missing, left in its power state).
      - V(running) exists and runs (started, or resumed when paused).
      - V(stopped) exists and is off (ACPI power-off, forced after O(stop_timeout)).
      - V(absent) does not exist (stopped first, then deleted with its agent-made disks
        unless O(keep_disks)).
    type: str
    choices: [present, running, stopped, absent]
    default: present
  memory_mib:
    description: Memory in MiB (created with 512 when not given).
    type: int
  vcpus:
    description: Number of vCPUs (created with 1 when not given).
    type: int
  max_memory_mib:
    description: Ceiling memory can grow to by hot-add (default O(memory_mib), so no hot-add).
    type: int
  max_vcpus:
    description: Ceiling the vCPUs can grow to by hot-add (default O(vcpus)).
    type: int
  memory_slots:
    description:
      - DIMM slots for memory hot-add (default 8 when O(max_memory_mib) is above
        O(memory_mib)).
    type: int
  firmware:
    description: Boot firmware.
    type: str
    choices: [bios, uefi]
  kernel:
    description:
      - Kernel image to boot directly, from the agent's storage directory or an image
        library of its host policy (as C(hvctl vm create --kernel)).
    type: str
  initrd:
    description: Initrd for O(kernel) (storage directory or library).
    type: str
  append:
    description: Kernel command line for O(kernel).
    type: str
  disks:
    description:
      - Disks, as in the agent's VM spec (and C(hvctl vm create --disk/--new-disk)).
    type: list
    elements: dict
    suboptions:
      path:
        description: An existing image in the agent's storage directory.
        type: str
      size:
        description: Size of a new image the agent creates (bytes, or C(512M), C(10G)).
        type: str
      format:
        description: Image format.
        type: str
        choices: [qcow2, raw, vpc, vhd, vhdx]
      bus:
        description: virtio (hot-pluggable) or sata (for guests without virtio drivers).
        type: str
        choices: [virtio, sata]
  nics:
    description: Network interfaces (as C(hvctl vm create --nic)).
    type: list
    elements: dict
    suboptions:
      network:
        description: V(user) (QEMU NAT) or V(bridge) (the host bridge of O(nics[].vlan)).
        type: str
        choices: [user, bridge]
      vlan:
        description: VLAN id of a bridge NIC (1..4094); implies V(bridge).
        type: int
      mac:
        description: MAC address (default a random 52:54:00:xx:xx:xx).
        type: str
  boot_order:
    description: Boot devices in order.
    type: list
    elements: str
    choices: [disk, network]
  stop_timeout:
    description: Seconds the guest gets to power off before it is forced off.
    type: float
    default: 60
  force:
    description: Stop by forcing the VM off at once (no ACPI power-off).
    type: bool
    default: false
  keep_disks:
    description: With V(absent), keep the disks the agent created for the VM.
    type: bool
    default: false
notes:
  - Supports check mode (nothing changes; the result says what would) and diff mode
    (memory, vCPUs and power state before and after).
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
author:
  - corehost contributors
"""

EXAMPLES = r"""
- name: A web VM from the host's image library, running, with room to grow
  corehost.hvagent.vm:
    host: alpha
    name: web
    state: running
    vcpus: 1
    max_vcpus: 4
    memory_mib: 512
    max_memory_mib: 2048
    kernel: /var/lib/hvagent/library/vmlinuz
    initrd: /var/lib/hvagent/library/initrd.img
    append: console=ttyS0 memhp_default_state=online_movable
    disks:
      - size: 10G
    nics:
      - vlan: 20

- name: Give it more memory while it runs (hot-add)
  corehost.hvagent.vm:
    host: alpha
    name: web
    memory_mib: 1024

- name: Gone, disks included
  corehost.hvagent.vm:
    url: https://10.0.0.5:8443
    ca_fingerprint: "AB:CD:..."
    token_file: ~/.config/hvctl/alpha.token
    name: web
    state: absent
"""

RETURN = r"""
vm:
  description: The VM as the agent reports it after the task (absent when there is none).
  returned: when the VM exists
  type: dict
changes:
  description: What was (or in check mode would be) done, in order.
  returned: always
  type: list
  elements: str
"""

from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.corehost.hvagent.plugins.module_utils.agent import (  # noqa: E402
    CONNECTION_ARGS,
    CONNECTION_EXCLUSIVE,
    AgentError,
    Client,
    seg,
    target_from_params,
)

# The agent's VM states, grouped by what they mean for power (QEMU runs in ACTIVE).
ACTIVE = ("running", "paused", "unresponsive")
CREATE_ONLY = ("max_memory_mib", "max_vcpus", "memory_slots", "firmware", "kernel",
               "initrd", "append")


def _spec(p: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": p["name"]}
    for key in ("vcpus", "memory_mib", *CREATE_ONLY, "boot_order"):
        if p.get(key) is not None:
            spec[key] = p[key]
    if p.get("disks") is not None:
        spec["disks"] = [{k: v for k, v in d.items() if v is not None} for d in p["disks"]]
    if p.get("nics") is not None:
        spec["nics"] = [{k: v for k, v in n.items() if v is not None} for n in p["nics"]]
    return spec


def _view(vm: dict[str, Any] | None) -> dict[str, Any]:
    if vm is None:
        return {"state": "absent"}
    return {"state": vm["state"], "memory_mib": vm["spec"]["memory_mib"],
            "vcpus": vm["spec"]["vcpus"]}


class VmTask:
    def __init__(self, module: AnsibleModule, client: Client) -> None:
        self.m = module
        self.p = module.params
        self.c = client
        self.path = f"/vms/{seg(self.p['name'])}"
        self.changes: list[str] = []
        self.warnings: list[str] = []
        self.before: dict[str, Any] = {}

    def _do(self, what: str, method: str, path: str, body: Any = None,
            timeout: float | None = None) -> Any:
        self.changes.append(what)
        if self.m.check_mode:
            return None
        return self.c.call(method, path, body=body, timeout=timeout)

    def run(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(the VM afterwards, or None; the predicted view afterwards)"""
        p = self.p
        vm = self.c.find(self.path)
        self.before = _view(vm)
        if p["state"] == "absent":
            if vm is None:
                return None, _view(None)
            if vm["state"] in ACTIVE:
                self._stop(vm, force=True)
            self._do(f"delete {p['name']}", "DELETE",
                     self.path + ("?keep_disks=true" if p["keep_disks"] else ""))
            return None, _view(None)

        if vm is None:
            created = self._do(f"create {p['name']}", "POST", "/vms", body=_spec(p), timeout=300)
            predicted = {"state": "defined", "memory_mib": p["memory_mib"] or 512,
                         "vcpus": p["vcpus"] or 1}
            if created is not None:
                vm = created
                predicted = _view(vm)
        else:
            self._warn_create_only(vm)
            predicted = _view(vm)

        want_active = {"running": True, "stopped": False}.get(p["state"])
        # Off first when it is to be off: the resize is then a cold change.
        if want_active is False and predicted["state"] in ACTIVE:
            self._stop(vm, force=p["force"])
            predicted["state"] = "stopped"
        cold = predicted["state"] not in ACTIVE
        for key, route in (("memory_mib", "memory"), ("vcpus", "vcpus")):
            if p[key] is not None and p[key] != predicted[key]:
                how = "set" if cold else ("hot-add" if p[key] > predicted[key] else "hot-remove")
                res = self._do(f"{how} {key} {predicted[key]} -> {p[key]}", "PUT",
                               f"{self.path}/{route}", body={key: p[key]}, timeout=120)
                if res is not None and res.get("status") == "pending":
                    self.warnings.append(f"{key}: {res['detail']}: the guest has not released "
                                         "the device yet (it completes at the latest on the "
                                         "next power cycle)")
                predicted[key] = p[key]
        if want_active is True and predicted["state"] not in ACTIVE:
            self._do(f"start {p['name']}", "POST", f"{self.path}/start", timeout=120)
            predicted["state"] = "running"
        elif want_active is True and predicted["state"] == "paused":
            self._do(f"resume {p['name']}", "POST", f"{self.path}/resume", timeout=120)
            predicted["state"] = "running"
        elif want_active is True and predicted["state"] == "unresponsive":
            raise AgentError(f"{p['name']}: QEMU runs but does not answer (unresponsive); "
                             "stop it (state: stopped) and start it again")
        if self.changes and not self.m.check_mode:
            vm = self.c.get(self.path)
            predicted = _view(vm)
        return vm, predicted

    def _stop(self, vm: dict[str, Any] | None, force: bool) -> None:
        t = self.p["stop_timeout"]
        self._do(f"stop {self.p['name']}" + (" (forced)" if force else ""), "POST",
                 f"{self.path}/stop", body={"force": force, "timeout": t}, timeout=t + 60)

    def _warn_create_only(self, vm: dict[str, Any]) -> None:
        spec = vm["spec"]
        for key in CREATE_ONLY:
            want = self.p.get(key)
            if want is not None and spec.get(key) != want:
                self.warnings.append(f"{key}: the VM has {spec.get(key)!r}, not {want!r}; "
                                     "it is set when the VM is created (not changed here)")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGS,
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "default": "present",
                      "choices": ["present", "running", "stopped", "absent"]},
            "memory_mib": {"type": "int"},
            "vcpus": {"type": "int"},
            "max_memory_mib": {"type": "int"},
            "max_vcpus": {"type": "int"},
            "memory_slots": {"type": "int"},
            "firmware": {"type": "str", "choices": ["bios", "uefi"]},
            "kernel": {"type": "str"},
            "initrd": {"type": "str"},
            "append": {"type": "str"},
            "disks": {"type": "list", "elements": "dict", "options": {
                "path": {"type": "str"}, "size": {"type": "str"},
                "format": {"type": "str", "choices": ["qcow2", "raw", "vpc", "vhd", "vhdx"]},
                "bus": {"type": "str", "choices": ["virtio", "sata"]}}},
            "nics": {"type": "list", "elements": "dict", "options": {
                "network": {"type": "str", "choices": ["user", "bridge"]},
                "vlan": {"type": "int"}, "mac": {"type": "str"}}},
            "boot_order": {"type": "list", "elements": "str", "choices": ["disk", "network"]},
            "stop_timeout": {"type": "float", "default": 60.0},
            "force": {"type": "bool", "default": False},
            "keep_disks": {"type": "bool", "default": False},
        },
        mutually_exclusive=CONNECTION_EXCLUSIVE,
        supports_check_mode=True,
    )
    try:
        client = Client(target_from_params(module.params), module.params["timeout"])
    except AgentError as e:
        module.fail_json(msg=e.message, changes=[])
    task = VmTask(module, client)
    try:
        vm, after = task.run()
    except AgentError as e:
        # what was done before the failure, so that a rerun is understood
        module.fail_json(msg=e.message, changes=task.changes)
    for w in task.warnings:
        module.warn(w)
    result: dict[str, Any] = {"changed": bool(task.changes), "changes": task.changes}
    if vm is not None:
        result["vm"] = vm
    if module._diff:
        result["diff"] = {"before": task.before, "after": after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
