"""The corehost.hvagent Ansible collection under the real ansible-core: built with
`ansible-galaxy collection build`, installed offline from the tarball, against two real
agents over HTTPS on loopback (each CA pinned by its fingerprint, tokens from the real
`hvagent token` command) named in a fleet hosts file. One tiny guest boots in the whole
module: the `web` VM the playbooks create, grow, checkpoint and finally remove."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tinyguest
import yaml
from ansible_env import COLLECTION_SRC, AnsibleEnv, Played
from secure_agent import SecureAgent, free_port

pytestmark = pytest.mark.integration

WEB = "web"


def load_agent_utils() -> ModuleType:
    """The collection's client module itself (it imports only the standard library and
    PyYAML), for the hosts-file rules that need no Ansible run."""
    path = COLLECTION_SRC / "plugins" / "module_utils" / "agent.py"
    spec = importlib.util.spec_from_file_location("hvagent_collection_agent", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Fleet:
    alpha: SecureAgent
    beta: SecureAgent
    ansible: AnsibleEnv
    hvctl_dir: Path
    guest: tinyguest.TinyGuest
    tokens: dict[str, str]

    def vm(self, name: str = WEB) -> dict[str, Any]:
        r = self.alpha.root_client.get(f"/vms/{name}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def web_task(self, **over: Any) -> dict[str, Any]:
        """The playbook task that defines `web` on alpha (the hosts file's default)."""
        args = {"name": WEB, "state": "running", "vcpus": 1, "max_vcpus": 2,
                "memory_mib": 256, "max_memory_mib": 640,
                "kernel": str(self.guest.kernel), "initrd": str(self.guest.initrd),
                "append": self.guest.append(memory_hotplug=True), **over}
        return {"name": "web", "corehost.hvagent.vm": args}

    def guest_memkb(self, at_least: int | None = None, timeout: float = 120) -> int:
        """The guest's own memory report (its newest state line), once it is
        >= `at_least` kB when given."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            r = self.alpha.root_client.get(f"/vms/{WEB}/console", params={"lines": 100000})
            states = tinyguest.parse_states(r.json()["text"]) if r.status_code == 200 else []
            if states:
                last = int(states[-1]["memkb"])
                if at_least is None or last >= at_least:
                    return last
            time.sleep(0.3)
        raise AssertionError(f"guest reported memkb={last}, never >= {at_least}")


def _stop_all(agent: SecureAgent) -> None:
    try:
        for vm in agent.root_client.get("/vms").json():
            if vm["state"] in ("running", "paused", "unresponsive"):
                agent.root_client.post(f"/vms/{vm['name']}/stop", json={"force": True})
    except Exception:  # noqa: BLE001 - teardown of an agent that may be gone already
        pass


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_guest: tinyguest.TinyGuest
          ) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("ansible")
    for n in ("alpha", "beta"):
        (root / n).mkdir()
    # Each agent's policy names the tiny guest's directory as its image library.
    agents = {n: SecureAgent(root / n) for n in ("alpha", "beta")}
    for a in agents.values():
        a.start()
    try:
        tokens = {n: a.token("ops", "Administrator")["token"] for n, a in agents.items()}
        hvctl_dir = root / "hvctl"
        hvctl_dir.mkdir()
        (hvctl_dir / "beta.token").write_text(tokens["beta"] + "\n")
        (hvctl_dir / "hosts.yaml").write_text(yaml.safe_dump({"default": "alpha", "hosts": [
            {"name": "alpha", "url": agents["alpha"].url,
             "ca_fingerprint": agents["alpha"].fingerprint(), "token": tokens["alpha"]},
            # the other spelling of a fingerprint, and the token in a file beside
            {"name": "beta", "url": agents["beta"].url,
             "ca_fingerprint": "SHA256:" + agents["beta"].fingerprint().replace(":", "").lower(),
             "token_file": "beta.token"},
        ]}))
        # VMs that exist before any playbook: the same name on both agents, one only on beta.
        for a in agents.values():
            r = a.root_client.post("/vms", json={"name": "shared", "memory_mib": 128})
            assert r.status_code == 201, r.text
        r = agents["beta"].root_client.post("/vms", json={
            "name": "solo", "vcpus": 2, "memory_mib": 192, "disks": [{"size": "16M"}],
            "nics": [{"network": "user", "mac": "52:54:00:aa:bb:cc"}]})
        assert r.status_code == 201, r.text
        env = AnsibleEnv(root / "ansible", hvctl_dir)
        env.install_collection()
        yield Fleet(agents["alpha"], agents["beta"], env, hvctl_dir, tiny_guest, tokens)
    finally:
        for a in agents.values():
            _stop_all(a)
            a.stop()


def changed(p: Played) -> list[bool]:
    return [bool(r and r.get("changed")) for r in p.results]


def ok(p: Played) -> Played:
    assert p.rc == 0 and p.recap.get("failed") == 0, f"{p.stdout}\n{p.stderr}"
    return p


# docs


def test_every_plugin_has_valid_docs(fleet: Fleet) -> None:
    for kind, name in (("module", "vm"), ("module", "checkpoint"), ("module", "policy"),
                       ("inventory", "hvagent")):
        r = fleet.ansible.run("ansible-doc", "-t", kind, "--json", f"corehost.hvagent.{name}")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)[f"corehost.hvagent.{name}"]["doc"]
        assert doc["options"], name
        if kind == "module":  # the connection fragment reached every module
            assert {"host", "url", "ca_fingerprint", "token", "socket"} <= set(doc["options"])


# inventory


def plain(value: Any) -> Any:
    """A value of `ansible-inventory --list`, without the wrapper it puts around strings
    that are never templated (everything the agents report is such data)."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _inventory(fleet: Fleet, name: str, config: dict[str, Any],
               unparsed_fails: bool = False) -> Any:
    """`ansible-inventory --list` of a plugin config. ansible-inventory turns a source
    that fails to parse into a warning (exit 0) unless told that it is a failure."""
    path = fleet.ansible.root / name
    path.write_text(yaml.safe_dump({"plugin": "corehost.hvagent.hvagent", **config}))
    env = {"ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": str(unparsed_fails)}
    return fleet.ansible.run("ansible-inventory", "-i", str(path), "--list", env=env)


