"""How `corehost boot`/`test` start QEMU, and that power-off always ends QEMU."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from builder import cli, qemu


def test_command_for_a_test_boot(tiny_qcow2: Path, tmp_path: Path) -> None:
    pub = tmp_path / "id.pub"
    pub.write_text("ssh-ed25519 AAAA test\n")
    m = qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg", ssh_key=pub, snapshot=True,
                                      no_reboot=True, memory=1024, cpus=1))
    cmd = m.command()
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64"
    assert "-accel tcg,thread=multi -cpu qemu64,+svm" in joined  # from hvagent.host.kvm
    assert "-m 1024 -smp 1" in joined
    assert f"-fw_cfg name=opt/corehost/authorized_keys,file={pub}" in joined
    assert f"hostfwd=tcp:127.0.0.1:{m.ssh_port}-:22" in joined
    assert f"file={tiny_qcow2},format=qcow2,if=virtio,cache=unsafe" in joined
    assert "-snapshot" in cmd and "-no-reboot" in cmd
    assert f"-serial file:{m.serial_log}" in joined
    # the forwarded port was free when chosen
    with socket.socket() as s:
        s.bind(("127.0.0.1", m.ssh_port))


def test_plain_boot_writes_through_and_has_no_key(tiny_qcow2: Path) -> None:
    cmd = qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg")).command()
    assert "-snapshot" not in cmd and "-fw_cfg" not in cmd
    assert f"file={tiny_qcow2},format=qcow2,if=virtio" in cmd


def test_missing_image_and_key_are_usage_errors(tmp_path: Path, tiny_qcow2: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["boot", str(tmp_path / "nope.qcow2"), "--accel", "tcg"]) == 2
    assert capsys.readouterr().err.strip() == f"corehost: {tmp_path / 'nope.qcow2'}: no such image"
    assert cli.main(["boot", str(tiny_qcow2), "--ssh-key", str(tmp_path / "k.pub")]) == 2
    assert "--ssh-key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["boot", str(tiny_qcow2), "--memory", "lots"])
    assert e.value.code == 2


@pytest.mark.integration
def test_poweroff_ends_a_guest_that_ignores_acpi(tiny_qcow2: Path) -> None:
    # No OS on the disk: the ACPI power button goes unanswered, so QMP quit must end it.
    m = qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg", snapshot=True, memory=128,
                                      cpus=1)).start()
    with pytest.raises(qemu.BootError, match="not on the serial console after 1s"):
        m.wait_for_serial("never printed", timeout=1)
    assert m.running
    assert m.poweroff(timeout=2) == 0  # quit through QMP, not killed
    assert not m.running
    assert not m.qmp_path.exists()
