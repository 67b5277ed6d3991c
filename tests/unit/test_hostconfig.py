"""The host config document: every family of bad input is one line naming the source and
the field; loading files; composing documents (for_ssh_key, merge, dump)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hvagent.errors import InvalidRequest
from hvagent.host.hostconfig import (
    MAX_BYTES,
    HostConfig,
    HostConfigError,
    dump,
    for_ssh_key,
    load_file,
    load_text,
    merge,
)

SRC = "corehost.yaml"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Real public keys of several types, made by ssh-keygen."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for kind, extra in (("ed25519", []), ("ecdsa", ["-b", "384"]), ("rsa", ["-b", "2048"])):
        path = d / kind
        subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C",
                        f"{kind}@example.org", "-f", str(path)], check=True, timeout=60)
        out[kind] = (d / f"{kind}.pub").read_text().strip()
    return out


def error(text: str) -> str:
    with pytest.raises(HostConfigError) as e:
        load_text(text, SRC)
    message = e.value.message
    assert "\n" not in message and message.startswith(f"{SRC}: ")
    assert "Traceback" not in message
    return message


def test_full_document_loads(keys: dict[str, str]) -> None:
    text = f"""\
version: 1
hostname: kvm-07.example.org
users:
  - name: root
    ssh_authorized_keys: ["{keys['ed25519']}", "{keys['rsa']}"]
  - {{name: ops, groups: [adm], shell: /bin/sh, ssh_authorized_keys: ["{keys['ecdsa']}"]}}
network:
  - match: {{name: "en*"}}
    dhcp: true
  - match: {{mac: "52:54:00:AB:cd:56"}}
    addresses: ["10.0.2.15/24", "fd00::15/64"]
    gateway: 10.0.2.2
    dns: [10.0.2.3, "fd00::3"]
  - match: {{name: eth1}}
    addresses: ["2001:db8::7/64"]
    gateway: "fe80::1"