def test_inventory_lists_every_vm_of_both_agents(fleet: Fleet) -> None:
    r = _inventory(fleet, "fleet.hvagent.yml", {
        "keyed_groups": [{"key": "hvagent_vcpus | string", "prefix": "vcpus"}],
        "compose": {"big": "hvagent_memory_mib >= 192"}})
    assert r.returncode == 0, r.stderr
    inv = plain(json.loads(r.stdout))
    hostvars = inv["_meta"]["hostvars"]
    # The same name on two agents: both prefixed with their agent; a unique one is not.
    assert {"alpha_shared", "beta_shared", "solo"} <= set(hostvars), r.stderr
    assert "shared" not in hostvars
    solo = hostvars["solo"]
    assert solo["hvagent_host"] == "beta" and solo["hvagent_state"] == "defined"
    assert solo["hvagent_vcpus"] == 2 and solo["hvagent_memory_mib"] == 192
    assert solo["hvagent_nics"] == [{"mac": "52:54:00:aa:bb:cc", "network": "user",
                                     "vlan": None, "addresses": []}]
    (disk,) = solo["hvagent_disks"]
    assert disk["format"] == "qcow2" and disk["path"].endswith(".qcow2")
    assert solo["big"] is True and hostvars["alpha_shared"]["big"] is False
    assert hostvars["alpha_shared"]["hvagent_host"] == "alpha"

    def members(group: str) -> set[str]:
        return set(inv.get(group, {}).get("hosts", []))

    assert {"alpha_shared"} <= members("hvagent_alpha") and "solo" not in members("hvagent_alpha")
    assert {"beta_shared", "solo"} <= members("hvagent_beta")
    assert {"alpha_shared", "beta_shared", "solo"} <= members("hvagent_state_defined")
    assert members("vcpus_2") == {"solo"}

    # `hosts:` picks agents: beta alone, so its `shared` is no longer a duplicate.
    r = _inventory(fleet, "beta.hvagent.yaml", {"hosts": ["beta"]})
    assert r.returncode == 0, r.stderr
    assert {"shared", "solo"} <= set(json.loads(r.stdout)["_meta"]["hostvars"])
    r = _inventory(fleet, "nope.hvagent.yml", {"hosts": ["beta", "nope"]}, unparsed_fails=True)
    assert r.returncode != 0 and "hosts: nope: not in " in r.stderr, r.stderr


