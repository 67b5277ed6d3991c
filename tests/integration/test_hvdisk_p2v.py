"""P2V: a bootable "physical" disk (GPT + ESP + ext4 root, made in the test) read from
a real block device (a loop device), turned into VHDX and qcow2, its boot settings
detected, and the result booted under QEMU with those settings to its login prompt."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import disk_images as di  # noqa: E402
from test_hvdisk_edit import hvdisk  # noqa: E402

from hvagent.host.kvm import choose_accel  # noqa: E402

pytestmark = pytest.mark.integration
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_TIMEOUT = 600  # TCG on a busy 2-core host


@pytest.fixture(scope="module")
def physical(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return di.make_physical_disk(tmp_path_factory.mktemp("physical"))


@pytest.fixture
def block_device(physical: Path) -> Iterator[Path]:
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", str(physical)],
                         capture_output=True, check=True, text=True, timeout=60).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=60)


@pytest.mark.parametrize("fmt", ["vhdx", "qcow2"])
def test_p2v_from_a_block_device(fmt: str, physical: Path, block_device: Path,
                                 tmp_path: Path) -> None:
    out = tmp_path / f"imported.{fmt}"
    proc = hvdisk("p2v", block_device, out, "--to", fmt, "--json")
    res = json.loads(proc.stdout)
    assert res["sha256"] == hashlib.sha256(physical.read_bytes()).hexdigest()
    assert res["bytes_read"] == physical.stat().st_size == res["virtual_size"]
    assert f"p2v {block_device.name}: 100%" in proc.stderr.decode()
    hvdisk("compare", "--strict", physical, out)
    hvdisk("check", out)
    # Sparse: most of the disk is empty and takes no room.
    assert os.stat(out).st_blocks * 512 < physical.stat().st_size // 2
    hvdisk("p2v", block_device, out, "--to", fmt, rc=2)  # exists


def test_p2v_refuses_what_is_not_a_raw_disk(physical: Path, tmp_path: Path) -> None:
    q = di.convert(physical, "qcow2", tmp_path / "x.qcow2")
    assert "convert" in hvdisk("p2v", q, tmp_path / "o.vhdx", "--to", "vhdx",
                               rc=2).stderr.decode()
    hvdisk("p2v", tmp_path / "missing", tmp_path / "o.vhdx", "--to", "vhdx", rc=2)
    assert not (tmp_path / "o.vhdx").exists()


def test_detection(physical: Path, tmp_path: Path) -> None:
    det = json.loads(hvdisk("detect", "--json", physical).stdout)
    assert det["firmware"] == "uefi" and det["disk_bus"] == "virtio"
    assert det["esp"] == 1 and det["root"] == 2 and not det["warnings"]
    assert "virtio_blk" in det["virtio_drivers"]
    legacy = di.make_physical_disk(tmp_path / "legacy", uefi=False, virtio=False)
    det = json.loads(hvdisk("detect", "--json", legacy).stdout)
    assert det["firmware"] == "bios" and det["disk_bus"] == "sata"
    assert det["partition_table"] == "mbr" and det["root"] == 1
    assert any("virtio" in w for w in det["warnings"])


def qemu_command(image: Path, fmt: str, det: dict[str, object], work: Path) -> list[str]:
    """QEMU arguments for the detected firmware and disk bus."""
    cmd = ["qemu-system-x86_64", *choose_accel("auto").qemu_args, "-m", "1024", "-smp", "1",
           "-machine", "q35", "-nodefaults", "-display", "none",
           "-serial", f"file:{work / 'serial.log'}"]
    if det["firmware"] == "uefi":
        shutil.copyfile(OVMF_VARS, work / "vars.fd")
        cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={work / 'vars.fd'}"]
    cmd += ["-drive", f"file={image},format={fmt},if=none,id=d0"]
    if det["disk_bus"] == "virtio":
        cmd += ["-device", "virtio-blk-pci,drive=d0"]
    else:
        cmd += ["-device", "ide-hd,drive=d0,bus=ide.0"]  # q35's AHCI controller
    return cmd


def test_p2v_image_boots_to_login(block_device: Path, tmp_path: Path) -> None:
    out = tmp_path / "imported.vhdx"
    hvdisk("p2v", "-q", block_device, out, "--to", "vhdx")
    det = json.loads(hvdisk("detect", "--json", out).stdout)
    proc = subprocess.Popen(qemu_command(out, "vhdx", det, tmp_path),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    log = tmp_path / "serial.log"
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and b"p2vguest login:" in log.read_bytes():
                break
            time.sleep(1)
        text = log.read_bytes().decode(errors="replace") if log.exists() else ""
        assert "p2vguest login:" in text, text[-2000:]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    hvdisk("check", out)
