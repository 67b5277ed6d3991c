"""The host policy file the image build renders from the profile is one the agent loads."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest

from hvagent.errors import InvalidRequest
from hvagent.policy import load_policy

TEMPLATES = Path(__file__).resolve().parents[2] / "elements" / "hvagent" / "templates"


def render(agent: object, tmp_path: Path) -> Path:
    # The builder's environment: StrictUndefined, attribute access on the profile.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.get_template("etc/hvagent/policy.yaml.j2").render(
        profile=SimpleNamespace(name="p", agent=agent))
    out = tmp_path / "policy.yaml"
    out.write_text(text)
    return out


def test_profile_policy_is_rendered_and_loads(tmp_path: Path) -> None:
    agent = SimpleNamespace(policy={
        "quotas": {"max_vcpus_per_vm": 4, "max_memory_mib_per_host": 16384},
        "disk_formats": ["qcow2", "vhdx"], "vlans": {"VMOperator": [10, 20]},
        "nested_virtualization": False,
        "roles": {"PowerOnly": {"privileges": ["VM.PowerMgmt", "VM.Audit"]}},
        "acl": [{"path": "/vms", "principal": "ops", "role": "PowerOnly"}],
    })
    p = load_policy(render(agent, tmp_path))
    assert p.quotas.max_vcpus_per_vm == 4 and p.quotas.max_memory_mib_per_host == 16384
    assert p.disk_formats == ["qcow2", "vhdx"] and p.vlans == {"VMOperator": [10, 20]}
    assert not p.nested_virtualization
    assert p.role("PowerOnly") is not None and p.acl[0].principal == "ops"


def test_profile_without_policy_renders_an_empty_policy(tmp_path: Path) -> None:
    p = load_policy(render(SimpleNamespace(accel="auto"), tmp_path))
    assert p.quotas.max_vcpus_per_vm is None and p.nested_virtualization


def test_a_wrong_profile_policy_is_caught_when_the_agent_loads_it(tmp_path: Path) -> None:
    f = render(SimpleNamespace(policy={"quotas": {"max_cpus": 2}}), tmp_path)
    with pytest.raises(InvalidRequest, match="quotas.max_cpus: unknown key"):
        load_policy(f)