time: {{servers: [ntp.example.org, 192.0.2.1, "2001:db8::123"]}}
agent: {{tls_listen: "[::]:8443", bootstrap_token_sha256: "{'ab' * 32}"}}
"""
    c = load_text(text, SRC)
    assert c.hostname == "kvm-07.example.org"
    assert [u.name for u in c.users] == ["root", "ops"]
    assert c.users[0].ssh_authorized_keys == [keys["ed25519"], keys["rsa"]]
    assert c.users[0].shell == "/bin/bash" and c.users[1].groups == ["adm"]
    assert c.network[1].match.mac == "52:54:00:ab:cd:56"  # normalized
    assert c.network[0].dhcp and not c.network[1].dhcp
    assert c.time is not None and len(c.time.servers) == 3
    assert c.agent is not None and c.agent.bootstrap_token_sha256 == "ab" * 32


def test_minimal_document() -> None:
    c = load_text("version: 1\n", SRC)
    assert c == HostConfig(version=1)
    assert (c.hostname, c.users, c.network, c.time, c.agent) == (None, [], [], None, None)


def test_error_is_an_invalid_request() -> None:
    assert issubclass(HostConfigError, InvalidRequest)


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAbc me@x"  # the blob's prefix is right

BAD = [
    # the document as a whole
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("- version: 1\n", "the top level is a list"),
    ("just a string\n", "the top level is a string"),
    ("42\n", "the top level is a number"),
    ("hostname: kvm\n", "version: missing (required)"),
    ("version: 2\n", "version: must be 1"),
    ("version: '1'\n", "version: must be 1"),
    ("version: true\n", "version: must be 1"),
    ("version: 1\nextra: 1\n", "extra: unknown key"),
    ("version: 1\nHostname: a\n", "Hostname: unknown key"),
    # YAML syntax, with the line
    ("version: 1\nusers: [\n", "line 3"),
    ("version: 1\nhostname: a\n  bad: x\n", "line 3, column 6: not valid YAML"),
    ("version: 1\nhostname: 'a\n", "line 3, column 1: not valid YAML"),
    ("version: 1\nversion: 1\n", "line 2, column 1: not valid YAML: duplicate key 'version'"),
    ("version: 1\nx: &a [1]\ny: *a\n", "line 3, column 4: not valid YAML: aliases"),
    ("version: 1\n\x00\x01\x02", "not text: character #x0000"),
    ("version: 1\nhostname: \x07\n", "not text: character #x0007"),
    # hostname
    ("version: 1\nhostname: 7\n", "hostname: expected a string"),
    ("version: 1\nhostname: [a]\n", "hostname: expected a string"),
    ("version: 1\nhostname: ''\n", "hostname: empty"),
    ("version: 1\nhostname: KVM-07\n", "hostname: 'KVM-07' is not a host name"),
    ("version: 1\nhostname: kvm_07\n", "hostname: 'kvm_07' is not a host name"),
    ("version: 1\nhostname: -kvm\n", "hostname: '-kvm' is not a host name"),
    ("version: 1\nhostname: kvm-\n", "hostname: 'kvm-' is not a host name"),
    ("version: 1\nhostname: a..b\n", "hostname: 'a..b': an empty label"),
    ("version: 1\nhostname: a.b.\n", "hostname: 'a.b.': an empty label"),
    ("version: 1\nhostname: kvm 07\n", "hostname: 'kvm 07' is not a host name"),
    (f"version: 1\nhostname: {'a' * 64}\n", f"hostname: '{'a' * 64}': the label"),
    (f"version: 1\nhostname: {'.'.join(['a' * 60] * 5)}\n",
     "hostname: 304 characters; a host name has at most 253"),
    ("version: 1\nhostname: kvm-ö\n", "hostname: 'kvm-ö' is not a host name"),
    # users
    ("version: 1\nusers: root\n", "users: expected a list"),
    ("version: 1\nusers: {name: root}\n", "users: expected a list"),
    ("version: 1\nusers: [root]\n", "users[0]: expected a mapping"),
    ("version: 1\nusers: [{}]\n", "users[0].name: missing (required)"),
    ("version: 1\nusers: [{name: root, nmae: x}]\n", "users[0].nmae: unknown key"),
    ("version: 1\nusers: [{name: Root}]\n", "users[0].name: 'Root' is not a user name"),
    ("version: 1\nusers: [{name: 1abc}]\n", "users[0].name: '1abc' is not a user name"),
    ("version: 1\nusers: [{name: a.b}]\n", "users[0].name: 'a.b' is not a user name"),
    (f"version: 1\nusers: [{{name: {'a' * 33}}}]\n", "users[0].name: "),
    ("version: 1\nusers: [{name: 5}]\n", "users[0].name: expected a string"),
    ("version: 1\nusers: [{name: a}, {name: a}]\n", "users[1]: the user 'a' is listed twice"),
    ("version: 1\nusers: [{name: a, groups: adm}]\n", "users[0].groups: expected a list"),
    ("version: 1\nusers: [{name: a, groups: [ADM]}]\n",
     "users[0].groups[0]: 'ADM' is not a group name"),
    ("version: 1\nusers: [{name: a, groups: [1]}]\n", "users[0].groups[0]: expected a string"),
    ("version: 1\nusers: [{name: a, shell: bash}]\n",
     "users[0].shell: 'bash' is not an absolute path"),
    ("version: 1\nusers: [{name: a, shell: '/bin/ba sh'}]\n", "users[0].shell: "),
    # ssh keys
    ("version: 1\nusers: [{name: a, ssh_authorized_keys: x}]\n",
     "users[0].ssh_authorized_keys: expected a list"),
    ("version: 1\nusers: [{name: a, ssh_authorized_keys: [1]}]\n",
     "users[0].ssh_authorized_keys[0]: expected a string"),
    (f"version: 1\nusers: [{{name: a, ssh_authorized_keys: ['{KEY}', 'hello']}}]\n",
     "users[0].ssh_authorized_keys[1]: not an ssh public key"),
    ("version: 1\nusers: [{name: a, ssh_authorized_keys: ['ssh-dss AAAAB3NzaC1kc3M= x']}]\n",
     "users[0].ssh_authorized_keys[0]: not an ssh public key"),
    ("version: 1\nusers: [{name: a, ssh_authorized_keys: ['ssh-ed25519 not*base64']}]\n",
     "users[0].ssh_authorized_keys[0]: not an ssh public key: the key body is not base64"),
    ("version: 1\nusers: [{name: a, ssh_authorized_keys: ['ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIAbc"
     " x']}]\n", "users[0].ssh_authorized_keys[0]: not an ssh public key: the key body is not"),
    ("version: 1\nusers: [{name: a, ssh_authorized_keys: ['ssh-ed25519']}]\n",
     "users[0].ssh_authorized_keys[0]: not an ssh public key"),
    (f"version: 1\nusers: [{{name: a, ssh_authorized_keys: [\"{KEY}\\n{KEY}\"]}}]\n",
     "users[0].ssh_authorized_keys[0]: not an ssh public key: one line"),
    (f"version: 1\nusers: [{{name: a, ssh_authorized_keys: ['command=\"x\" {KEY}']}}]\n",
     "users[0].ssh_authorized_keys[0]: not an ssh public key"),
    # network
    ("version: 1\nnetwork: {match: {name: e}}\n", "network: expected a list"),
    ("version: 1\nnetwork: [{dhcp: true}]\n", "network[0].match: missing (required)"),
    ("version: 1\nnetwork: [{match: {}, dhcp: true}]\n",
     "network[0].match: give exactly one of name or mac"),
    ("version: 1\nnetwork: [{match: {name: e, mac: '52:54:00:12:34:56'}, dhcp: true}]\n",
     "network[0].match: give exactly one of name or mac"),
    ("version: 1\nnetwork: [{match: {type: ether}, dhcp: true}]\n",
     "network[0].match.type: unknown key"),
    ("version: 1\nnetwork: [{match: {name: 'en* eth*'}, dhcp: true}]\n",
     "network[0].match.name: 'en* eth*' is not an interface name glob"),
    ("version: 1\nnetwork: [{match: {name: ''}, dhcp: true}]\n", "network[0].match.name: "),
    ("version: 1\nnetwork: [{match: {mac: '52:54:00:12:34'}, dhcp: true}]\n",
     "network[0].match.mac: '52:54:00:12:34' is not a MAC address"),
    ("version: 1\nnetwork: [{match: {mac: '52-54-00-12-34-56'}, dhcp: true}]\n",
     "network[0].match.mac: "),
    ("version: 1\nnetwork: [{match: {name: e}, dhcp: 'true'}]\n",
     "network[0].dhcp: expected true or false"),
    ("version: 1\nnetwork: [{match: {name: e}, dhcp: 1}]\n",
     "network[0].dhcp: expected true or false"),
    ("version: 1\nnetwork: [{match: {name: e}}]\n",
     "network[0]: give dhcp: true or static addresses"),
    ("version: 1\nnetwork: [{match: {name: e}, dhcp: false}]\n",
     "network[0]: give dhcp: true or static addresses"),
    ("version: 1\nnetwork: [{match: {name: e}, dhcp: true, addresses: [10.0.0.1/24]}]\n",
     "network[0]: dhcp: true takes no addresses"),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: 10.0.0.1/24}]\n",
     "network[0].addresses: expected a list"),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: [10.0.0.1]}]\n",
     "network[0].addresses[0]: '10.0.0.1' has no prefix length"),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: [10.0.0.1/24, 10.0.0.300/24]}]\n",
     "network[0].addresses[1]: '10.0.0.300/24' is not an address in CIDR form"),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: [10.0.0.1/33]}]\n",
     "network[0].addresses[0]: '10.0.0.1/33' is not an address in CIDR form"),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: [host/24]}]\n",
     "network[0].addresses[0]: "),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: ['fd00::1/129']}]\n",
     "network[0].addresses[0]: "),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: [10.0.0.5/24], gateway: 10.0.1.1}]\n",
     "network[0]: gateway 10.0.1.1 is not inside any of the addresses' networks"),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: [10.0.0.5/24], gateway: 'fd00::1'}]\n",
     "network[0]: gateway fd00::1 is not inside"),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: [10.0.0.5/24], gateway: gw}]\n",
     "network[0].gateway: 'gw' is not an IP address"),
    ("version: 1\nnetwork: [{match: {name: e}, dhcp: true, gateway: 10.0.0.1}]\n",
     "network[0]: dhcp: true takes no addresses or gateway"),
    ("version: 1\nnetwork: [{match: {name: e}, dhcp: true, dns: [dns.example.org]}]\n",
     "network[0].dns[0]: 'dns.example.org' is not an IP address"),
    ("version: 1\nnetwork: [{match: {name: e}, dhcp: true, dns: 10.0.0.1}]\n",
     "network[0].dns: expected a list"),
    # time
    ("version: 1\ntime: [ntp]\n", "time: expected a mapping"),
    ("version: 1\ntime: {}\n", "time.servers: missing (required)"),
    ("version: 1\ntime: {servers: []}\n", "time.servers: must not be empty"),
    ("version: 1\ntime: {servers: ntp.example.org}\n", "time.servers: expected a list"),
    ("version: 1\ntime: {servers: [ok.example.org, bad_name]}\n",
     "time.servers[1]: 'bad_name' is not a host name or IP address"),
    ("version: 1\ntime: {servers: [ntp], pool: x}\n", "time.pool: unknown key"),
    # agent
    ("version: 1\nagent: {tls_listen: '0.0.0.0:0'}\n",
     "agent.tls_listen: '0.0.0.0:0': the port 0 is not in 1..65535"),
    ("version: 1\nagent: {tls_listen: '0.0.0.0:65536'}\n",
     "agent.tls_listen: '0.0.0.0:65536': the port 65536 is not in 1..65535"),
    ("version: 1\nagent: {tls_listen: '0.0.0.0:https'}\n",
     "agent.tls_listen: '0.0.0.0:https': the port 'https' is not a number"),
    ("version: 1\nagent: {tls_listen: '0.0.0.0:-1'}\n", "agent.tls_listen: "),
    ("version: 1\nagent: {tls_listen: '0.0.0.0'}\n", "agent.tls_listen: '0.0.0.0': give HOST:PORT"),
    ("version: 1\nagent: {tls_listen: ':8443'}\n", "agent.tls_listen: ':8443': give HOST:PORT"),
    ("version: 1\nagent: {tls_listen: '::1:8443'}\n", "agent.tls_listen: '::1:8443': give"),
    ("version: 1\nagent: {tls_listen: '[nope]:8443'}\n",
     "agent.tls_listen: '[nope]:8443': 'nope' is not an IPv6 address"),
    ("version: 1\nagent: {tls_listen: 'bad_host:8443'}\n", "agent.tls_listen: "),
    ("version: 1\nagent: {tls_listen: 8443}\n", "agent.tls_listen: expected a string"),
    ("version: 1\nagent: {bootstrap_token: short}\n",
     "agent.bootstrap_token: 5 characters; a token has at least 32"),
    (f"version: 1\nagent: {{bootstrap_token: '{'a' * 20} {'b' * 20}'}}\n",
     "agent.bootstrap_token: a token is printable ASCII without blanks"),
    ("version: 1\nagent: {bootstrap_token: 12345678901234567890123456789012345}\n",
     "agent.bootstrap_token: expected a string"),
    (f"version: 1\nagent: {{bootstrap_token_sha256: '{'A' * 64}'}}\n",
     "agent.bootstrap_token_sha256: not a sha256"),
    (f"version: 1\nagent: {{bootstrap_token_sha256: '{'a' * 63}'}}\n",
     "agent.bootstrap_token_sha256: not a sha256"),
    (f"version: 1\nagent: {{bootstrap_token: '{'t' * 40}', bootstrap_token_sha256: "
     f"'{'a' * 64}'}}\n", "agent: give bootstrap_token or bootstrap_token_sha256, not both"),
    ("version: 1\nagent: {token: x}\n", "agent.token: unknown key"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_one_line_naming_the_field(text: str, expected: str) -> None:
    message = error(text)
    assert message.startswith(f"{SRC}: {expected}"), message


def test_a_token_never_appears_in_an_error() -> None:
    secret = "s3cr3t-" * 3
    message = error(f"version: 1\nagent: {{bootstrap_token: '{secret}'}}\n")
    assert secret not in message and "agent.bootstrap_token" in message


def test_accepted_forms() -> None:
    ok = load_text("version: 1\nagent: {tls_listen: 'kvm-07.example.org:1'}\n", SRC)
    assert ok.agent is not None and ok.agent.tls_listen == "kvm-07.example.org:1"
    ok = load_text("version: 1\nagent: {tls_listen: '[::1]:65535'}\n", SRC)
    ok = load_text(f"version: 1\nhostname: {'.'.join(['a' * 63] * 3)}\n", SRC)
    ok = load_text("version: 1\nnetwork: [{match: {name: 'en?[0-9]*'}, dhcp: true, "
                   "dns: [1.1.1.1]}]\n", SRC)
    assert ok.network[0].dns == ["1.1.1.1"]


# --- files ---

def file_error(path: Path) -> str:
    with pytest.raises(HostConfigError) as e:
        load_file(path)
    assert "\n" not in e.value.message
    return e.value.message


def test_load_file(tmp_path: Path) -> None:
    f = tmp_path / "corehost.yaml"
    f.write_text("version: 1\nhostname: kvm-07\n")
    assert load_file(f).hostname == "kvm-07"


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert file_error(missing) == f"{missing}: cannot read: No such file or directory"
    assert file_error(tmp_path) == f"{tmp_path}: cannot read: Is a directory"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe\x00garbage")
    assert file_error(binary) == f"{binary}: not UTF-8 text (byte 0xff at offset 11)"
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"\x00\x01\x02\x03")
    assert file_error(nul).startswith(f"{nul}: not text: character #x0000")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"version: 1\n" + b"# padding\n" * (MAX_BYTES // 10 + 1))
    assert file_error(big) == f"{big}: larger than {MAX_BYTES} bytes: not a host config"
    empty = tmp_path / "empty.yaml"
    empty.write_bytes(b"")
    assert file_error(empty).startswith(f"{empty}: empty")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nhostname: 'Bad'\n")
    assert file_error(bad) == f"{bad}: hostname: 'Bad' is not a host name: labels are a-z, " \
        "0-9 and '-', not starting or ending with '-'"


def test_oversize_text_and_deep_nesting() -> None:
    assert "larger than" in error("version: 1\n" + "#" * MAX_BYTES)
    assert "nested too deeply" in error("version: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n")


# --- composing ---

def test_for_ssh_key_is_a_valid_document(keys: dict[str, str]) -> None:
    doc = for_ssh_key(keys["ed25519"] + "\n")
    assert doc == {"version": 1, "users": [{"name": "root",
                                            "ssh_authorized_keys": [keys["ed25519"]]}]}
    c = load_text(dump(doc), "fw_cfg")
    assert c.users[0].name == "root" and c.users[0].ssh_authorized_keys == [keys["ed25519"]]


def test_for_ssh_key_refuses_a_non_key() -> None:
    with pytest.raises(HostConfigError, match=r"^ssh key: not an ssh public key"):
        for_ssh_key("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_merge_users_by_name_and_keys_without_duplicates(keys: dict[str, str]) -> None:
    base = {"version": 1, "hostname": "site", "users": [
        {"name": "root", "ssh_authorized_keys": [keys["rsa"], keys["ecdsa"]]},
        {"name": "ops", "groups": ["adm"]}],
        "time": {"servers": ["a.example.org"]}}
    extra = {"hostname": "kvm-07", "users": [
        {"name": "root", "ssh_authorized_keys": [keys["ecdsa"], keys["ed25519"]]},
        {"name": "ci", "ssh_authorized_keys": [keys["ed25519"]]}]}
    before = repr(base), repr(extra)
    merged = merge(base, extra)
    assert (repr(base), repr(extra)) == before  # inputs untouched
    assert merged["hostname"] == "kvm-07"
    assert merged["time"] == {"servers": ["a.example.org"]}
    assert [u["name"] for u in merged["users"]] == ["root", "ops", "ci"]
    assert merged["users"][0]["ssh_authorized_keys"] == [keys["rsa"], keys["ecdsa"],
                                                         keys["ed25519"]]
    assert merged["users"][1] == {"name": "ops", "groups": ["adm"]}
    # and the result is a document that loads back to the same
    c = load_text(dump(merged), "merged")
    assert c.hostname == "kvm-07"
    assert c.users[0].ssh_authorized_keys == merged["users"][0]["ssh_authorized_keys"]
    assert c.users[2].ssh_authorized_keys == [keys["ed25519"]]


def test_merge_with_the_harness_key(keys: dict[str, str]) -> None:
    site = {"version": 1, "agent": {"tls_listen": "0.0.0.0:8443"}}
    merged = merge(site, for_ssh_key(keys["ed25519"]))
    assert merged == {"version": 1, "agent": {"tls_listen": "0.0.0.0:8443"},
                      "users": [{"name": "root", "ssh_authorized_keys": [keys["ed25519"]]}]}
    assert load_text(dump(merged), "x").agent is not None


def test_dump_keeps_order_and_round_trips() -> None:
    doc = {"version": 1, "hostname": "kvm-07", "time": {"servers": ["ntp.example.org"]}}
    text = dump(doc)
    assert text.splitlines()[0] == "version: 1"
    assert load_text(text, "x").model_dump(exclude_defaults=True) == doc
