"""Profiles: inheritance, cycles, and every error message as `file:line: field: message`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from builder.profile import OutputFormat, ProfileError, load

BASE = """\
name: base
description: "the parent"
release: bookworm
elements: [debian-minimal, vm]
packages:
  add: [openssh-server, less, vim-tiny]
  remove: [nano]
image_size: 2G
outputs: [qcow2, raw]
users:
  - name: admin
    ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAbc admin@example"]
    groups: [adm]
    sudo: true
  - name: ops
kernel_cmdline: "quiet"
agent: {accel: tcg, listen: /run/hvagent/a.sock}
"""


@pytest.fixture()
def profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A profiles/ directory in a fresh current directory (so errors say profiles/x.yaml)."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "base.yaml").write_text(BASE)
    return d


def write(d: Path, name: str, text: str) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path | str) -> str:
    with pytest.raises(ProfileError) as info:
        load(path)
    return str(info.value)


def test_child_inherits_and_merges(profiles: Path) -> None:
    write(profiles, "child", """\
        name: child
        extends: base
        elements: [vm, extra-element]
        packages:
          add: [htop, nano]
          remove: [vim-tiny]
        outputs: [vhd]
        users:
          - name: admin
            groups: [adm, kvm]
          - name: tester
        agent: {state_dir: /srv/hvagent}
        test_access: true
        """)
    p = load(profiles / "child.yaml")
    assert p.name == "child"
    assert p.extends_chain == ("base",)
    assert p.description == "the parent"  # scalar inherited
    assert p.release == "bookworm"
    # elements appended, deduplicated, order kept; test_access brings its element
    assert p.elements == ("debian-minimal", "vm", "extra-element", "test-access")
    # adds of both minus removes of both
    assert p.packages == ("openssh-server", "less", "htop")
    assert p.packages_removed == ("nano", "vim-tiny")
    assert p.outputs == (OutputFormat.VHD,)  # overridden, not appended
    assert p.image_size == "2G" and p.image_size_gb == "2"
    assert [u.name for u in p.users] == ["admin", "ops", "tester"]
    admin = p.users[0]
    assert admin.groups == ("adm", "kvm")  # child's key wins
    assert admin.sudo is True and admin.ssh_keys  # parent's other keys kept
    assert p.agent.accel == "tcg" and p.agent.listen == "/run/hvagent/a.sock"
    assert p.agent.state_dir == "/srv/hvagent"
    assert p.agent.log_dir == "/var/log/hvagent"  # default
    assert p.kernel_cmdline == "quiet"
    assert p.test_access is True


def test_three_levels_and_name_lookup(profiles: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(profiles, "mid", "name: mid\nextends: base\nrelease: trixie\n")
    write(profiles, "leaf", "name: leaf\nextends: mid\nimage_size: 512M\n")
    monkeypatch.setenv("COREHOST_ROOT", str(profiles.parent))
    p = load("leaf")  # a bare name is looked up in profiles/
    assert p.extends_chain == ("mid", "base")
    assert p.release == "trixie"
    assert p.image_size_gb == "0.5"
    assert p.elements == ("debian-minimal", "vm")


def test_packages_list_shorthand_means_add(profiles: Path) -> None:
    write(profiles, "s", "name: s\nextends: base\npackages: [htop]\n")
    assert load(profiles / "s.yaml").packages == ("openssh-server", "less", "vim-tiny", "htop")


def test_defaults_for_a_lone_profile(profiles: Path) -> None:
    write(profiles, "lone", "name: lone\nelements: [debian-minimal]\n")
    p = load(profiles / "lone.yaml")
    assert (p.release, p.outputs, p.image_size, p.test_access) == (
        "bookworm", (OutputFormat.QCOW2,), None, False)
    assert p.to_dict()["outputs"] == ["qcow2"]


def test_cycle_is_detected(profiles: Path) -> None:
    write(profiles, "a", "name: a\nextends: b\n")
    write(profiles, "b", "name: b\nelements: [vm]\nextends: a\n")
    assert error_of(profiles / "a.yaml") == (
        "profiles/b.yaml:3: extends: inheritance cycle: a -> b -> a")


def test_self_extends_is_a_cycle(profiles: Path) -> None:
    write(profiles, "me", "name: me\nextends: me\n")
    assert error_of(profiles / "me.yaml") == (
        "profiles/me.yaml:2: extends: inheritance cycle: me -> me")


def test_missing_parent(profiles: Path) -> None:
    write(profiles, "orphan", "name: orphan\n\nextends: nobody\n")
    assert error_of(profiles / "orphan.yaml") == (
        "profiles/orphan.yaml:3: extends: no profile 'nobody' (profiles/nobody.yaml not found)")


def test_missing_file(profiles: Path) -> None:
    assert error_of("profiles/ghost.yaml") == "profiles/ghost.yaml: profile: no such profile file"


# (YAML body, expected `line: field: message` of the error)
ERRORS = [
    ("name: x\nelements: [vm]\ncolour: blue\n",
     "3: colour: unknown key (allowed: name, description, extends, release, elements, packages, "
     "image_size, outputs, users, kernel_cmdline, agent, policy, test_access)"),
    ("elements: [vm]\n", "1: name: required (must equal the file name)"),
    ("name: other\n", "1: name: 'other' must equal the file name 'x'"),
    ("name: X Y\n", "1: name: 'X Y' is not a profile name ([a-z0-9_-])"),
    ("name: x\nelements: [vm]\n\n\n\n\npackages: 5\n",
     "7: packages: expected a list of strings or a mapping {add: [...], remove: [...]}"),
    ("name: x\npackages:\n  add: htop\n", "3: packages.add: expected a list of strings"),
    ("name: x\npackages:\n  add:\n    - htop\n    - Bad Name\n",
     "5: packages.add[1]: 'Bad Name' is not a Debian package name"),
    ("name: x\npackages: {add: [], drop: [a]}\n",
     "2: packages.drop: unknown key (allowed: add, remove)"),
    ("name: x\nelements: vm\n", "2: elements: expected a list of strings"),
    ("name: x\nelements: [vm, 'no/slash']\n", "2: elements[1]: 'no/slash' is not an element name"),
    ("name: x\nelements: []\n",
     "2: elements: a profile needs at least one element (here or in a parent)"),
    ("name: x\ndescription: [a]\n", "2: description: expected a string, got a list"),
    ("name: x\nrelease: 12\n", "2: release: expected a string, got a number"),
    ("name: x\nimage_size: 3\n", "2: image_size: expected a size like 3G or 512M, got 3"),
    ("name: x\nimage_size: 3GB\n", "2: image_size: expected a size like 3G or 512M, got '3GB'"),
    ("name: x\noutputs: [qcow2, iso]\n",
     "2: outputs[1]: unknown output 'iso' (choose from qcow2, raw, vhd, vhdx, usb, pxe)"),
    ("name: x\noutputs: [pxe]\n", "2: outputs[0]: output 'pxe' is not supported yet"),
    ("name: x\noutputs: []\n", "2: outputs: expected at least one output format"),
    ("name: x\nusers: admin\n", "2: users: expected a list of users, got a string"),
    ("name: x\nusers:\n  - groups: [adm]\n", "3: users[0]: each user needs a name"),
    ("name: x\nusers:\n  - name: a\n    shell: /bin/sh\n",
     "4: users[0].shell: unknown key (allowed: name, ssh_keys, groups, sudo)"),
    ("name: x\nusers:\n  - name: a\n  - name: a\n", "4: users[1].name: user 'a' listed twice"),
    ("name: x\nusers:\n  - name: a\n    ssh_keys: [hello]\n",
     "4: users[0].ssh_keys[0]: 'hello' is not an OpenSSH public key"),
    ("name: x\nusers:\n  - name: a\n    sudo: yes please\n",
     "4: users[0].sudo: expected true or false, got a string"),
    ("name: x\nusers:\n  - name: Root!\n", "3: users[0].name: 'Root!' is not a valid user name"),
    ("name: x\nkernel_cmdline: 'a=\"b\"'\n",
     "2: kernel_cmdline: must not contain quotes, backslashes, $, ` or newlines"),
    ("name: x\nagent: {accel: fast}\n", "2: agent.accel: expected auto, kvm or tcg, got 'fast'"),
    ("name: x\nagent:\n  state_dir: var/lib\n",
     "3: agent.state_dir: expected an absolute path, got 'var/lib'"),
    ("name: x\nagent:\n  port: 8080\n",
     "3: agent.port: unknown key (allowed: accel, listen, state_dir, storage_dir, run_dir, "
     "log_dir)"),
    ("name: x\nagent: /run\n", "2: agent: expected a mapping with keys accel, listen, state_dir, "
     "storage_dir, run_dir, log_dir, got a string"),
    ("name: x\ntest_access: 1\n", "2: test_access: expected true or false, got a number"),
    ("name: x\nname: y\n", "2: name: duplicate key"),
    ("name: x\nelements: [vm\n",
     "3: yaml: invalid YAML: expected ',' or ']', but got '<stream end>'"),
    ("- name: x\n", "1: yaml: expected a mapping of settings at the top level"),
    ("", "1: yaml: empty file, expected a mapping of settings"),
]


@pytest.mark.parametrize(("body", "expected"), ERRORS, ids=[e[1].split(":")[1].strip()
                                                               + "-" + str(i)
                                                               for i, e in enumerate(ERRORS)])
def test_error_messages(profiles: Path, body: str, expected: str) -> None:
    path = profiles / "x.yaml"
    path.write_text(body)
    assert error_of(path) == f"profiles/x.yaml:{expected}"


def test_error_in_parent_names_the_parent_file(profiles: Path) -> None:
    write(profiles, "p", "name: p\nelements: [vm]\noutputs: [floppy]\n")
    write(profiles, "c", "name: c\nextends: p\n")
    assert error_of(profiles / "c.yaml").startswith("profiles/p.yaml:3: outputs[0]: unknown output")


def test_policy_merges_key_by_key_and_renders_a_policy_the_agent_loads(
        profiles: Path, tmp_path: Path) -> None:
    from builder import render
    from hvagent.policy import load_policy

    write(profiles, "host", """\
        name: host
        elements: [debian-minimal, vm, hvagent]
        policy:
          quotas: {max_vcpus_per_vm: 8}
          nested_virtualization: false
        """)
    write(profiles, "tenant", """\
        name: tenant
        extends: host
        policy:
          quotas: {max_vcpus_per_vm: 4, max_vms_per_principal: 2}
          disk_formats: [qcow2, vhdx]
        """)
    profile = load(profiles / "tenant.yaml")
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    overlay = render.render_overlay(profile, build_dir, None) / render.OVERLAY
    policy = load_policy(overlay / "static/etc/hvagent/policy.yaml")
    assert policy.quotas.max_vcpus_per_vm == 4
    assert policy.quotas.max_vms_per_principal == 2
    assert policy.disk_formats == ["qcow2", "vhdx"]
    assert policy.nested_virtualization is False


def test_bad_policy_names_the_line_and_the_policy_field(profiles: Path) -> None:
    write(profiles, "p", """\
        name: p
        policy:
          quotas:
            max_vcpus_per_vm: 0
        """)
    assert error_of(profiles / "p.yaml").startswith(
        "profiles/p.yaml:4: policy.quotas.max_vcpus_per_vm: ")
    write(profiles, "q", """\
        name: q
        policy:
          quota: {}
        """)
    assert error_of(profiles / "q.yaml") == "profiles/q.yaml:3: policy.quota: unknown key"


def test_no_policy_renders_the_agents_defaults(profiles: Path, tmp_path: Path) -> None:
    from builder import render
    from hvagent.policy import HostPolicy, load_policy

    write(profiles, "plain", "name: plain\nelements: [debian-minimal, vm, hvagent]\n")
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    overlay = render.render_overlay(load(profiles / "plain.yaml"), build_dir, None)
    rendered = overlay / render.OVERLAY / "static/etc/hvagent/policy.yaml"
    assert load_policy(rendered) == HostPolicy()