def test_inventory_unreachable_agent_is_a_warning_or_strict_error(fleet: Fleet) -> None:
    hosts = yaml.safe_load((fleet.hvctl_dir / "hosts.yaml").read_text())
    hosts["hosts"].append({"name": "gone", "url": f"https://127.0.0.1:{free_port()}",
                           "ca_fingerprint": fleet.alpha.fingerprint()})
    f = fleet.hvctl_dir / "with-gone.yaml"  # beside beta.token, which it names
    f.write_text(yaml.safe_dump(hosts))
    r = _inventory(fleet, "gone.hvagent.yml", {"hosts_file": str(f)})
    assert r.returncode == 0, r.stderr
    assert "gone: cannot reach the agent at https://127.0.0.1" in r.stderr
    assert {"alpha_shared", "solo"} <= set(json.loads(r.stdout)["_meta"]["hostvars"])
    r = _inventory(fleet, "strict.hvagent.yml", {"hosts_file": str(f)}, unparsed_fails=True)
    assert r.returncode == 0, r.stderr  # not strict: still parsed
    r = _inventory(fleet, "strict.hvagent.yml", {"hosts_file": str(f), "strict": True},
                   unparsed_fails=True)
    assert r.returncode != 0 and "gone: cannot reach the agent" in r.stderr, r.stderr


def test_inventory_refuses_a_bad_hosts_file_in_one_line(fleet: Fleet) -> None:
    f = fleet.ansible.root / "bad-hosts.yaml"
    f.write_text(yaml.safe_dump({"hosts": [{"name": "a", "url": "http://127.0.0.1:1",
                                            "ca_fingerprint": fleet.alpha.fingerprint()}]}))
    r = _inventory(fleet, "bad.hvagent.yml", {"hosts_file": str(f)})
    assert r.returncode == 0  # a warning (see _inventory), never a traceback
    assert f"{f}: hosts[0].url: 'http://127.0.0.1:1': the agent's TCP listener speaks " \
           "only https://" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _inventory(fleet, "bad.hvagent.yml", {"hosts_file": str(f)}, unparsed_fails=True)
    assert r.returncode != 0 and "hosts[0].url: " in r.stderr, r.stderr


GOOD_FP = "AB:" * 31 + "AB"


