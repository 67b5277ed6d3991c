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


def test_kernel_modules_are_appended_along_the_chain(profiles: Path) -> None:
    write(profiles, "mid", "name: mid\nextends: base\nkernel_modules: [fs/ocfs2, fs/dlm]\n")
    write(profiles, "leaf", "name: leaf\nextends: mid\nkernel_modules:\n"
          "  - drivers/net/wireless/intel/*\n  - fs/dlm\n")
    p = load(profiles / "leaf.yaml")
    assert p.kernel_modules == ("fs/ocfs2", "fs/dlm", "drivers/net/wireless/intel/*")
    assert p.to_dict()["kernel_modules"] == list(p.kernel_modules)
    assert load(profiles / "base.yaml").kernel_modules == ()


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
     "kernel_modules, image_size, outputs, users, kernel_cmdline, agent, policy, test_access)"),
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
    *((f"name: x\nkernel_cmdline: {arg}\n",
       "2: kernel_cmdline: must not contain control characters or any of ' ; & | < > { }")
      for arg in ('"a\\0b"', '"a\\tb"', '"a\\rb"', "'quiet; reboot'", "'a || b'",
                  "'a > /x'", "'a{b}'", '"it\'s"')),
    ("name: x\nagent: {accel: fast}\n", "2: agent.accel: expected auto, kvm or tcg, got 'fast'"),
    ("name: x\nagent:\n  state_dir: var/lib\n",
     "3: agent.state_dir: expected an absolute path, got 'var/lib'"),
    ("name: x\nagent:\n  storage_dir: \"/srv/vms\\nExecStart=/bin/sh\"\n",
     "3: agent.storage_dir: expected a path of printable characters without spaces, at most "
     "4095 bytes, got '/srv/vms\\nExecStart=/bin/sh'"),
    ("name: x\nagent:\n  log_dir: \"/var/log/my logs\"\n",
     "3: agent.log_dir: expected a path of printable characters without spaces, at most "
     "4095 bytes, got '/var/log/my logs'"),
    ("name: x\nagent:\n  run_dir: \"/r\\0n\"\n",
     "3: agent.run_dir: expected a path of printable characters without spaces, at most "
     "4095 bytes, got '/r\\x00n'"),
    ("name: x\nagent:\n  port: 8080\n",
     "3: agent.port: unknown key (allowed: accel, listen, state_dir, storage_dir, run_dir, "
     "log_dir)"),
    ("name: x\nagent: /run\n", "2: agent: expected a mapping with keys accel, listen, state_dir, "
     "storage_dir, run_dir, log_dir, got a string"),
    ("name: x\nkernel_modules: drivers/net/wireless\n",
     "2: kernel_modules: expected a list of strings"),
    ("name: x\nkernel_modules: [fs/xfs, 7]\n", "2: kernel_modules: expected a list of strings"),
    ("name: x\nkernel_modules:\n  - fs/xfs\n  - /lib/modules/x/kernel/fs/ocfs2\n",
     "4: kernel_modules[1]: '/lib/modules/x/kernel/fs/ocfs2' must be a path below kernel/, "
     "without a leading / (e.g. drivers/net/ethernet/intel/ice)"),
    *((f"name: x\nkernel_modules: ['{entry}']\n",
       f"2: kernel_modules[0]: '{entry}' is not a module path (letters, digits, . _ - + , / "
       "and the globs * ?)")
      for entry in ("fs/[a-z]*", "fs/ocfs2;x", "drivers//net", "fs/ocfs2 fs/gfs2", "")),
    *((f"name: x\nkernel_modules: ['{entry}']\n",
       f"2: kernel_modules[0]: '{entry}' must not contain . or .. components")
      for entry in ("fs/../../etc", "./fs", "fs/..")),
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
    from hvagent.access.policy import load_policy

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
    from hvagent.access.policy import HostPolicy, load_policy

    write(profiles, "plain", "name: plain\nelements: [debian-minimal, vm, hvagent]\n")
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    overlay = render.render_overlay(load(profiles / "plain.yaml"), build_dir, None)
    rendered = overlay / render.OVERLAY / "static/etc/hvagent/policy.yaml"
    assert load_policy(rendered) == HostPolicy()


