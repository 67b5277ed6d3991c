"""Ansible module corehost.hvagent.policy: the host policy file of a corehost host,
replaced whole through the agent's REST API (GET/PUT /api/v1/policy)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: policy
short_description: The host policy of a corehost host (hvagent)
version_added: 0.1.0
description:
  - Pushes the host policy (roles, ACL, quotas, disk formats, VLANs, image libraries) as
    YAML text. The agent validates it, writes it atomically and applies it at once; a
    policy it refuses fails the task with the agent's message naming the field.
  - Changed only when the text differs from the agent's, byte for byte.
extends_documentation_fragment:
  - corehost.hvagent.connection
options:
  src:
    description:
      - File holding the policy YAML, read where the module runs (the controller
        with C(connection=local) or C(delegate_to=localhost)).
    type: path
  content:
    description: The policy YAML itself.
    type: str
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
notes:
  - Needs the privilege C(Permissions.Modify) on C(/) to push, C(Sys.Audit) to read.
  - One of O(src) and O(content) is required.
author:
  - corehost contributors
"""

EXAMPLES = r"""
- name: The fleet's policy
  corehost.hvagent.policy:
    host: alpha
    src: files/hvagent-policy.yaml

- name: Inline
  corehost.hvagent.policy:
    host: alpha
    content: |
      quotas:
        max_vcpus_per_vm: 8
      library:
        - /var/lib/hvagent/library
"""

RETURN = r"""
sha256:
  description: sha256 of the policy text the agent holds after the task.
  returned: success
  type: str
"""

import hashlib  # noqa: E402
from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.corehost.hvagent.plugins.module_utils.agent import (  # noqa: E402
    CONNECTION_ARGS,
    CONNECTION_EXCLUSIVE,
    AgentError,
    Client,
    execute,
)


def _text(p: dict[str, Any]) -> str:
    if p["content"] is not None:
        return str(p["content"])
    try:
        with open(p["src"], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise AgentError(f"src: {p['src']}: unreadable: "
                         f"{getattr(e, 'strerror', None) or e}") from None


def run(module: AnsibleModule, c: Client) -> dict[str, Any]:
    text = _text(module.params)
    current = c.get("/policy")
    before = str(current.get("text", ""))
    changed = before != text
    sha = current.get("sha256")
    if changed:
        sha = hashlib.sha256(text.encode()).hexdigest()
        if not module.check_mode:
            sha = c.call("PUT", "/policy", body={"text": text}).get("sha256")
    result: dict[str, Any] = {"changed": changed, "sha256": sha}
    if module._diff:
        result["diff"] = {"before": before, "after": text,
                          "before_header": "policy (agent)", "after_header": "policy (task)"}
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={**CONNECTION_ARGS, "src": {"type": "path"}, "content": {"type": "str"}},
        mutually_exclusive=[*CONNECTION_EXCLUSIVE, ("src", "content")],
        required_one_of=[("src", "content")],
        supports_check_mode=True,
    )
    execute(module, run)


if __name__ == "__main__":
    main()