@pytest.mark.parametrize(("content", "error"), [
    ("hosts: [{name: a, url: 'https://h:1', ca_fingerprint: @FP@, colour: red}]",
     "hosts[0].colour: unknown key"),
    ("hosts: [{url: 'https://h:1', ca_fingerprint: @FP@}]", "hosts[0].name: missing"),
    ("hosts: [{name: -a, socket: /s}]", "hosts[0].name: '-a' is not a host name"),
    ("hosts: [{name: a, socket: /s}, {name: a, socket: /t}]",
     "hosts[1].name: 'a' is already the name of another host"),
    ("hosts: [{name: a, socket: /s, url: 'https://h:1'}]", "hosts[0].url: give url or socket"),
    ("hosts: [{name: a}]", "hosts[0].url: missing (give url or socket)"),
    ("hosts: [{name: a, url: 'http://h:1', ca_fingerprint: @FP@}]",
     "hosts[0].url: 'http://h:1': the agent's TCP listener speaks only https://"),
    ("hosts: [{name: a, url: 'https://h:99999', ca_fingerprint: @FP@}]",
     "hosts[0].url: 'https://h:99999' is not a URL"),
    ("hosts: [{name: a, url: 'https://h:1'}]", "hosts[0].ca_fingerprint: missing"),
    ("hosts: [{name: a, url: 'https://h:1', ca_fingerprint: 'AB:CD'}]",
     "hosts[0].ca_fingerprint: 'AB:CD' is not a sha256 fingerprint"),
    ("hosts: [{name: a, socket: /s, token: x, token_file: t}]",
     "hosts[0].token: give token or token_file, not both"),
    ("hosts: [{name: a, socket: /s, token_file: missing.token}]",
     "hosts[0].token_file: "),
    ("hosts: [{name: a, socket: /s}]\ndefault: b", "default: 'b' is not the name of a host"),
    ("hosts: {name: a}", "hosts: must be a list"),
    ("hosts: [a]", "hosts[0]: must be a mapping"),
    ("hostz: []", "hostz: unknown key"),
    ("default: a", "hosts: missing"),
    ("", "hosts: missing"),
    ("hosts: [{name: a, url: 'https://h:1', ca_fingerprint: 1234}]",
     "hosts[0].ca_fingerprint: must be a string (quote it)"),
    ("hosts: [{name: a, socket: /s, token: 'hvt_a b'}]", "hosts[0].token: must be one token"),
    ("hosts: [{name: a, socket: ''}]", "hosts[0].socket: empty"),
    ("hosts: [{name: a, url: 'https://h:1/api', ca_fingerprint: @FP@}]",
     "hosts[0].url: 'https://h:1/api': only https://HOST[:PORT]"),
    ("hosts: [", "not valid YAML"),
])
def test_hosts_file_errors_name_the_file_and_field(tmp_path: Path, content: str,
                                                   error: str) -> None:
    agent = load_agent_utils()
    f = tmp_path / "hosts.yaml"
    f.write_text(content.replace("@FP@", GOOD_FP))
    with pytest.raises(agent.AgentError) as e:
        agent.load_hosts(str(f))
    assert e.value.message.startswith(f"{f}: ") and error in e.value.message, e.value.message
    assert "\n" not in e.value.message


def test_hosts_file_accepts_every_fingerprint_spelling(tmp_path: Path) -> None:
    agent = load_agent_utils()
    (tmp_path / "t").write_text("hvt_abc\n")
    f = tmp_path / "hosts.yaml"
    spellings = [GOOD_FP, GOOD_FP.replace(":", ""), "SHA256:" + GOOD_FP.lower()]
    f.write_text(yaml.safe_dump({"hosts": [
        {"name": f"h{i}", "url": "https://10.0.0.5:8443", "ca_fingerprint": fp,
         "token_file": "t"} for i, fp in enumerate(spellings)] + [
        {"name": "local", "socket": "/run/hvagent/hvagent.sock"}]}))
    fleet = agent.load_hosts(str(f))
    assert {t.ca_fingerprint for t in fleet.hosts[:3]} == {GOOD_FP}
    assert fleet.hosts[0].token == "hvt_abc" and fleet.get("local").token is None


# the vm module


def test_playbook_creates_and_starts_a_vm_then_changes_nothing(fleet: Fleet) -> None:
    first = ok(fleet.ansible.play([fleet.web_task()]))
    assert changed(first) == [True] and first.recap["changed"] == 1
    assert first[0]["changes"] == [f"create {WEB}", f"start {WEB}"]
    vm = fleet.vm()
    assert vm["state"] == "running" and vm["spec"]["memory_mib"] == 256
    boot = fleet.guest_memkb()  # the guest is up and reports its memory
    assert boot > 0
    again = ok(fleet.ansible.play([fleet.web_task()]))
    assert again.recap["changed"] == 0 and changed(again) == [False]
    # Only on alpha: beta has no such VM.
    assert fleet.beta.root_client.get(f"/vms/{WEB}").status_code == 404