def test_agent_defaults_are_the_agents_own(profiles: Path) -> None:
    from hvagent.config import AgentConfig

    write(profiles, "plain", "name: plain\nelements: [vm]\n")
    p = load(profiles / "plain.yaml")
    assert p.agent.config == AgentConfig()
    assert p.to_dict()["agent"]["storage_dir"] == str(AgentConfig().storage_dir)


def test_a_moved_storage_dir_is_writable_for_the_agents_unit(profiles: Path,
                                                              tmp_path: Path) -> None:
    # The unit's sandbox (ProtectSystem=strict) and tmpfiles.d follow the profile's
    # directories; a hard-coded ReadWritePaths left a moved storage_dir read-only.
    from builder import render
    from hvagent.config import AgentConfig, load_settings

    write(profiles, "moved", """\
        name: moved
        elements: [debian-minimal, vm, hvagent]
        agent: {storage_dir: /srv/vms, listen: /run/hvsock/hvagent.sock}
        """)
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    static = render.render_overlay(load(profiles / "moved.yaml"), build_dir, None) / (
        f"{render.OVERLAY}/static")
    unit = (static / "usr/lib/systemd/system/hvagent.service").read_text()
    rw = next(ln for ln in unit.splitlines() if ln.startswith("ReadWritePaths="))
    assert rw.removeprefix("ReadWritePaths=").split() == [
        "-/var/lib/hvagent", "-/srv/vms", "-/run/hvagent", "-/var/log/hvagent", "-/run/hvsock",
        "-/etc/hvagent"]  # the policy file's: PUT /api/v1/policy renames into it
    tmpfiles = (static / "usr/lib/tmpfiles.d/hvagent.conf").read_text()
    assert "d /srv/vms 0750 root hvagent -\n" in tmpfiles
    assert "d /run/hvsock 0750 root hvagent -\n" in tmpfiles
    config = load_settings(static / "etc/hvagent/hvagent.yaml", AgentConfig)
    assert str(config.storage_dir) == "/srv/vms"



# ---------------------------------------------------------------- hostile files and values
# Each member of the family gets one `file:line: field: message` line (never a traceback,
# never a hang): YAML features profiles do not need, files that are not profiles, and
# numbers out of range.



def laughs(levels: int) -> str:
    """A "billion laughs" profile: each level aliases the one before nine times."""
    body = "name: x\nelements: [vm]\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    return body + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
                          for i in range(1, levels))


