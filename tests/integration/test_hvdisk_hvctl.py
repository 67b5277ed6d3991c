"""`hvctl disk ...` and `hvctl vm import` through a real `hvagent serve` on a real unix
socket: files on a stopped VM's disk round-trip exactly, refusals are one line on
stderr with exit status 2 and leave the image byte-identical, and an import reports the
firmware and disk bus the agent chose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import disk_images as di  # noqa: E402
from conftest import REPO, Agent  # noqa: E402

pytestmark = pytest.mark.integration


def hvctl(agent: Agent, *args: str | Path, input: bytes | None = None,
          ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "HVCTL_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "hvagent.cli.hvctl", "--socket",
                        str(agent.socket), *map(str, args)], input=input,
                       capture_output=True, cwd=REPO, env=env, check=False, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr.decode()
    return r


def refused(r: subprocess.CompletedProcess[bytes], text: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert err.startswith("hvctl: ") and err.count("\n") == 1 and text in err, err


def test_hvctl_disk_files(agent: Agent, tmp_path: Path) -> None:
    raw = di.make_raw(tmp_path / "raw", "gpt")
    agent.storage.mkdir(parents=True, exist_ok=True)
    disk = di.convert(raw, "qcow2", agent.storage / "files.qcow2")
    agent.ok("POST", "/vms", json={"name": "fv", "memory_mib": 64,
                                "disks": [{"path": str(disk)}]})
    assert hvctl(agent, "disk", "cat", "fv", "/etc/abs-hostname").stdout == \
        di.FILES["etc/hostname"]
    assert "motd" in hvctl(agent, "disk", "ls", "fv", "/etc").stdout.decode().split()
    rows = json.loads(hvctl(agent, "--json", "disk", "ls", "fv", "/etc").stdout)
    assert {"motd", "hostname"} <= {r["name"] for r in rows}

    payload = os.urandom(300_000)
    (tmp_path / "payload.bin").write_bytes(payload)
    changes = hvctl(agent, "disk", "put", "fv", "--mode", "0600", "/etc/payload.bin",
                    tmp_path / "payload.bin").stdout.decode()
    assert "/etc/payload.bin" in changes
    hvctl(agent, "disk", "cat", "fv", "/etc/payload.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == payload
    assert agent.ok("GET", "/vms/fv/disks/0/stat", params={"path": "/etc/payload.bin"}
                 )["mode"] == "0600"
    hvctl(agent, "disk", "put", "fv", "/etc/motd", "-", input=b"from hvctl\n")
    assert hvctl(agent, "disk", "cat", "fv", "/etc/motd").stdout == b"from hvctl\n"
    res = json.loads(hvctl(agent, "--json", "disk", "mkdir", "fv", "-p", "/srv/a/b").stdout)
    assert any("/srv/a/b" in c for c in res["changes"])
    assert hvctl(agent, "disk", "ls", "fv", "/srv/a").stdout.decode().split()[-1] == "b"
    hvctl(agent, "disk", "rm", "fv", "-r", "/srv")
    assert "srv" not in hvctl(agent, "disk", "ls", "fv", "/").stdout.decode().split()
    assert hvctl(agent, "disk", "cat", "fv", "--partition", "1", "/EFI/BOOT/BOOTX64.EFI"
                 ).stdout == di.ESP_FILES["EFI/BOOT/BOOTX64.EFI"]
    (tmp_path / "fsck").mkdir()
    assert di.ext_clean(disk, "qcow2", tmp_path / "fsck").returncode == 0

    # Refusals: one line, exit 2, the image untouched.
    before = di.sha256(disk)
    refused(hvctl(agent, "disk", "put", "fv", "/../x", tmp_path / "payload.bin", ok=False),
            "escapes the guest root")
    refused(hvctl(agent, "disk", "cat", "fv", "--disk", "3", "/etc/motd", ok=False),
            "has no disk 3")
    refused(hvctl(agent, "disk", "put", "fv", "/etc/x", tmp_path / "missing", ok=False),
            "missing: cannot read")
    refused(hvctl(agent, "disk", "cat", "fv", "/etc/nothing-here", tmp_path / "out", ok=False),
            "nothing-here")
    assert not (tmp_path / "out").exists()
    refused(hvctl(agent, "disk", "ls", "nosuchvm", "/", ok=False), "nosuchvm")
    agent.ok("POST", "/vms/fv/start")
    refused(hvctl(agent, "disk", "put", "fv", "/etc/x", tmp_path / "payload.bin", ok=False),
            "stop it")
    agent.ok("POST", "/vms/fv/stop", json={"force": True})
    assert di.sha256(disk) == before
    assert di.qemu_img_check_ok(disk, "qcow2")


def test_hvctl_vm_import(agent: Agent, tmp_path: Path) -> None:
    physical = di.make_physical_disk(tmp_path / "physical", uefi=False, virtio=False)
    agent.storage.mkdir(parents=True, exist_ok=True)
    image = agent.storage / "old.qcow2"
    di.convert(physical, "qcow2", image)
    # by name inside the storage directory: people's output, warnings on stderr
    r = hvctl(agent, "vm", "import", "old", "old.qcow2", "--memory", "96")
    assert r.stdout.decode().strip() == "old: defined (firmware bios, disk bus sata)"
    assert "hvctl: warning:" in r.stderr.decode() and "virtio" in r.stderr.decode()
    spec = agent.ok("GET", "/vms/old")["spec"]
    assert spec["memory_mib"] == 96 and spec["firmware"] == "bios"
    assert [(d["path"], d["bus"]) for d in spec["disks"]] == [(str(image), "sata")]
    assert "sata" in hvctl(agent, "vm", "show", "old").stdout.decode()
    # by path, --json for scripts
    agent.ok("DELETE", "/vms/old", params={"keep_disks": "true"})
    res = json.loads(hvctl(agent, "--json", "vm", "import", "old2", image, "--vcpus", "2"
                           ).stdout)
    assert (res["firmware"], res["disk_bus"], res["vm"]["spec"]["vcpus"]) == ("bios",
                                                                              "sata", 2)
    assert res["warnings"]
    # refusals
    refused(hvctl(agent, "vm", "import", "old2", image, ok=False), "old2")
    refused(hvctl(agent, "vm", "import", "x", physical, ok=False),
            "not an allowed file")
    refused(hvctl(agent, "vm", "import", "x", "nothing.qcow2", ok=False), "not an allowed file")
    assert [v["name"] for v in agent.ok("GET", "/vms")] == ["old2"]
