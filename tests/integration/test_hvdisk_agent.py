"""The agent's side of hvdisk, through a real `hvagent serve` on a real unix socket:
files on a stopped VM's disk read and written (Disk.Read / Disk.Write), refused while
the VM runs or without the privilege, and a P2V import that boots to its login prompt
under TCG with the firmware the agent detected."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import disk_images as di  # noqa: E402
from conftest import REPO, Agent  # noqa: E402
from test_hvdisk_edit import hvdisk  # noqa: E402

pytestmark = pytest.mark.integration
# The agent with the disks router mounted, as hvagent/api/v1.py mounts its routers.
SERVE = ("import sys\n"
         "from hvagent.api import disks, v1\n"
         "if not hasattr(v1, 'disks'):\n"
         "    v1.router.include_router(disks.router)\n"
         "from hvagent.cli.hvagent import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


class DiskAgent(Agent):
    def start(self) -> None:
        log = (self.root / "agent.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--config",
                                      str(self.config)], stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "agent.log").read_text()
            try:
                if self.client.get("/agent").status_code == 200:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.1)
        raise RuntimeError("hvagent did not answer in 60 s")

    def token(self, principal: str, role: str) -> str:
        r = subprocess.run([sys.executable, "-m", "hvagent.cli.hvagent", "token", "--config",
                            str(self.config), "--json", "create", principal, "--role", role],
                           capture_output=True, text=True, cwd=REPO, check=False)
        assert r.returncode == 0, r.stderr
        return str(json.loads(r.stdout)["token"])


@pytest.fixture
def dagent(tmp_path: Path) -> Iterator[DiskAgent]:
    (tmp_path / "agent").mkdir()
    a = DiskAgent(tmp_path / "agent")
    a.start()
    try:
        yield a
    finally:
        for vm in a.client.get("/vms").json():
            if vm["state"] in ("running", "paused"):
                a.client.post(f"/vms/{vm['name']}/stop", json={"force": True})
        a.stop()
        a.client.close()


def test_files_on_a_stopped_vm_disk(dagent: DiskAgent, tmp_path: Path) -> None:
    raw = di.make_raw(tmp_path / "raw", "gpt")
    dagent.storage.mkdir(parents=True, exist_ok=True)
    disk = di.convert(raw, "vhdx", dagent.storage / "edit.vhdx")
    dagent.ok("POST", "/vms", json={"name": "ed", "memory_mib": 64,
                                    "disks": [{"path": str(disk)}]})
    c = dagent.client
    base = "/vms/ed/disks/0"
    r = c.get(f"{base}/files", params={"path": "/etc/abs-hostname"})
    assert r.status_code == 200 and r.content == di.FILES["etc/hostname"]
    names = [e["name"] for e in dagent.ok("GET", f"{base}/ls", params={"path": "/etc"})]
    assert "motd" in names
    r = c.put(f"{base}/files", params={"path": "/etc/motd", "mode": "0600"},
              content=b"from the agent\n")
    assert r.status_code == 200, r.text
    assert c.get(f"{base}/files", params={"path": "/etc/motd"}).content == b"from the agent\n"
    assert dagent.ok("GET", f"{base}/stat", params={"path": "/etc/motd"})["mode"] == "0600"
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
    h = {"Authorization": f"Bearer {dagent.token('disk-auditor', 'Auditor')}"}
    for priv, r in (("Disk.Read", c.get(f"{base}/files", params={"path": "/etc/motd"},
                                        headers=h)),
                    ("Disk.Write", c.put(f"{base}/files", params={"path": "/x"}, content=b"x",
                                         headers=h))):
        assert r.status_code == 403 and priv in r.json()["detail"], r.text
    assert di.sha256(disk) == before
    # While the VM runs: 409, nothing touched.
    dagent.ok("POST", "/vms/ed/start")
    r = c.get(f"{base}/files", params={"path": "/etc/motd"})
    assert r.status_code == 409 and "stop it" in r.json()["detail"]
    assert c.put(f"{base}/files", params={"path": "/x"}, content=b"x").status_code == 409
    dagent.ok("POST", "/vms/ed/stop", json={"force": True})
    assert di.sha256(disk) == before
    assert c.get(f"{base}/files", params={"path": "/etc/motd"}).status_code == 200
    assert di.qemu_img_check_ok(disk, "vhdx")


def test_p2v_import_boots_to_login(dagent: DiskAgent, tmp_path: Path) -> None:
    physical = di.make_physical_disk(tmp_path / "physical")
    dagent.storage.mkdir(parents=True, exist_ok=True)
    out = dagent.storage / "imported.vhdx"
    hvdisk("p2v", "-q", physical, out, "--to", "vhdx")
    res = dagent.ok("POST", "/vms/import", json={"name": "p2v", "image": "imported.vhdx"})
    assert res["firmware"] == "uefi" and res["disk_bus"] == "virtio"
    assert res["vm"]["spec"]["firmware"] == "uefi" and not res["warnings"]
    r = dagent.client.post("/vms/import", json={"name": "p2v2", "image": "../../etc/passwd"})
    assert r.status_code == 400 and "outside the storage directory" in r.json()["detail"]
    dagent.ok("POST", "/vms/p2v/start")
    dagent.wait_console("p2v", "p2vguest login:", timeout=600)
    dagent.ok("POST", "/vms/p2v/stop", json={"force": True})
    shutil.rmtree(tmp_path / "physical", ignore_errors=True)
