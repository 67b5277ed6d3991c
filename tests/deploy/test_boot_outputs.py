"""Every output of the ci profile boots: the qcow2 under BIOS runs the whole image suite,
every other output the smoke and deployment checks: the USB stick under
SeaBIOS and OVMF (with its COREHOST-CFG partition filled by mtools, on a stick larger
than the image), the PXE bundle diskless under BIOS (iPXE) and UEFI (GRUB) with a host
config fetched over HTTP and a COREHOST-DATA disk kept across two boots, the VHD and
VHDX; the default server-core image lets root in with `corehost boot --ssh-key`; and a
host config that fails its schema is reported on the console with nothing applied."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from deploy_support import REPO, corehost_test, out_dir

STICK_SIZE = 4 * 2**30  # larger than the image's 3 GiB: the root must grow into it


def run(*argv: str, timeout: float = 120) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=timeout).stdout


def stick(ci: Path, tmp_path: Path, document: dict | str | None) -> Path:
    """A copy of the usb image on a larger 'stick', with corehost.yaml written into its
    COREHOST-CFG partition by mtools (as a user does after write-usb)."""
    path = tmp_path / "stick.img"
    run("cp", "--sparse=always", str(ci / "ci.usb.img"), str(path))
    os.truncate(path, STICK_SIZE)
    run("sgdisk", "-e", str(path))  # the backup GPT header moves to the new end
    if document is not None:
        table = json.loads(run("sfdisk", "--json", str(path)))["partitiontable"]
        cfg = next(p for p in table["partitions"] if p.get("name") == "COREHOST-CFG")
        text = document if isinstance(document, str) else yaml.safe_dump(document)
        doc = tmp_path / "corehost.yaml"
        doc.write_text(text)
        run("mcopy", "-o", "-i", f"{path}@@{cfg['start'] * 512}", str(doc), "::corehost.yaml")
    return path


def keyed(identity: Path, **doc: object) -> dict:
    key = identity.with_suffix(".pub").read_text().strip()
    return {"version": 1, "users": [{"name": "root", "ssh_authorized_keys": [key]}], **doc}


def test_qcow2_passes_the_whole_image_suite(ci: Path, manifest: dict, identity: Path) -> None:
    corehost_test(str(ci / manifest["artifacts"]["qcow2"]["file"]), identity=identity,
                  smoke=False)


def test_pxe_keeps_agent_state_on_a_data_disk(ci: Path, tmp_path: Path, identity: Path) -> None:
    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.truncate(512 * 2**20)
    run("mkfs.ext4", "-q", "-L", "COREHOST-DATA", str(data))
    corehost_test("--pxe", str(ci / "pxe"), "--firmware", "uefi", "--disk", str(data),
                  identity=identity, expect={"vm_create": "kept", "persistent": True})
    corehost_test("--pxe", str(ci / "pxe"), "--disk", str(data), identity=identity,
                  expect={"vm_present": "kept", "persistent": True})


@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_usb_stick_boots_and_applies_its_cfg_partition(
        ci: Path, tmp_path: Path, identity: Path, firmware: str) -> None:
    hostname = f"ci-usb-{firmware}"
    image = stick(ci, tmp_path, keyed(identity, hostname=hostname))
    corehost_test(str(image), "--usb", "--format", "raw", "--firmware", firmware,
                  identity=identity, expect={"hostname": hostname})


def test_pxe_diskless_with_a_host_config_over_http(
        ci: Path, tmp_path: Path, identity: Path) -> None:
    doc = keyed(identity, hostname="ci-pxe", network=[{
        "match": {"name": "en*"}, "addresses": ["10.0.2.15/24", "10.0.2.99/24"],
        "gateway": "10.0.2.2", "dns": ["10.0.2.3"]}])
    config = tmp_path / "host.yaml"
    config.write_text(yaml.safe_dump(doc))
    corehost_test("--pxe", str(ci / "pxe"), "--config", str(config), identity=identity,
                  expect={"hostname": "ci-pxe", "addresses": ["10.0.2.15/24", "10.0.2.99/24"],
                          "persistent": False})


@pytest.mark.parametrize("fmt,firmware", [("vhdx", "uefi"), ("vhd", "bios")])
def test_virtual_hard_disks_pass_the_check_and_boot(
        ci: Path, manifest: dict, identity: Path, fmt: str, firmware: str) -> None:
    image = ci / manifest["artifacts"][fmt]["file"]
    check = subprocess.run([sys.executable, "-m", "hvagent.cli.hvdisk", "check", str(image)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    corehost_test(str(image), "--firmware", firmware, identity=identity)


class Boot:
    """`corehost boot ARGS` in the background, its stderr collected (the ssh port)."""

    def __init__(self, args: list[str], serial: Path) -> None:
        self.serial = serial
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "builder.cli", "boot", *args, "--no-console",
             "--serial-log", str(serial)], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
            # a background job inherits SIGINT ignored; Ctrl-C is how the test stops it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def console(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_for(self, marker: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.console():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"corehost boot exited {self.proc.returncode}: {''.join(self.lines)}")
            time.sleep(1)
        pytest.fail(f"{marker!r} not on the console after {timeout}s:\n{self.console()[-3000:]}")

    @property
    def ssh_port(self) -> int:
        for line in self.lines:
            if m := re.search(r"ssh: ssh .*-p (\d+)", line):
                return int(m.group(1))
        pytest.fail(f"no ssh port in corehost boot's output: {''.join(self.lines)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: the guest is powered off
        rc = self.proc.wait(timeout=240)
        self.reader.join(timeout=10)
        return rc


def ssh(port: int, key: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "IdentitiesOnly=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
         "root@127.0.0.1", command], capture_output=True, text=True, timeout=60)


def test_default_image_lets_root_in_with_an_ssh_key(tmp_path: Path, identity: Path) -> None:
    image = out_dir("server-core") / "server-core.qcow2"
    boot = Boot([str(image), "--snapshot", "--cpus", "1",
                 "--ssh-key", str(identity.with_suffix(".pub"))], tmp_path / "serial.log")
    try:
        boot.wait_for("login:")
        done = ssh(boot.ssh_port, identity, "true")
        for _ in range(30):
            done = ssh(boot.ssh_port, identity, "id -un; systemctl is-active hvagent")
            if done.returncode == 0:
                break
            time.sleep(2)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["root", "active"]
    finally:
        rc = boot.stop()
    assert rc == 0, "".join(boot.lines)


def test_a_bad_host_config_is_reported_and_nothing_of_it_applied(
        ci: Path, tmp_path: Path, identity: Path) -> None:
    # Valid YAML, a hostname that would show in the login prompt, and one bad field.
    bad = keyed(identity, hostname="must-not-apply", time={"servers": ["ntp.example.org"],
                                                          "pool": "x"})
    image = stick(ci, tmp_path, bad)
    boot = Boot([str(image), "--usb", "--format", "raw", "--snapshot", "--cpus", "1"],
                tmp_path / "serial.log")
    try:
        boot.wait_for(" login:")
        console = boot.console()
    finally:
        boot.stop()
    lines = [ln for ln in console.splitlines() if "corehost-firstboot:" in ln]
    assert any("time" in ln and "nothing was applied" in ln for ln in lines), lines
    # The getty's prompt names the running hostname: the image's, not the document's.
    assert "must-not-apply login:" not in console
    assert "debian login:" in console
