"""The agent's side of hvdisk, through a real `hvagent serve` on a real unix socket:
files on a stopped VM's disk read and written (Disk.Read / Disk.Write), refused while
the VM runs or without the privilege, and a P2V import that boots to its login prompt
under TCG with the firmware the agent detected, and one without virtio drivers that
boots from an emulated SATA disk on the AHCI controller."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, str(Path(__file__).parent))
import disk_images as di  # noqa: E402
from conftest import Agent  # noqa: E402
from test_hvdisk_edit import hvdisk  # noqa: E402

pytestmark = pytest.mark.integration


def test_files_on_a_stopped_vm_disk(agent: Agent, tmp_path: Path) -> None:
    raw = di.make_raw(tmp_path / "raw", "gpt")
    agent.storage.mkdir(parents=True, exist_ok=True)
    disk = di.convert(raw, "vhdx", agent.storage / "edit.vhdx")
    agent.ok("POST", "/vms", json={"name": "ed", "memory_mib": 64,
                                    "disks": [{"path": str(disk)}]})
    c = agent.client
    base = "/vms/ed/disks/0"
    r = c.get(f"{base}/files", params={"path": "/etc/abs-hostname"})
    assert r.status_code == 200 and r.content == di.FILES["etc/hostname"]
    names = [e["name"] for e in agent.ok("GET", f"{base}/ls", params={"path": "/etc"})]
    assert "motd" in names
    r = c.put(f"{base}/files", params={"path": "/etc/motd", "mode": "0600"},
              content=b"from the agent\n")
    assert r.status_code == 200, r.text
    assert c.get(f"{base}/files", params={"path": "/etc/motd"}).content == b"from the agent\n"
    assert agent.ok("GET", f"{base}/stat", params={"path": "/etc/motd"})["mode"] == "0600"
    r = c.get(f"{base}/files", params={"path": "/EFI/BOOT/BOOTX64.EFI", "partition": 1})
    assert r.content == di.ESP_FILES["EFI/BOOT/BOOTX64.EFI"]
    assert c.post(f"{base}/dirs", params={"path": "/srv/a", "parents": True}).status_code == 200
    assert c.delete(f"{base}/files", params={"path": "/srv", "recursive": True}
                    ).status_code == 200
    # Refusals: escaping path (400), missing disk (404), the image byte-identical.
    before = di.sha256(disk)
    r = c.put(f"{base}/files", params={"path": "/../x"}, content=b"x")
    assert r.status_code == 400 and "escapes the guest root" in r.json()["detail"]
    assert c.get("/vms/ed/disks/3/files", params={"path": "/x"}).status_code == 404
    # Privileges: an Auditor may do neither.
    h = {"Authorization": f"Bearer {agent.token('disk-auditor', 'Auditor')}"}
    for priv, r in (("Disk.Read", c.get(f"{base}/files", params={"path": "/etc/motd"},
                                        headers=h)),
                    ("Disk.Write", c.put(f"{base}/files", params={"path": "/x"}, content=b"x",
                                         headers=h))):
        assert r.status_code == 403 and priv in r.json()["detail"], r.text
    assert di.sha256(disk) == before
    # While the VM runs: 409, nothing touched.
    agent.ok("POST", "/vms/ed/start")
    r = c.get(f"{base}/files", params={"path": "/etc/motd"})
    assert r.status_code == 409 and "stop it" in r.json()["detail"]
    assert c.put(f"{base}/files", params={"path": "/x"}, content=b"x").status_code == 409
    agent.ok("POST", "/vms/ed/stop", json={"force": True})
    assert di.sha256(disk) == before
    assert c.get(f"{base}/files", params={"path": "/etc/motd"}).status_code == 200
    assert di.qemu_img_check_ok(disk, "vhdx")


def test_p2v_import_boots_to_login(agent: Agent, tmp_path: Path) -> None:
    physical = di.make_physical_disk(tmp_path / "physical")
    agent.storage.mkdir(parents=True, exist_ok=True)
    out = agent.storage / "imported.vhdx"
    hvdisk("p2v", "-q", physical, out, "--to", "vhdx")
    res = agent.ok("POST", "/vms/import", json={"name": "p2v", "image": "imported.vhdx"})
    assert res["firmware"] == "uefi" and res["disk_bus"] == "virtio"
    assert res["vm"]["spec"]["firmware"] == "uefi" and not res["warnings"]
    r = agent.client.post("/vms/import", json={"name": "p2v2", "image": "../../etc/passwd"})
    assert r.status_code == 403 and "not an allowed file" in r.json()["detail"]
    agent.ok("POST", "/vms/p2v/start")
    agent.wait_console("p2v", "p2vguest login:", timeout=600)
    agent.ok("POST", "/vms/p2v/stop", json={"force": True})
    shutil.rmtree(tmp_path / "physical", ignore_errors=True)


# A BIOS boot sector that prints a line on COM1 and halts: cld; xor ax,ax; mov ds,ax;
# mov dx,0x3f8; mov si,msg; next: lodsb; test al,al; jz end; out dx,al; jmp next;
# end: cli; hlt; jmp end; msg at 0x7c17.
BOOT_LINE = b"SATA-BOOT-OK"
BOOT_CODE = (bytes.fromhex("fc31c08ed8baf803be177cac84c07403eeebf8faf4ebfc")
             + BOOT_LINE + b"\r\n\0")


def test_import_without_virtio_boots_from_a_sata_disk_on_ahci(agent: Agent,
                                                               tmp_path: Path) -> None:
    """A guest without virtio drivers is imported with an emulated SATA disk: the
    firmware boots from it, and QEMU has it on q35's AHCI controller."""
    physical = di.make_physical_disk(tmp_path / "physical", uefi=False, virtio=False)
    with physical.open("r+b") as fh:  # boot code only: the partition table stays
        fh.write(BOOT_CODE)
    agent.storage.mkdir(parents=True, exist_ok=True)
    hvdisk("convert", "-q", physical, agent.storage / "legacy.qcow2", "--to", "qcow2")
    res = agent.ok("POST", "/vms/import", json={"name": "legacy", "image": "legacy.qcow2",
                                                 "memory_mib": 64})
    assert res["firmware"] == "bios" and res["disk_bus"] == "sata"
    assert [d["bus"] for d in res["vm"]["spec"]["disks"]] == ["sata"]
    assert any("no virtio disk driver" in w for w in res["warnings"]), res["warnings"]
    # Only virtio disks hot-attach: a sata one is refused, the spec unchanged.
    r = agent.client.post("/vms/legacy/disks", json={"size": "16M", "bus": "sata"})
    assert r.status_code == 400 and "cannot be hot-attached" in r.json()["detail"], r.text
    assert len(agent.ok("GET", "/vms/legacy")["spec"]["disks"]) == 1

    agent.ok("POST", "/vms/legacy/start")
    agent.wait_console("legacy", BOOT_LINE.decode(), timeout=300)
    # Ask QEMU itself where the disk sits. QMP serves one client: the agent lets go of
    # it while it is down (the VM keeps running) and takes it back on restart.
    agent.stop()
    qmp = QEMUMonitorProtocol(str(agent.run_dir / "legacy.qmp"))
    qmp.connect()
    try:
        bus = str(qmp.cmd("qom-get", path="/machine/peripheral/disk0", property="parent_bus"))
        controller = bus.rsplit("/", 1)[0]
        assert qmp.cmd("qom-get", path=controller, property="type") == "ich9-ahci"
        assert qmp.cmd("qom-get", path="/machine/peripheral/disk0",
                       property="type") == "ide-hd"
        block = {b["qdev"]: b for b in qmp.cmd("query-block")}  # type: ignore[attr-defined]
        assert block["disk0"]["inserted"]["file"] == str(agent.storage / "legacy.qcow2")
    finally:
        qmp.close()
    agent.start()
    agent.ok("POST", "/vms/legacy/stop", json={"force": True})
    shutil.rmtree(tmp_path / "physical", ignore_errors=True)


