"""Access decisions (roles, ACL inheritance, VM ownership), the host policy file and its
admission checks, tokens in a real SQLite store, and the route-declaration rule."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, FastAPI

from hvagent.access.acl import AccessControl, AclEntry
from hvagent.access.policy import Admission, HostPolicy, PolicyDenied, Usage, load_policy
from hvagent.access.principal import Principal, current_principal
from hvagent.access.privileges import Privilege
from hvagent.access.security import Security
from hvagent.access.tokens import Tokens, TokenStatus, parse_duration, token_hash
from hvagent.api.auth import check_routes, require, undeclared_routes
from hvagent.config import AgentConfig
from hvagent.drivers.cmdline import cpu_args
from hvagent.errors import InvalidRequest, NotFound
from hvagent.services import files
from hvagent.services.jobs import Jobs
from hvagent.services.vms import VMService
from hvagent.spec import VMSpec
from hvagent.store import Store


def acl(*entries: tuple[str, str, str, bool], **policy: Any) -> AccessControl:
    p = HostPolicy.model_validate({
        **policy, "acl": [{"path": a, "principal": b, "role": c, "propagate": d}
                          for a, b, c, d in entries]})
    return AccessControl(p)


def test_role_on_a_parent_path_propagates_to_children() -> None:
    ac = acl(("/vms", "bob", "VMOperator", True))
    bob = Principal("bob", "t1")
    assert ac.allowed(bob, "VM.PowerMgmt", "/vms/a", None)
    assert ac.allowed(bob, "VM.Config.Memory", "/vms/a", None)
    assert not ac.allowed(bob, "VM.Allocate", "/vms", None)  # operators cannot create
    assert not ac.allowed(bob, "VM.Allocate", "/vms/a", None)  # ... nor delete
    assert not ac.allowed(bob, "Sys.Audit", "/", None)  # /vms does not cover /


def test_without_propagate_only_the_path_itself() -> None:
    ac = acl(("/vms", "bob", "Auditor", False))
    bob = Principal("bob", "t1")
    assert ac.allowed(bob, "VM.Audit", "/vms", None)
    assert not ac.allowed(bob, "VM.Audit", "/vms/a", None)


def test_a_more_specific_entry_replaces_the_inherited_one() -> None:
    ac = acl(("/", "bob", "Administrator", True), ("/vms/db", "bob", "Auditor", True))
    bob = Principal("bob", "t1")
    assert ac.allowed(bob, "VM.PowerMgmt", "/vms/web", None)
    assert ac.allowed(bob, "VM.Audit", "/vms/db", None)
    assert not ac.allowed(bob, "VM.PowerMgmt", "/vms/db", None)


def test_vmcreator_acts_only_on_the_vms_it_created() -> None:
    ac = acl(("/", "carol", "VMCreator", True))
    carol = Principal("carol", "t2")
    assert ac.allowed(carol, "VM.Allocate", "/vms", None)  # create
    assert ac.allowed(carol, "VM.Config.CPU", "/vms/mine", "carol")
    assert ac.allowed(carol, "VM.Allocate", "/vms/mine", "carol")  # delete its own
    assert not ac.allowed(carol, "VM.Config.CPU", "/vms/theirs", "dave")
    assert not ac.allowed(carol, "VM.Audit", "/vms/legacy", None)  # made by root
    assert not ac.allowed(carol, "Sys.Audit", "/", None)


def test_other_principals_and_root() -> None:
    ac = acl(("/", "bob", "Administrator", True))
    assert not ac.allowed(Principal("eve", "t3"), "VM.Audit", "/vms", None)
    assert ac.allowed(Principal("root"), "Permissions.Modify", "/", None)
    # a token whose principal is called root is not the uid-0 peer: it needs an ACL
    assert not ac.allowed(Principal("root", "t4"), "VM.Audit", "/vms", None)


def test_custom_role_from_the_policy_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text("roles:\n  PowerOnly: {privileges: [VM.PowerMgmt, VM.Audit]}\n"
                 "acl:\n  - {path: /vms, principal: ops, role: PowerOnly}\n")
    ac = AccessControl(load_policy(f))
    ops = Principal("ops", "t5")
    assert ac.allowed(ops, "VM.PowerMgmt", "/vms/a", None)
    assert not ac.allowed(ops, "VM.Config.CPU", "/vms/a", None)


@pytest.mark.parametrize("text, message", [
    ("quotas: {max_vcpu_per_vm: 2}\n", "quotas.max_vcpu_per_vm: unknown key"),
    ("roles: {R: {privileges: [VM.Fly]}}\n", "roles.R.privileges: unknown privilege 'VM.Fly'"),
    ("acl: [{path: /vms, principal: a, role: Nobody}]\n", "acl[0].role: unknown role"),
    ("roles: {Auditor: {privileges: []}}\n", "built-in role cannot be redefined"),
    ("disk_formats: [qcow3]\n", "disk_formats: unknown disk format 'qcow3'"),
    ("vlans: {VMOperator: [5000]}\n", "VLAN id 5000 is not in 1..4094"),
    ("library: [images]\n", "library: 'images' is not an absolute path"),
    ("library: [/srv/../]\n", "library: '/srv/../': a library cannot be the root directory"),
    ("- a\n", "expected a mapping"),
])
def test_bad_policy_file_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(text)
    with pytest.raises(InvalidRequest) as e:
        load_policy(f)
    assert str(f) in e.value.message and message in e.value.message, e.value.message


def test_missing_policy_file_means_no_limits(tmp_path: Path) -> None:
    p = load_policy(tmp_path / "absent.yaml")
    Admission(p).admit(VMSpec(name="big", vcpus=64, memory_mib=256 << 10))


def _as(principal: Principal | None) -> Any:
    return current_principal.set(principal)


def test_quotas_name_the_rule() -> None:
    policy = HostPolicy.model_validate({"quotas": {
        "max_vcpus_per_vm": 4, "max_memory_mib_per_vm": 2048, "max_vcpus_per_host": 10,
        "max_memory_mib_per_principal": 3000, "max_vms_per_principal": 2}})
    used = {None: Usage(8, 1024, 3), "alice": Usage(2, 2048, 2)}
    adm = Admission(policy, usage=lambda who, exclude: used[who])
    with pytest.raises(PolicyDenied, match=r"^policy quota.max_vcpus_per_vm=4: requested 8$"):
        adm.admit(VMSpec(name="a", vcpus=8))
    # the ceiling counts: a VM could hot-add up to max_vcpus
    with pytest.raises(PolicyDenied, match="max_vcpus_per_vm=4: requested 6"):
        adm.admit(VMSpec(name="a", vcpus=1, max_vcpus=6))
    with pytest.raises(PolicyDenied, match="max_memory_mib_per_vm=2048: requested 4096"):
        adm.admit(VMSpec(name="a", memory_mib=4096))
    with pytest.raises(PolicyDenied, match="max_vcpus_per_host=10: requested 11"):
        adm.admit(VMSpec(name="a", vcpus=3))
    token = _as(Principal("alice", "t"))
    try:
        with pytest.raises(PolicyDenied, match="max_memory_mib_per_principal=3000: "
                                               "requested 3072"):
            adm.admit(VMSpec(name="a", memory_mib=1024))
        with pytest.raises(PolicyDenied, match="max_vms_per_principal=2: requested 3"):
            adm.admit(VMSpec(name="a", memory_mib=512))
        adm.admit(VMSpec(name="a", memory_mib=512), previous=VMSpec(name="a"))  # a change
    finally:
        current_principal.reset(token)


def test_disk_formats_and_vlans() -> None:
    policy = HostPolicy.model_validate({
        "disk_formats": ["qcow2"], "vlans": {"VMOperator": [10, 20]},
        "acl": [{"path": "/", "principal": "op", "role": "VMOperator"}]})
    adm = Admission(policy)
    with pytest.raises(PolicyDenied, match=r"policy disk_formats=qcow2: disks\[0\] is vhdx"):
        adm.admit(VMSpec.model_validate({"name": "a", "disks": [{"size": "1G", "format": "vhdx"}]}))
    adm.admit(VMSpec.model_validate({"name": "a", "disks": [{"size": "1G"}]}))  # qcow2
    token = _as(Principal("op", "t"))
    try:
        with pytest.raises(PolicyDenied, match=r"policy vlans.VMOperator=10,20: VLAN 30"):
            adm.admit(VMSpec.model_validate({"name": "a", "nics": [{"vlan": 30}]}))
        adm.admit(VMSpec.model_validate({"name": "a", "nics": [{"vlan": 20}]}))
    finally:
        current_principal.reset(token)


def test_nested_virtualization_hidden_from_guests() -> None:
    tcg = ["-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm"]
    # The policy states yes/no; the machine driver turns it into -cpu flags.
    on, off = HostPolicy().nested_virtualization, False
    assert cpu_args(tcg, nested=on) == tcg
    assert cpu_args(tcg, nested=off) == ["-accel", "tcg,thread=multi", "-cpu", "qemu64,-svm,-vmx"]
    assert cpu_args(["-accel", "kvm", "-cpu", "host"], nested=off)[-1] == "host,-svm,-vmx"


# tokens in a real SQLite store


def test_tokens_are_stored_hashed_and_expire_and_revoke(tmp_path: Path) -> None:
    store = Store(tmp_path / "hv.db")
    tokens = Tokens(store)
    info, secret = tokens.create("alice", ttl=3600, comment="ci")
    assert secret.startswith(f"hvt_{info.id}_") and len(secret) > 40
    raw = sqlite3.connect(tmp_path / "hv.db").execute("SELECT * FROM tokens").fetchall()
    assert secret not in repr(raw) and token_hash(secret) in repr(raw)
    found = tokens.lookup(secret)
    assert found is not None and found.principal == "alice"
    assert found.status() is TokenStatus.VALID
    assert tokens.lookup(secret[:-1] + "x") is None
    assert found.status(now=time.time() + 7200) is TokenStatus.EXPIRED
    tokens.revoke(info.id)
    again = tokens.lookup(secret)
    assert again is not None and again.status() is TokenStatus.REVOKED
    with pytest.raises(InvalidRequest, match="already revoked"):
        tokens.revoke(info.id)
    with pytest.raises(NotFound):
        tokens.revoke("ffffffff")
    with pytest.raises(InvalidRequest, match="principal"):
        tokens.create("bad name", ttl=None)


def test_vm_owner_goes_with_the_vm(tmp_path: Path) -> None:
    store = Store(tmp_path / "hv.db")
    tokens = Tokens(store)
    store.insert_vm("a", "{}", "defined")
    tokens.set_owner("a", "carol")
    assert tokens.owner("a") == "carol"
    store.delete_vm("a")
    assert tokens.owner("a") is None


@pytest.mark.parametrize("value, seconds", [("90d", 90 * 86400), ("12h", 43200),
                                            ("30m", 1800), ("45", 45), ("never", None)])
def test_parse_duration(value: str, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


def test_parse_duration_rejects_junk() -> None:
    with pytest.raises(InvalidRequest, match="expires: 'soon'"):
        parse_duration("soon")


def test_grant_refuses_unknown_role(tmp_path: Path) -> None:
    tokens = Tokens(Store(tmp_path / "hv.db"))
    with pytest.raises(InvalidRequest, match="unknown role"):
        tokens.grant(AclEntry(path="/", principal="a", role="Nope"), HostPolicy())


# every route declares its privilege


def test_a_route_without_a_privilege_stops_the_app() -> None:
    app = FastAPI()

    @app.get("/ok", dependencies=[Depends(require(Privilege.VM_AUDIT, "/vms"))])
    async def ok() -> None: ...

    check_routes(app)

    @app.post("/forgot")
    async def forgot() -> None: ...

    assert undeclared_routes(app) == ["POST /forgot"]
    with pytest.raises(RuntimeError, match="POST /forgot"):
        check_routes(app)


# the files a request may name (hvagent.services.files), on a real store and VM service


def test_boot_and_library_files_and_who_may_use_them(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    boot = tmp_path / "boot"  # stands in for the host's /boot
    boot.mkdir()
    (boot / "vmlinuz-1").write_bytes(b"kernel")
    (boot / "escape").symlink_to("/etc/passwd")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "initrd").write_bytes(b"initrd")
    monkeypatch.setattr(files, "BOOT_DIR", boot)
    store = Store(tmp_path / "hv.db")
    policy = HostPolicy(library=[str(lib)])
    security = Security(store, policy)
    for who, role in (("ada", "Administrator"), ("carol", "VMCreator")):
        security.tokens.grant(AclEntry(path="/", principal=who, role=role), policy)
    vms = VMService(AgentConfig(storage_dir=tmp_path / "images", state_dir=tmp_path),
                    store, Jobs(store))
    vms.admission = security.admission()
    answer = "not an allowed file (storage directory or library only)"
    for who, admin in ((None, True), (Principal("root"), True),
                       (Principal("ada", "t1"), True), (Principal("carol", "t2"), False)):
        token = _as(who)
        try:
            kernel = str(boot / "vmlinuz-1")
            if admin:
                assert files.resolve(vms, kernel, "kernel", "boot", "x") == boot / "vmlinuz-1"
            via_lib = str(lib / ".." / "boot" / "vmlinuz-1")  # /boot once resolved
            for value in ([] if admin else [kernel, via_lib]) + [
                    str(boot / "escape"), str(boot / "missing"), "/etc/passwd",
                    str(lib / "missing")]:
                with pytest.raises(PolicyDenied) as e:
                    files.resolve(vms, value, "initrd", "boot", "x")
                assert e.value.message == f"initrd: {value}: {answer}", who
            assert files.resolve(vms, str(lib / "initrd"), "initrd", "boot", "x") == \
                lib / "initrd"
            with pytest.raises(PolicyDenied, match="library image is read-only"):
                files.resolve(vms, str(lib / "initrd"), "disks[0].path", "disk", "x")
            with pytest.raises(PolicyDenied, match="not an allowed file"):  # never a disk
                files.resolve(vms, kernel, "disks[0].path", "disk", "x")
        finally:
            current_principal.reset(token)
