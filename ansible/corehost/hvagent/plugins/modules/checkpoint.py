"""Ansible module corehost.hvagent.checkpoint: one checkpoint of a VM (create, revert
to, delete) through the agent's REST API; the agent's jobs are waited for."""

from __future__ import annotations

DOCUMENTATION = r"""
module: checkpoint
short_description: Checkpoints of a VM on a corehost host (hvagent)
version_added: 0.1.0
description:
  - Creates, reverts to or deletes a named checkpoint of a VM. A checkpoint of a running
    VM holds its memory too; of a stopped VM, its disks.
  - Each operation is a job on the agent; the module waits for it to end.
extends_documentation_fragment:
  - corehost.hvagent.connection
options:
  vm:
    description: The VM's name.
    type: str
    required: true
  name:
    description: The checkpoint's name.
    type: str
    required: true
  state:
    description:
      - V(present) the checkpoint exists (taken now if missing).
      - V(absent) it does not exist (the VM's other checkpoints stay valid).
      - V(reverted) the VM is at this checkpoint. The agent marks the checkpoint the VM's
        state last came from (created or reverted to) as C(current); a C(current)
        checkpoint is not reverted again unless O(force). Fails when the checkpoint does
        not exist.
    type: str
    choices: [present, absent, reverted]
    default: present
  description:
    description: Description stored with a new checkpoint.
    type: str
    default: ""
  force:
    description: With V(reverted), revert even when the checkpoint is C(current).
    type: bool
    default: false
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
notes:
  - The diff shows whether the checkpoint exists and is C(current), before and after.
author:
  - corehost contributors
"""

EXAMPLES = r"""
- name: Checkpoint before the upgrade
  corehost.hvagent.checkpoint:
    host: alpha
    vm: web
    name: before-upgrade
    description: ahead of the 2.0 upgrade

- name: The upgrade failed, back to it
  corehost.hvagent.checkpoint:
    host: alpha
    vm: web
    name: before-upgrade
    state: reverted

- name: Done with it
  corehost.hvagent.checkpoint:
    host: alpha
    vm: web
    name: before-upgrade
    state: absent
"""

RETURN = r"""
checkpoint:
  description: The checkpoint as the agent reports it after the task.
  returned: when it exists
  type: dict
job:
  description: The finished job of the operation.
  returned: when one ran
  type: dict
"""

from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.corehost.hvagent.plugins.module_utils.agent import (  # noqa: E402
    CONNECTION_ARGS,
    CONNECTION_EXCLUSIVE,
    AgentError,
    Client,
    execute,
    seg,
)


def _view(cp: dict[str, Any] | None) -> dict[str, Any]:
    return {"exists": cp is not None, "current": bool(cp and cp["current"])}


def run(module: AnsibleModule, c: Client) -> dict[str, Any]:
    p = module.params
    vm = f"/vms/{seg(p['vm'])}"
    if c.find(vm) is None:
        raise AgentError(f"vm: no VM named {p['vm']!r} on {c.target.name}")
    path = f"{vm}/checkpoints/{seg(p['name'])}"
    cp = c.find(path)
    before = _view(cp)
    after = dict(before)
    method: tuple[str, str, Any] | None = None
    if p["state"] == "present" and cp is None:
        method = ("POST", f"{vm}/checkpoints",
                  {"name": p["name"], "description": p["description"]})
        after = {"exists": True, "current": True}
    elif p["state"] == "absent" and cp is not None:
        method = ("DELETE", path, None)
        after = {"exists": False, "current": False}
    elif p["state"] == "reverted":
        if cp is None:
            raise AgentError(f"name: {p['vm']} has no checkpoint named {p['name']!r} to "
                             "revert to")
        if not cp["current"] or p["force"]:
            method = ("POST", f"{path}/revert", None)
            after = {"exists": True, "current": True}
    result: dict[str, Any] = {"changed": method is not None}
    if method is not None and not module.check_mode:
        result["job"] = c.call(method[0], method[1], body=method[2], timeout=120)
        cp = c.find(path)
        after = _view(cp)
    if cp is not None:
        result["checkpoint"] = cp
    if module._diff:
        result["diff"] = {"before": before, "after": after}
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGS,
            "vm": {"type": "str", "required": True},
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "default": "present",
                      "choices": ["present", "absent", "reverted"]},
            "description": {"type": "str", "default": ""},
            "force": {"type": "bool", "default": False},
        },
        mutually_exclusive=CONNECTION_EXCLUSIVE,
        supports_check_mode=True,
    )
    execute(module, run)


if __name__ == "__main__":
    main()