HOSTILE = [
    ("name: x\nelements: &e [vm, *e]\n",
     "2: elements[1]: an alias refers to itself (recursive anchor)"),
    ("name: x\nelements: [vm]\npolicy: &p\n  quotas: *p\n",
     "4: policy.quotas: an alias refers to itself (recursive anchor)"),
    ("defaults: &d {release: bookworm}\nname: x\n<<: *d\n",
     "3: yaml: merge keys (<<) are not supported; use extends: to build on another profile"),
    ("name: x\nagent:\n  <<: {accel: tcg}\n",
     "3: agent: merge keys (<<) are not supported; use extends: to build on another profile"),
    ("name: x\nelements: [vm]\nwords: &w [a]\nmany: [" + ", ".join(["*w"] * 101) + "]\n",
     "4: yaml: more than 100 aliases; write the values out or use extends:"),
    ("name: x\nelements: " + "[" * 1000 + "]" * 1000 + "\n",
     "2: yaml: nested deeper than 32 levels"),
    ("name: x\nelements:\n\t- vm\n",
     "3: yaml: invalid YAML: found character '\\t' that cannot start any token"),
    ("name: x\n---\nname: y\n", "2: yaml: invalid YAML: expected a single document in the "
     "stream, but found another document"),
    ("42\n", "1: yaml: expected a mapping of settings at the top level"),
    ("# only a comment\n", "1: yaml: empty file, expected a mapping of settings"),
    ("? [a, b]\n: c\n", "1: yaml: keys must be strings, got a sequence"),
    ("name: x\nelements: !!python/object/apply:os.system [echo hi]\n",
     "2: elements: unsupported YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("name: x\nrelease: !!python/name:os.system ''\n",
     "2: release: invalid value: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/name:os.system'"),
    ("name: x\nrelease: !!int abc\n",
     "2: release: invalid value: invalid literal for int() with base 10: 'abc'"),
    ("name: x\nrelease: " + "9" * 5000 + "\n", "2: release: invalid value: Exceeds the limit "
     "(4300 digits) for integer string conversion: value has 5000 digits"),
    ("name: x\nrelease: 2024-01-01\n", "2: release: expected a string, got a date"),
    ("name: x\nagent:\n  accel: tcg\n  accel: kvm\n", "4: agent.accel: duplicate key"),
    # image_size: huge, zero, negative, a float, a boolean, beyond float range
    ("name: x\nimage_size: 100000000000000000000000000T\n",
     "2: image_size: 100000000000000000000000000T is larger than the limit of 2T"),
    ("name: x\nimage_size: 2049G\n", "2: image_size: 2049G is larger than the limit of 2T"),
    ("name: x\nimage_size: " + "9" * 400 + "M\n",
     "2: image_size: " + "9" * 400 + "M is larger than the limit of 2T"),
    ("name: x\nimage_size: 0G\n", "2: image_size: must be larger than zero"),
    ("name: x\nimage_size: -3G\n", "2: image_size: expected a size like 3G or 512M, got '-3G'"),
    ("name: x\nimage_size: 2.5\n", "2: image_size: expected a size like 3G or 512M, got 2.5"),
    ("name: x\nimage_size: true\n", "2: image_size: expected a size like 3G or 512M, got True"),
    # the policy's numbers: huge, negative, float, boolean
    ("name: x\npolicy:\n  quotas: {max_vcpus_per_vm: 100000000000000000000000000}\n",
     "3: policy.quotas.max_vcpus_per_vm: 100000000000000000000000000 is out of range "
     "(at most 2147483647)"),
    ("name: x\npolicy:\n  quotas: {max_memory_mib_per_vm: -1}\n",
     "3: policy.quotas.max_memory_mib_per_vm: Input should be greater than or equal to 1"),
    ("name: x\npolicy:\n  quotas: {max_vcpus_per_vm: 4.0}\n",
     "3: policy.quotas.max_vcpus_per_vm: Input should be a valid integer"),
    ("name: x\npolicy:\n  quotas: {max_vms_per_principal: true}\n",
     "3: policy.quotas.max_vms_per_principal: Input should be a valid integer"),
    ("name: x\npolicy:\n  vlans: {admin: [10, true]}\n",
     "3: policy.vlans.admin[1]: Input should be a valid integer"),
    ("name: x\npolicy:\n  nested_virtualization: 1\n",
     "3: policy.nested_virtualization: Input should be a valid boolean"),
    ("name: x\npolicy:\n  disk_formats: [!!binary aGk=]\n",
     "3: policy.disk_formats[0]: expected a string, number, list or mapping, got binary data"),
]


@pytest.mark.parametrize(("body", "expected"), HOSTILE,
                         ids=[f"{i}-{e[1].split(':')[1].strip()}" for i, e in enumerate(HOSTILE)])
def test_hostile_yaml_and_values(profiles: Path, body: str, expected: str) -> None:
    path = profiles / "x.yaml"
    path.write_text(body)
    assert error_of(path) == f"profiles/x.yaml:{expected}"