def test_check_mode_reports_changes_and_changes_nothing(fleet: Fleet) -> None:
    before = fleet.vm()
    p = ok(fleet.ansible.play([fleet.web_task(memory_mib=384),
                               fleet.web_task(state="stopped"),
                               fleet.web_task(state="absent"),
                               fleet.web_task(name="ghost")], "--check", "--diff"))
    assert changed(p) == [True, True, True, True]
    assert p[0]["diff"] == {"before": {"state": "running", "memory_mib": 256, "vcpus": 1},
                            "after": {"state": "running", "memory_mib": 384, "vcpus": 1}}
    assert p[0]["changes"] == ["hot-add memory_mib 256 -> 384"]
    assert p[1]["diff"]["after"]["state"] == "stopped"
    assert p[2]["diff"]["after"] == {"state": "absent"}
    assert p[3]["changes"] == ["create ghost", "start ghost"]
    assert p[3]["diff"] == {"before": {"state": "absent"},
                            "after": {"state": "running", "memory_mib": 256, "vcpus": 1}}
    assert fleet.alpha.root_client.get("/vms/ghost").status_code == 404
    after = fleet.vm()
    assert after["state"] == "running" and after["spec"] == before["spec"]
    assert after["pid"] == before["pid"]


def test_raising_memory_hot_adds_it_and_the_guest_sees_it(fleet: Fleet) -> None:
    boot = fleet.guest_memkb()
    p = ok(fleet.ansible.play([fleet.web_task(memory_mib=384, vcpus=2)], "--diff"))
    assert changed(p) == [True]
    assert p[0]["changes"] == ["hot-add memory_mib 256 -> 384", "hot-add vcpus 1 -> 2"]
    assert p[0]["diff"]["after"] == {"state": "running", "memory_mib": 384, "vcpus": 2}
    vm = fleet.vm()
    assert vm["spec"]["dimms"] == [{"slot": 0, "size_mib": 128}] and vm["state"] == "running"
    # The guest's own report: 128 MiB more (less a little the kernel keeps).
    fleet.guest_memkb(at_least=boot + 128 * 1024 - 1024)
    assert ok(fleet.ansible.play([fleet.web_task(memory_mib=384, vcpus=2)])).recap["changed"] == 0
    # Below the boot memory a running VM cannot go: the agent's one line, nothing changed.
    p = fleet.ansible.play([{**fleet.web_task(memory_mib=128, vcpus=2), "ignore_errors": True}])
    assert p[0]["failed"] and "shrinks only by whole hot-added DIMMs" in p[0]["msg"], p[0]
    assert "\n" not in p[0]["msg"]
    assert fleet.vm()["spec"]["memory_mib"] == 384