# Guest paths that name no file to write: the root, dot forms, climbing, a trailing
# slash on a directory, empty, too long, NUL, and non-UTF-8 escapes (sent raw).
BAD_PATHS = ["/", ".", "..", "x/..", "a/../..", "/etc/", "", "/" + "a" * 5000, "%00",
             "/etc/%00x", "%ff%fe", "/etc/%c3%28"]


def test_disk_file_routes_answer_4xx_for_the_whole_bad_path_family(agent: Agent,
                                                                   tmp_path: Path) -> None:
    raw = di.make_raw(tmp_path / "raw", "gpt")
    agent.storage.mkdir(parents=True, exist_ok=True)
    disk = di.convert(raw, "qcow2", agent.storage / "fam.qcow2")
    agent.ok("POST", "/vms", json={"name": "fam", "memory_mib": 64,
                                    "disks": [{"path": str(disk)}]})
    c = agent.client
    base = "/vms/fam/disks/0"
    before = di.sha256(disk)
    for path in BAD_PATHS:
        q = f"path={path}"  # already percent-encoded where it matters: sent as is
        for method, route, write in (("GET", "ls", False), ("GET", "stat", False),
                                     ("GET", "files", False), ("PUT", "files", True),
                                     ("DELETE", "files", True), ("POST", "dirs", True)):
            r = c.request(method, f"{base}/{route}?{q}", content=b"x" if write else None)
            where = (method, route, path, r.status_code, r.text[:200])
            assert r.status_code < 500, where
            if write or r.status_code >= 400:
                assert 400 <= r.status_code < 500, where
                assert r.headers["content-type"].startswith("application/problem+json"), where
                assert r.json()["detail"], where
    assert di.sha256(disk) == before
    # Nothing on the host was named after a guest path.
    assert not list(Path(tempfile.gettempdir()).glob("hvagent-put-*"))