def test_non_utf8_file_names_the_line(profiles: Path) -> None:
    (profiles / "x.yaml").write_bytes(b"name: x\nelements: [vm]\ndescription: caf\xe9\n")
    assert error_of(profiles / "x.yaml") == "profiles/x.yaml:3: yaml: not UTF-8 text (byte 0xe9)"


def test_file_over_the_size_cap_is_refused_before_parsing(profiles: Path) -> None:
    from builder.profile import MAX_PROFILE_BYTES

    (profiles / "x.yaml").write_text("name: x\nelements: [vm]\n#" + "-" * MAX_PROFILE_BYTES)
    assert error_of(profiles / "x.yaml") == (
        "profiles/x.yaml: profile: larger than 256 KiB; not a profile")


def _not_files(profiles: Path) -> dict[str, str]:
    """Paths that are not regular files, each with what the error must call it."""
    import os

    (profiles / "dir.yaml").mkdir()
    os.mkfifo(profiles / "fifo.yaml")
    (profiles / "zero.yaml").symlink_to("/dev/zero")
    return {"dir": "a directory", "fifo": "a FIFO", "zero": "a character device"}


def test_paths_that_are_not_profile_files(profiles: Path) -> None:
    # A FIFO with no writer would block a plain open(); /dev/zero would never end.
    for name, what in _not_files(profiles).items():
        assert error_of(profiles / f"{name}.yaml") == (
            f"profiles/{name}.yaml: profile: is {what}, expected a YAML file")


def test_extends_pointing_at_a_bad_file_names_that_file(profiles: Path) -> None:
    bad = {**_not_files(profiles), "huge": "", "latin1": ""}
    (profiles / "huge.yaml").write_text("name: huge\n#" + "-" * 300_000 + "\n")
    (profiles / "latin1.yaml").write_bytes(b"name: latin1\ndescription: \xff\n")
    expected = {
        "dir": "profiles/dir.yaml: profile: is a directory, expected a YAML file",
        "fifo": "profiles/fifo.yaml: profile: is a FIFO, expected a YAML file",
        "zero": "profiles/zero.yaml: profile: is a character device, expected a YAML file",
        "huge": "profiles/huge.yaml: profile: larger than 256 KiB; not a profile",
        "latin1": "profiles/latin1.yaml:2: yaml: not UTF-8 text (byte 0xff)",
    }
    for parent in bad:
        write(profiles, "kid", f"name: kid\nextends: {parent}\n")
        assert error_of(profiles / "kid.yaml") == expected[parent]


def test_a_few_anchors_and_aliases_still_work(profiles: Path) -> None:
    write(profiles, "a", """\
        name: a
        elements: &els [debian-minimal, vm]
        packages: {add: *els}
        """)
    p = load(profiles / "a.yaml")
    assert p.elements == ("debian-minimal", "vm") and p.packages == ("debian-minimal", "vm")


_BOMB_CHILD = """\
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
from builder.profile import ProfileError, load
try:
    load(sys.argv[1])
except ProfileError as e:
    print(e)
"""


@pytest.mark.parametrize(("levels", "via_extends"), [(9, False), (12, False), (9, True)])
def test_alias_bomb_is_refused_in_bounded_memory_and_time(
        profiles: Path, levels: int, via_extends: bool) -> None:
    """A "billion laughs" document, loaded directly or as a parent: refused after a bounded
    amount of work. Only ever loaded in a child with a 512 MiB address-space limit and a
    timeout, so a regression fails fast (MemoryError or a kill) instead of eating the
    machine."""
    import subprocess
    import sys

    (profiles / "x.yaml").write_text(laughs(levels))
    target = profiles / "x.yaml"
    if via_extends:
        target = write(profiles, "kid", "name: kid\nextends: x\n")
    proc = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(target)],
                          capture_output=True, text=True, timeout=60, cwd=profiles.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == (
        "profiles/x.yaml:7: yaml: more than 20000 values once aliases are expanded\n")