def test_vm_module_connection_errors_are_one_line(fleet: Fleet) -> None:
    other_fp = fleet.beta.fingerprint()
    base = {"name": WEB, "state": "present"}
    tasks = [
        {"corehost.hvagent.vm": {**base, "host": "nowhere"}},
        {"corehost.hvagent.vm": {**base, "url": fleet.alpha.url, "ca_fingerprint": other_fp,
                                 "token": fleet.tokens["alpha"]}},
        {"corehost.hvagent.vm": {**base, "url": fleet.alpha.url.replace("https", "http"),
                                 "ca_fingerprint": other_fp}},
        {"corehost.hvagent.vm": {**base, "url": fleet.alpha.url,
                                 "ca_fingerprint": fleet.alpha.fingerprint()}},  # no token
        # explicit url, pin and token work without the hosts file
        {"corehost.hvagent.vm": {**base, "url": fleet.alpha.url,
                                 "ca_fingerprint": fleet.alpha.fingerprint(),
                                 "token": fleet.tokens["alpha"],
                                 "hosts_file": "/nonexistent/hosts.yaml"}},
        # the local unix socket, as root (no token)
        {"corehost.hvagent.vm": {**base, "socket": str(fleet.alpha.socket)}},
    ]
    p = fleet.ansible.play([{**t, "ignore_errors": True} for t in tasks])
    msgs = [str(r["msg"]) if r and r.get("failed") else "" for r in p.results]
    assert "no host named 'nowhere' (hosts: alpha, beta)" in msgs[0]
    assert f"CA fingerprint is {fleet.alpha.fingerprint()}, not the pinned {other_fp}" \
        in msgs[1]
    assert msgs[2].startswith("url: ") and "speaks only https://" in msgs[2]
    assert "(HTTP 401)" in msgs[3]
    assert msgs[4] == "" and msgs[5] == "", msgs
    assert all("\n" not in m for m in msgs)
    assert not any(changed(p))


def test_vm_module_bad_specs_fail_with_the_agents_line(fleet: Fleet) -> None:
    cases = [({"name": "no/such"}, "is not a valid name"),
             ({"name": "tiny", "memory_mib": 1}, "memory_mib: "),
             ({"name": "tiny", "vcpus": 2, "max_vcpus": 1}, "vcpus (2) is above max_vcpus (1)"),
             ({"name": "tiny", "disks": [{"path": "/x.qcow2", "size": "1G"}]},
              "give exactly one of path (existing image) or size (new disk)"),
             ({"name": "tiny", "kernel": "/etc/passwd"}, "kernel: ")]
    p = fleet.ansible.play([{"corehost.hvagent.vm": args, "ignore_errors": True}
                            for args, _ in cases])
    for (args, error), r in zip(cases, p.results, strict=True):
        assert r and r["failed"] and error in r["msg"], (args, r)
        assert re.search(r"\(HTTP 4\d\d\)$", r["msg"]) and "\n" not in r["msg"], r["msg"]
    names = {vm["name"] for vm in fleet.alpha.root_client.get("/vms").json()}
    assert "tiny" not in names


# the checkpoint module


def test_checkpoints_present_reverted_absent_are_idempotent(fleet: Fleet) -> None:
    def cp(name: str, state: str) -> dict[str, Any]:
        return {"corehost.hvagent.checkpoint": {"vm": WEB, "name": name, "state": state}}

    p = ok(fleet.ansible.play([cp("one", "present"), cp("one", "present"),
                               cp("two", "present")], "--diff"))
    assert changed(p) == [True, False, True]
    assert p[0]["diff"] == {"before": {"exists": False, "current": False},
                            "after": {"exists": True, "current": True}}
    assert p[0]["job"]["status"] == "succeeded"
    cps = {c["name"]: c for c in fleet.alpha.root_client.get(f"/vms/{WEB}/checkpoints").json()}
    assert set(cps) == {"one", "two"} and cps["two"]["current"]

    # check mode: would revert, reverts nothing
    p = ok(fleet.ansible.play([cp("one", "reverted")], "--check"))
    assert changed(p) == [True]
    cps = {c["name"]: c for c in fleet.alpha.root_client.get(f"/vms/{WEB}/checkpoints").json()}
    assert cps["two"]["current"] and not cps["one"]["current"]

    p = ok(fleet.ansible.play([cp("one", "reverted"), cp("one", "reverted"),
                               cp("two", "absent"), cp("two", "absent")]))
    assert changed(p) == [True, False, True, False]
    cps = {c["name"]: c for c in fleet.alpha.root_client.get(f"/vms/{WEB}/checkpoints").json()}
    assert set(cps) == {"one"} and cps["one"]["current"]
    assert fleet.vm()["state"] == "running"

    p = fleet.ansible.play([{**cp("never", "reverted"), "ignore_errors": True}])
    assert p[0]["failed"] and p[0]["msg"] == f"name: {WEB} has no checkpoint named 'never' " \
                                             "to revert to"


