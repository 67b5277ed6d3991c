"""Tenant isolation on real VMs, over HTTPS with real tokens: every configuration route
against another principal's VM (403, nothing changed) and against the caller's own
(allowed); a token with no role, a grant scoped to one VM, a custom role; and the files a
request may name (hvagent.services.files): another principal's disk under every spelling, a
loose image, host files as kernel or initrd, a file in use by another VM. The VMs stay
stopped: every check here happens before QEMU would start."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from secure_agent import SecureAgent

from hvagent.api.app import create_app
from hvagent.api.auth import route_privileges
from hvagent.config import AgentConfig

pytestmark = pytest.mark.integration

TENANT_PRIVILEGES = ["VM.Allocate", "VM.Audit", "VM.Config.CPU", "VM.Config.Memory",
                     "VM.Config.Disk", "VM.Config.Network", "VM.PowerMgmt", "VM.Console",
                     "VM.Snapshot", "VM.Snapshot.Rollback", "Disk.Read", "Disk.Write"]
ROUTES = route_privileges(create_app(AgentConfig(policy=Path("/nonexistent/policy.yaml"))))
DISK_ANSWER = "not an allowed file (an image in the storage directory that the caller may use)"
BOOT_ANSWER = "not an allowed file (storage directory or library only)"


class Env:
    def __init__(self, agent: SecureAgent, library: Path, tokens: dict[str, str]) -> None:
        self.agent = agent
        self.library = library
        self.tokens = tokens
        self.storage = agent.root / "images"

    def client(self, who: str) -> httpx.Client:
        return self.agent.client(self.tokens[who])

    def spec(self, vm: str) -> dict[str, Any]:
        r = self.agent.root_client.get(f"/vms/{vm}")
        assert r.status_code == 200, r.text
        return r.json()["spec"]  # type: ignore[no-any-return]

    def disk(self, vm: str, i: int = 0) -> str:
        return str(self.spec(vm)["disks"][i]["path"])

    def vms(self) -> set[str]:
        return {v["name"] for v in self.agent.root_client.get("/vms").json()}


def _job(client: httpx.Client, r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/jobs/{r.json()['id']}").json()
        if job["status"] != "running":
            assert job["status"] == "succeeded", job
            return job  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def _created(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("tenants")
    library = root / "library"
    library.mkdir()
    (library / "vmlinuz").write_bytes(b"not really a kernel")  # no VM here starts
    (library / "initrd.img").write_bytes(b"not really an initrd")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(library / "base.qcow2"),
                    "8M"], check=True, timeout=60)
    policy = {
        "roles": {"Tenant": {"privileges": TENANT_PRIVILEGES, "owner_only": True}},
        "vlans": {"VMCreator": [10, 20]},
        "library": [str(library)],
    }
    a = SecureAgent(root, policy)
    a.start()
    try:
        tokens = {"carol": a.token("carol", "VMCreator")["token"],
                  "dave": a.token("dave", "VMCreator")["token"],
                  "tina": a.token("tina", "Tenant")["token"],  # custom, owner-only role
                  "ada": a.token("ada", "Administrator")["token"],
                  "nobody": a.token("nobody")["token"],  # a token and no role at all
                  # a grant on one VM only (path-scoped, not on /vms)
                  "pat": a.token("pat", "VMOperator", path="/vms/iso-shared")["token"]}
        e = Env(a, library, tokens)
        boot = {"kernel": str(library / "vmlinuz"), "initrd": str(library / "initrd.img")}
        vm = {"vcpus": 1, "max_vcpus": 2, "memory_mib": 64, "max_memory_mib": 256,
              "disks": [{"size": "8M"}], "nics": [{"network": "user"}], **boot}
        with e.client("carol") as carol:
            _created(carol.post("/vms", json={"name": "iso-carol", **vm}))
            _created(carol.post("/vms", json={"name": "iso-carol2", "memory_mib": 64}))
        with e.client("dave") as dave:
            _created(dave.post("/vms", json={"name": "iso-dave", **vm}))
            _created(dave.post("/vms", json={"name": "iso-dave2", "memory_mib": 64,
                                             "disks": [{"size": "8M", "format": "raw"}]}))
            # a raw disk: the checkpoint is external, the disk is now an overlay under
            # iso-dave2.checkpoints/ and the raw base is held by the checkpoint
            _job(dave, dave.post("/vms/iso-dave2/checkpoints", json={"name": "c1"}))
        with e.client("tina") as tina:
            _created(tina.post("/vms", json={"name": "iso-tina", "memory_mib": 64,
                                             "disks": [{"size": "16M", "format": "raw"}]}))
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", e.disk("iso-tina")],
                       check=True, timeout=60)
        _created(a.root_client.post("/vms", json={"name": "iso-shared", "vcpus": 1,
                                                  "max_vcpus": 2, "memory_mib": 64}))
        # files in the storage directory no VM refers to, and symlinks planted there
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                        str(e.storage / "loose.qcow2"), "8M"], check=True, timeout=60)
        os.symlink(e.disk("iso-dave"), e.storage / "to-dave.qcow2")
        os.symlink("/etc", e.storage / "etc")
        yield e
    finally:
        a.stop()


# every route on one VM: (method, route path, request for it); {vm} {mac} {disk} are
# filled per target. Checked against the app's route table below.
RouteCall = tuple[str, str, dict[str, Any]]
VM_ROUTES: list[RouteCall] = [
    ("GET", "/vms/{vm}", {}),
    ("GET", "/vms/{vm}/devices", {}),
    ("PUT", "/vms/{vm}/vcpus", {"json": {"vcpus": 2}}),
    ("PUT", "/vms/{vm}/memory", {"json": {"memory_mib": 128}}),
    ("POST", "/vms/{vm}/disks", {"json": {"size": "8M"}}),
    ("DELETE", "/vms/{vm}/disks", {"params": {"path": "{disk}"}}),
    ("POST", "/vms/{vm}/nics", {"json": {"vlan": 10}}),
    ("PUT", "/vms/{vm}/nics/{mac}", {"json": {"vlan": 20}}),
    ("DELETE", "/vms/{vm}/nics/{mac}", {}),
    ("POST", "/vms/{vm}/checkpoints", {"json": {"name": "x1"}}),
    ("GET", "/vms/{vm}/checkpoints", {}),
    ("GET", "/vms/{vm}/checkpoints/x1", {}),
    ("POST", "/vms/{vm}/checkpoints/x1/revert", {}),
    ("DELETE", "/vms/{vm}/checkpoints/x1", {}),
    ("GET", "/vms/{vm}/console", {}),
    ("GET", "/vms/{vm}/disks/0/partitions", {}),
    ("GET", "/vms/{vm}/disks/0/ls", {"params": {"path": "/"}}),
    ("GET", "/vms/{vm}/disks/0/stat", {"params": {"path": "/"}}),
    ("PUT", "/vms/{vm}/disks/0/files", {"params": {"path": "/hello"}, "content": b"hi"}),
    ("GET", "/vms/{vm}/disks/0/files", {"params": {"path": "/hello"}}),
    ("DELETE", "/vms/{vm}/disks/0/files", {"params": {"path": "/hello"}}),
    ("POST", "/vms/{vm}/disks/0/dirs", {"params": {"path": "/d"}}),
    ("PUT", "/vms/{vm}/media/cd", {"json": {"image": "loose.qcow2"}}),
    ("DELETE", "/vms/{vm}/media/cd", {}),
    ("PUT", "/vms/{vm}/boot", {"json": {"target": "network", "enabled": "once"}}),
    ("POST", "/vms/{vm}/start", {}),
    ("POST", "/vms/{vm}/stop", {"json": {"force": True}}),
    ("POST", "/vms/{vm}/pause", {}),
    ("POST", "/vms/{vm}/resume", {}),
    ("POST", "/vms/{vm}/reset", {}),
    ("DELETE", "/vms/{vm}", {}),
]


def _route_key(method: str, path: str) -> tuple[str, str]:
    generic = (path.replace("{vm}", "{name}").replace("/x1", "/{checkpoint}")
               .replace("/disks/0/", "/disks/{index}/").replace("/media/cd", "/media/{slot}"))
    return method, "/api/v1" + generic


def test_every_route_on_a_vm_is_in_the_list() -> None:
    listed = {_route_key(m, p) for m, p, _ in VM_ROUTES}
    on_a_vm = {k for k in ROUTES if k[1].startswith("/api/v1/vms/{name}")}
    assert on_a_vm <= listed, sorted(on_a_vm - listed)


def _fill(call: RouteCall, vm: str, mac: str, disk: str) -> tuple[str, str, dict[str, Any]]:
    method, path, kw = call
    kw = json.loads(json.dumps({k: v for k, v in kw.items() if k != "content"}))
    if "params" in kw:
        kw["params"] = {k: v.replace("{disk}", disk) for k, v in kw["params"].items()}
    if "content" in call[2]:
        kw["content"] = call[2]["content"]
    return method, path.format(vm=vm, mac=mac), kw


def _state(e: Env, vm: str) -> tuple[Any, ...]:
    r = e.agent.root_client.get(f"/vms/{vm}/checkpoints")
    assert r.status_code == 200, r.text
    return (e.spec(vm), [c["name"] for c in r.json()],
            sorted(_sha(d["path"]) for d in e.spec(vm)["disks"]))


@pytest.mark.parametrize("who", ["carol", "tina", "nobody", "pat"])
def test_every_route_on_another_principals_vm_is_403_and_changes_nothing(
        env: Env, who: str) -> None:
    for victim in ("iso-dave", "iso-dave2"):
        before = _state(env, victim)
        spec = env.spec(victim)
        mac = spec["nics"][0]["mac"] if spec["nics"] else "52:54:00:00:00:01"
        with env.client(who) as c:
            for call in VM_ROUTES:
                method, path, kw = _fill(call, victim, mac, spec["disks"][0]["path"])
                r = c.request(method, path, **kw)
                assert r.status_code == 403, (who, method, path, r.text)
                assert r.json()["detail"].startswith(f"{who} lacks "), r.text
        assert _state(env, victim) == before
    assert {"iso-dave", "iso-dave2"} <= env.vms()


# The same VMs through Redfish: its routes name the VM as the System (and its Manager).
REDFISH_ROUTES: list[RouteCall] = [
    ("GET", "/Systems/{vm}", {}),
    ("PATCH", "/Systems/{vm}", {"json": {"ProcessorSummary": {"Count": 2}}}),
    ("POST", "/Systems/{vm}/Actions/ComputerSystem.Reset", {"json": {"ResetType": "On"}}),
    ("GET", "/Systems/{vm}/Storage/disks/Drives/disk0", {}),
    ("POST", "/Systems/{vm}/VirtualMedia/Cd/Actions/VirtualMedia.InsertMedia",
     {"json": {"Image": "loose.qcow2"}}),
    ("POST", "/Managers/{vm}/VirtualMedia/Cd/Actions/VirtualMedia.InsertMedia",
     {"json": {"Image": "loose.qcow2"}}),
    ("GET", "/Managers/{vm}", {}),
]


@pytest.mark.parametrize("who", ["carol", "tina", "nobody", "pat"])
def test_redfish_on_another_principals_vm_is_403_and_changes_nothing(
        env: Env, who: str) -> None:
    for victim in ("iso-dave", "iso-dave2"):
        before = _state(env, victim)
        with env.client(who) as c:
            for method, path, kw in REDFISH_ROUTES:
                url = env.agent.url + "/redfish/v1" + path.format(vm=victim)
                r = c.request(method, url, **kw)
                assert r.status_code == 403, (who, method, path, r.text)
                assert r.json()["error"]["message"].startswith(f"{who} lacks "), r.text
            listed = c.get(env.agent.url + "/redfish/v1/Systems")
            if listed.status_code == 200:
                ids = [m["@odata.id"] for m in listed.json()["Members"]]
                assert f"/redfish/v1/Systems/{victim}" not in ids, ids
        assert _state(env, victim) == before


def test_a_token_without_a_role_can_do_nothing(env: Env) -> None:
    with env.client("nobody") as c:
        for method, path in (("GET", "/vms"), ("POST", "/vms"), ("POST", "/vms/import"),
                             ("GET", "/jobs"), ("GET", "/agent")):
            r = c.request(method, path, json={"name": "iso-nobody", "image": "loose.qcow2"}
                          if method == "POST" else None)
            assert r.status_code == 403, (method, path, r.text)
    assert "iso-nobody" not in env.vms()


def test_a_grant_on_one_vm_reaches_that_vm_only(env: Env) -> None:
    with env.client("pat") as pat:
        r = pat.put("/vms/iso-shared/vcpus", json={"vcpus": 2})
        assert r.status_code == 200, r.text
        assert pat.get("/vms/iso-shared/console").status_code == 200
        assert pat.put("/vms/iso-carol/vcpus", json={"vcpus": 2}).status_code == 403
        assert pat.get("/vms").status_code == 403  # nothing on /vms itself
    assert env.spec("iso-shared")["vcpus"] == 2


def _ok(r: httpx.Response, *codes: int) -> dict[str, Any]:
    assert r.status_code in (codes or (200,)), r.text
    return r.json()  # type: ignore[no-any-return]


def test_the_owner_configures_its_own_vm(env: Env) -> None:
    with env.client("carol") as c:
        vm = "iso-carol"
        assert _ok(c.get(f"/vms/{vm}"))["spec"]["disks"]
        assert _ok(c.put(f"/vms/{vm}/vcpus", json={"vcpus": 2}))["vm"]["spec"]["vcpus"] == 2
        r = c.put(f"/vms/{vm}/memory", json={"memory_mib": 128})
        assert _ok(r)["vm"]["spec"]["memory_mib"] == 128
        disks = _ok(c.post(f"/vms/{vm}/disks", json={"size": "8M"}), 201)["vm"]["spec"]["disks"]
        assert len(disks) == 2
        r = c.request("DELETE", f"/vms/{vm}/disks", params={"path": disks[1]["path"]})
        assert len(_ok(r)["vm"]["spec"]["disks"]) == 1
        nics = _ok(c.post(f"/vms/{vm}/nics", json={"vlan": 10}), 201)["vm"]["spec"]["nics"]
        mac = nics[-1]["mac"]
        r = c.put(f"/vms/{vm}/nics/{mac}", json={"vlan": 20})
        assert _ok(r)["vm"]["spec"]["nics"][-1]["vlan"] == 20
        assert len(_ok(c.delete(f"/vms/{vm}/nics/{mac}"))["vm"]["spec"]["nics"]) == 1
        _job(c, c.post(f"/vms/{vm}/checkpoints", json={"name": "x1"}))
        assert [x["name"] for x in _ok(c.get(f"/vms/{vm}/checkpoints"))] == ["x1"]
        _job(c, c.post(f"/vms/{vm}/checkpoints/x1/revert"))
        _job(c, c.delete(f"/vms/{vm}/checkpoints/x1"))
        assert _ok(c.get(f"/vms/{vm}/console"))["text"] is not None
        # VMCreator has no Disk.Read/Disk.Write at all: a role rule, not ownership
        r = c.get(f"/vms/{vm}/disks/0/partitions")
        assert r.status_code == 403 and "carol lacks Disk.Read" in r.json()["detail"]


def test_a_custom_owner_only_role_edits_its_own_vms_disk_files(env: Env) -> None:
    with env.client("tina") as c:
        vm = "iso-tina"
        _ok(c.put(f"/vms/{vm}/disks/0/files", params={"path": "/hello"}, content=b"hi"))
        assert c.get(f"/vms/{vm}/disks/0/files", params={"path": "/hello"}).content == b"hi"
        names = [x["name"] for x in _ok(c.get(f"/vms/{vm}/disks/0/ls", params={"path": "/"}))]
        assert "hello" in names
        _ok(c.post(f"/vms/{vm}/disks/0/dirs", params={"path": "/d"}))
        _ok(c.request("DELETE", f"/vms/{vm}/disks/0/files", params={"path": "/hello"}))
        assert c.get(f"/vms/{vm}/disks/0/partitions").status_code == 200
        # the same role on a VM tina did not create: nothing
        assert c.get("/vms/iso-carol/disks/0/ls", params={"path": "/"}).status_code == 403


# the files a request names: (name, how to spell it); every one is not carol's to use,
# and they all get one answer whether the file exists or not
def _foreign(e: Env) -> dict[str, str]:
    dave = e.disk("iso-dave")
    overlay = e.disk("iso-dave2")
    return {
        "relative": Path(dave).name,
        "absolute": dave,
        "dotdot": f"../images/{Path(dave).name}",
        "dotdot inside": f"nothere/../{Path(dave).name}",
        "symlink to it": "to-dave.qcow2",
        "checkpoint overlay": overlay,
        "checkpoint overlay relative": str(Path(overlay).relative_to(e.storage)),
        "checkpoint base": str(e.storage / "iso-dave2-disk0.raw"),
        "loose image": "loose.qcow2",
        "missing": "ghost.qcow2",
        "missing absolute": str(e.storage / "ghost.qcow2"),
        "symlink to /etc": "etc/passwd",
        "host file": "/etc/shadow",
        "host dotdot": "../../../../../../../etc/shadow",
        "library image": str(e.library / "base.qcow2"),
    }


REQUESTS: dict[str, tuple[str, Callable[[str], dict[str, Any]], str]] = {
    "create": ("/vms", lambda v: {"name": "iso-x", "memory_mib": 64,
                                  "disks": [{"path": v}]}, "disks[0].path"),
    "create second disk": ("/vms", lambda v: {"name": "iso-x", "memory_mib": 64,
                                              "disks": [{"size": "8M"}, {"path": v}]},
                           "disks[1].path"),
    "attach": ("/vms/iso-carol/disks", lambda v: {"path": v}, "disk.path"),
    "import": ("/vms/import", lambda v: {"name": "iso-x", "image": v}, "image"),
}


@pytest.mark.parametrize("request_kind", REQUESTS)
def test_another_principals_disk_under_every_spelling_is_refused_alike(
        env: Env, request_kind: str) -> None:
    url, body, field = REQUESTS[request_kind]
    before = {vm: _state(env, vm) for vm in ("iso-carol", "iso-dave", "iso-dave2")}
    files = sorted(p.name for p in env.storage.iterdir())
    with env.client("carol") as c:
        for case, value in _foreign(env).items():
            r = c.post(url, json=body(value))
            assert r.status_code == 403, (case, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            if case == "library image":  # shared and read-only: never a disk
                assert r.json()["detail"] == (f"{field}: {value}: a library image is "
                                              "read-only: it can be a kernel or initrd, "
                                              "not a disk")
            else:
                # the same text for a file that exists and one that does not
                assert r.json()["detail"] == f"{field}: {value}: {DISK_ANSWER}", case
    assert "iso-x" not in env.vms()
    assert {vm: _state(env, vm) for vm in before} == before
    assert sorted(p.name for p in env.storage.iterdir()) == files  # no disk left behind


BOOT_FILES = {
    "host secret": "/etc/shadow",
    "host dotdot": "../../../../../../../etc/shadow",
    "proc": "/proc/self/environ",
    "boot": "/boot/vmlinuz",  # the host's /boot: the administrator's only
    "missing": "/nonexistent/initrd.img",
    "missing in library": "{library}/nothere.img",
    "symlink to /etc in storage": "etc/shadow",
    "another's disk": "{dave}",
    "loose image": "loose.qcow2",
}


@pytest.mark.parametrize("field", ["kernel", "initrd"])
def test_host_files_as_kernel_or_initrd_are_refused_alike(env: Env, field: str) -> None:
    lib_kernel = str(env.library / "vmlinuz")
    with env.client("carol") as c:
        for case, value in BOOT_FILES.items():
            value = value.format(library=env.library, dave=env.disk("iso-dave"))
            body = {"name": "iso-k", "memory_mib": 64, "kernel": lib_kernel, field: value}
            r = c.post("/vms", json=body)
            assert r.status_code == 403, (case, r.text)
            assert r.json()["detail"] == f"{field}: {value}: {BOOT_ANSWER}", case
    # root is refused host files outside /boot too
    r = env.agent.root_client.post("/vms", json={"name": "iso-k", "memory_mib": 64,
                                                 "kernel": "/etc/shadow"})
    assert r.status_code == 403 and r.json()["detail"] == f"kernel: /etc/shadow: {BOOT_ANSWER}"
    assert "iso-k" not in env.vms()
    # the library is what makes the positive case work: recorded resolved
    assert env.spec("iso-carol")["kernel"] == lib_kernel


def test_disks_in_use_are_409_for_those_who_may_see_them(env: Env) -> None:
    dave = env.disk("iso-dave")
    root = env.agent.root_client
    r = root.post("/vms/iso-shared/disks", json={"path": dave})
    assert r.status_code == 409 and r.json()["detail"] == (
        f"disk.path: {dave} is in use: a disk of VM iso-dave"), r.text
    with env.client("ada") as ada:
        r = ada.post("/vms", json={"name": "iso-ada", "memory_mib": 64,
                                   "disks": [{"path": "to-dave.qcow2"}]})
        assert r.status_code == 409 and "a disk of VM iso-dave" in r.json()["detail"]
        base = str(env.storage / "iso-dave2-disk0.raw")
        r = ada.post("/vms", json={"name": "iso-ada", "memory_mib": 64,
                                   "disks": [{"path": base}]})
        assert r.status_code == 409, r.text
        assert r.json()["detail"].endswith("held by a checkpoint of VM iso-dave2")
        # a loose image is the administrator's: allowed, and then in use itself
        vm = _created(ada.post("/vms", json={"name": "iso-ada", "memory_mib": 64,
                                             "disks": [{"path": "loose.qcow2"}]}))
        assert vm["spec"]["disks"][0]["path"] == str(env.storage / "loose.qcow2")
        r = ada.post("/vms/iso-shared/disks", json={"path": "loose.qcow2"})
        assert r.status_code == 409 and "a disk of VM iso-ada" in r.json()["detail"]
        assert ada.delete("/vms/iso-ada", params={"keep_disks": "true"}).status_code == 200
    assert (env.storage / "loose.qcow2").exists()
    with env.client("carol") as c:  # carol's own disk, into her second VM
        own = env.disk("iso-carol")
        r = c.post("/vms/iso-carol2/disks", json={"path": own})
        assert r.status_code == 409 and r.json()["detail"] == (
            f"disk.path: {own} is in use: a disk of VM iso-carol"), r.text
        r = c.post("/vms/iso-carol/disks", json={"path": own})
        assert r.status_code == 409 and "already attached to iso-carol" in r.json()["detail"]
    assert env.spec("iso-shared")["disks"] == [] and env.spec("iso-carol2")["disks"] == []