# the policy module


def _policy(fleet: Fleet) -> dict[str, Any]:
    r = fleet.alpha.root_client.get("/policy")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_policy_push_is_applied_once_and_a_bad_one_fails_in_one_line(fleet: Fleet) -> None:
    text = yaml.safe_dump({"library": tinyguest.library(),
                           "quotas": {"max_vcpus_per_vm": 8}})
    src = fleet.ansible.root / "policy.yaml"
    src.write_text(text)
    push = {"corehost.hvagent.policy": {"src": str(src)}}

    p = ok(fleet.ansible.play([push], "--check", "--diff"))
    assert changed(p) == [True] and p[0]["diff"]["after"] == text
    assert _policy(fleet)["text"] != text  # check mode pushed nothing

    p = ok(fleet.ansible.play([push], "--diff"))
    assert changed(p) == [True] and p[0]["diff"]["after"] == text
    got = _policy(fleet)
    assert got["text"] == text and p[0]["sha256"] == got["sha256"]
    assert ok(fleet.ansible.play([push])).recap["changed"] == 0

    # Bad policies: the agent's one line naming the field, and the policy stays.
    bad = {"quotas:\n  max_vcpus_per_vm: 0\n": "quotas.max_vcpus_per_vm",
           "colour: red\n": "colour",
           "roles:\n  ops: {privileges: [VM.Fly]}\n": "VM.Fly",
           "quotas: [\n": "YAML"}
    p = fleet.ansible.play([{"corehost.hvagent.policy": {"content": c}, "ignore_errors": True}
                            for c in bad])
    for (content, field), r in zip(bad.items(), p.results, strict=True):
        assert r and r["failed"], (content, r)
        assert field in r["msg"] and re.search(r"\(HTTP 4\d\d\)$", r["msg"]), r["msg"]
        assert "\n" not in r["msg"]
    missing = fleet.ansible.root / "no-such-policy.yaml"
    p = fleet.ansible.play([{"corehost.hvagent.policy": {"src": str(missing)},
                             "ignore_errors": True}])
    assert p[0]["failed"] and p[0]["msg"] == f"src: {missing}: unreadable: No such file or " \
                                             "directory"
    assert _policy(fleet)["text"] == text


# last: the VM stops, then goes


def test_stopped_powers_off_then_resizes_cold(fleet: Fleet) -> None:
    task = fleet.web_task(state="stopped", memory_mib=512, vcpus=1)
    p = ok(fleet.ansible.play([task, task], "--diff"))
    assert changed(p) == [True, False]
    assert p[0]["changes"] == [f"stop {WEB}", "set memory_mib 384 -> 512", "set vcpus 2 -> 1"]
    assert p[0]["diff"]["after"] == {"state": "stopped", "memory_mib": 512, "vcpus": 1}
    vm = fleet.vm()
    assert vm["state"] == "stopped" and vm["pid"] is None
    assert (vm["spec"]["memory_mib"], vm["spec"]["vcpus"]) == (512, 1)
    # by ACPI: the guest saw the power button
    console = fleet.alpha.root_client.get(f"/vms/{WEB}/console", params={"lines": 100000})
    assert tinyguest.POWEROFF_MARKER in console.json()["text"]


def test_absent_removes_the_vm_once(fleet: Fleet) -> None:
    p = ok(fleet.ansible.play([fleet.web_task(state="absent"),
                               fleet.web_task(state="absent")]))
    assert changed(p) == [True, False]
    assert p[0]["changes"] == [f"delete {WEB}"]
    assert fleet.alpha.root_client.get(f"/vms/{WEB}").status_code == 404
