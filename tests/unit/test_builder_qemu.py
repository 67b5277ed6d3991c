"""How `corehost boot`/`test` start QEMU for each output (disk on virtio or USB, BIOS or
UEFI, PXE bundle, extra disks, host config), which flag combinations they refuse, and
that power-off always ends QEMU."""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from builder import cli, qemu
from hvagent.host.formats import DiskFormat


def _pub_key(tmp_path: Path, comment: str = "test") -> Path:
    # A well-formed ed25519 public key (the host config checks the key's structure).
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))
    pub = tmp_path / f"{comment}.pub"
    pub.write_text(f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}\n")
    return pub


def _raw(path: Path, size: str = "1M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), size], check=True,
                   timeout=60)
    return path


def _arg_after(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == flag]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A PXE bundle's shape: the entry files of both firmwares and a boot file."""
    d = tmp_path / "pxe"
    (d / "grub").mkdir(parents=True)
    (d / "boot.ipxe").write_text("#!ipxe\nchain --autofree site.ipxe ||\nboot\n")
    (d / "grubnetx64.efi").write_bytes(b"MZ")
    (d / "grub" / "grub.cfg").write_text("source $prefix/site.cfg\n")
    (d / "p.vmlinuz").write_bytes(b"kernel")
    (d / "site.ipxe").write_text("#!ipxe\nset corehost_append stale\n")  # replaced
    return d


def test_command_for_a_test_boot(tiny_qcow2: Path, tmp_path: Path) -> None:
    pub = _pub_key(tmp_path)
    m = qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg", ssh_key=pub, snapshot=True,
                                      no_reboot=True, memory=1024, cpus=1))
    cmd = m.command()
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64"
    assert "-accel tcg,thread=multi -cpu qemu64,+svm" in joined  # from hvagent.host.kvm
    assert "-m 1024 -smp 1" in joined
    assert f"hostfwd=tcp:127.0.0.1:{m.ssh_port}-:22" in joined
    # The image's writes are dropped per drive, not with -snapshot (extra disks keep theirs).
    assert _arg_after(cmd, "-drive") == [
        f"file={tiny_qcow2},format=qcow2,if=virtio,snapshot=on,cache=unsafe"]
    assert "-snapshot" not in cmd and "-no-reboot" in cmd
    assert "-machine" not in cmd and "if=pflash" not in joined  # BIOS: QEMU's default
    assert _arg_after(cmd, "-device") == ["virtio-net-pci,netdev=net0", "virtio-rng-pci"]
    assert f"-serial file:{m.serial_log}" in joined
    # The key reaches the guest inside a host config document on fw_cfg.
    assert _arg_after(cmd, "-fw_cfg") == [f"name=opt/corehost/config,file={m.config_path}"]
    m.prepare()
    doc = yaml.safe_load(m.config_path.read_text())
    assert doc == {"version": 1, "users": [{"name": "root",
                                            "ssh_authorized_keys": [pub.read_text().strip()]}]}
    # the forwarded port was free when chosen
    with socket.socket() as s:
        s.bind(("127.0.0.1", m.ssh_port))
    m.poweroff()


def test_plain_boot_writes_through_and_has_no_document(tiny_qcow2: Path) -> None:
    m = qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg"))
    cmd = m.command()
    assert "-snapshot" not in cmd and "-fw_cfg" not in cmd
    assert _arg_after(cmd, "-drive") == [f"file={tiny_qcow2},format=qcow2,if=virtio"]
    assert m.booted() == {"firmware": "bios", "usb": False, "pxe": None, "format": "qcow2",
                          "disks": [], "config": False}


def test_config_merged_with_the_key(tiny_qcow2: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "host.yaml"
    cfg.write_text("version: 1\nhostname: kvm-07\ntime: {servers: [ntp.example.org]}\n")
    pub = _pub_key(tmp_path)
    m = qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg", config=cfg, ssh_key=pub))
    m.prepare()
    doc = yaml.safe_load(m.config_path.read_text())
    assert doc["hostname"] == "kvm-07" and doc["time"] == {"servers": ["ntp.example.org"]}
    assert doc["users"] == [{"name": "root", "ssh_authorized_keys": [pub.read_text().strip()]}]
    assert "network" not in doc and "agent" not in doc  # no defaults added to the document
    assert m.booted()["config"] is True


def test_uefi_has_ovmf_and_its_own_variables(tiny_qcow2: Path) -> None:
    machines = [qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg",
                                              firmware=qemu.Firmware.UEFI)) for _ in range(2)]
    cmd = machines[0].command()
    assert _arg_after(cmd, "-drive")[:2] == [
        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        f"if=pflash,format=raw,file={machines[0].vars_path}"]
    for m in machines:
        m.prepare()
        assert m.vars_path.read_bytes() == qemu.OVMF_VARS.read_bytes()
    assert machines[0].vars_path != machines[1].vars_path  # a copy per boot
    assert machines[0].booted()["firmware"] == "uefi"


def test_usb_stick_on_xhci(tiny_qcow2: Path) -> None:
    m = qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg", usb=True, snapshot=True))
    cmd = m.command()
    assert _arg_after(cmd, "-drive") == [
        f"file={tiny_qcow2},format=qcow2,if=none,id=stick,snapshot=on,cache=unsafe"]
    assert _arg_after(cmd, "-device")[:2] == [
        "qemu-xhci,id=xhci", "usb-storage,bus=xhci.0,drive=stick,bootindex=1"]
    assert "if=virtio" not in " ".join(cmd)
    assert m.booted()["usb"] is True


@pytest.mark.parametrize(("label", "qemu_name"), [("raw", "raw"), ("qcow2", "qcow2"),
                                                  ("vhd", "vpc"), ("vhdx", "vhdx")])
def test_format_overrides_detection(tmp_path: Path, label: str, qemu_name: str) -> None:
    image = _raw(tmp_path / "disk.img")  # qemu-img would call it raw
    m = qemu.Machine(qemu.BootOptions(image, accel="tcg", format=DiskFormat(label)))
    assert _arg_after(m.command(), "-drive") == [f"file={image},format={qemu_name},if=virtio"]
    assert m.booted()["format"] == label


def test_extra_disks_keep_their_writes(tiny_qcow2: Path, tmp_path: Path) -> None:
    data = _raw(tmp_path / "data,1.img")  # a comma: doubled inside QEMU's option list
    m = qemu.Machine(qemu.BootOptions(tiny_qcow2, accel="tcg", disks=[data], snapshot=True))
    drives = _arg_after(m.command(), "-drive")
    assert drives == [f"file={tiny_qcow2},format=qcow2,if=virtio,snapshot=on,cache=unsafe",
                      f"file={tmp_path}/data,,1.img,format=raw,if=virtio"]
    assert m.booted()["disks"] == [str(data.resolve())]


def test_pxe_under_bios(bundle: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "host.yaml"
    cfg.write_text("version: 1\nhostname: kvm-07\n")
    m = qemu.Machine(qemu.BootOptions(pxe=bundle, accel="tcg", config=cfg,
                                      append="console=ttyS0 x=1"))
    try:
        port = m.http_port
        cmd = m.command()
        assert not any(a.startswith("file=") for a in _arg_after(cmd, "-drive"))  # no disk
        assert _arg_after(cmd, "-netdev") == [
            f"user,id=net0,tftp={m.served},bootfile=http://10.0.2.2:{port}/boot.ipxe,"
            f"hostfwd=tcp:127.0.0.1:{m.ssh_port}-:22"]
        assert _arg_after(cmd, "-device")[0] == "virtio-net-pci,netdev=net0,bootindex=0"
        assert "-fw_cfg" not in cmd  # the document goes over HTTP
        m.prepare()
        served_doc = (m.served / "host-config.yaml").read_bytes()
        assert yaml.safe_load(served_doc) == {"version": 1, "hostname": "kvm-07"}
        digest = hashlib.sha256(served_doc).hexdigest()
        assert (m.served / "site.ipxe").read_text() == (
            "#!ipxe\nset corehost_append corehost.config=http://10.0.2.2:"
            f"{port}/host-config.yaml corehost.config_sha256={digest} console=ttyS0 x=1\n")
        # every bundle file is there, as a link to the bundle's own
        assert (m.served / "p.vmlinuz").resolve() == (bundle / "p.vmlinuz").resolve()
        assert (m.served / "grub" / "grub.cfg").is_symlink()
        assert m.booted()["pxe"] == str(bundle.resolve()) and m.booted()["format"] is None
        # served over HTTP on the loopback port the guest reaches as 10.0.2.2
        assert m.http is not None
        m.http.start()
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/p.vmlinuz", timeout=10) as r:
            assert r.read() == b"kernel"
        with urllib.request.urlopen(f"{url}/host-config.yaml", timeout=10) as r:
            assert hashlib.sha256(r.read()).hexdigest() == digest
    finally:
        m.poweroff()
    with socket.socket() as s:  # the server is gone with the machine
        assert s.connect_ex(("127.0.0.1", port)) != 0
    # and so are the served files and the document; only the serial log may stay
    assert not m.served.exists() and not m.config_path.exists()


def test_pxe_under_uefi(bundle: Path) -> None:
    m = qemu.Machine(qemu.BootOptions(pxe=bundle, accel="tcg", firmware=qemu.Firmware.UEFI,
                                      append='say="$x" \\ok'))
    try:
        assert f"tftp={m.served},bootfile=grubnetx64.efi," in _arg_after(m.command(),
                                                                           "-netdev")[0]
        m.prepare()
        assert (m.served / "grub" / "site.cfg").read_text() == (
            f"set corehost_base=(http,10.0.2.2:{m.http_port})\n"
            'set corehost_append="say=\\"\\$x\\" \\\\ok"\n')
        # no document, so nothing but --append on the command line
        assert (m.served / "site.ipxe").read_text() == '#!ipxe\nset corehost_append say="$x" \\ok\n'
        assert not (m.served / "host-config.yaml").exists()
    finally:
        m.poweroff()


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("corehost: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def test_missing_image_and_key_are_usage_errors(tmp_path: Path, tiny_qcow2: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _error(capsys, ["boot", str(tmp_path / "nope.qcow2"), "--accel", "tcg"]) == (
        f"corehost: {tmp_path / 'nope.qcow2'}: no such image")
    assert "--ssh-key" in _error(capsys, ["boot", str(tiny_qcow2), "--ssh-key",
                                          str(tmp_path / "k.pub")])
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 AAAA test\n")
    assert f"--ssh-key {bad}: " in _error(capsys, ["boot", str(tiny_qcow2), "--ssh-key",
                                                   str(bad)])
    with pytest.raises(SystemExit) as e:
        cli.main(["boot", str(tiny_qcow2), "--memory", "lots"])
    assert e.value.code == 2


@pytest.mark.parametrize("command", ["boot", "test"])
def test_bad_combinations_are_one_line(command: str, tmp_path: Path, tiny_qcow2: Path,
                                       bundle: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    img = str(tiny_qcow2)
    pxe = str(bundle)
    empty = tmp_path / "empty"
    empty.mkdir()
    only_ipxe = tmp_path / "only-ipxe"
    only_ipxe.mkdir()
    (only_ipxe / "boot.ipxe").write_text("#!ipxe\n")
    bad_doc = tmp_path / "v2.yaml"
    bad_doc.write_text("version: 2\n")
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("version: [1\n")
    cases: list[tuple[list[str], str]] = [
        ([], "give either an IMAGE or --pxe DIR"),
        ([img, "--pxe", pxe], "give an IMAGE or --pxe DIR, not both"),
        (["--pxe", pxe, "--usb"], "--usb is for a disk image, not for --pxe"),
        (["--pxe", pxe, "--format", "raw"], "--format is for a disk image, not for --pxe"),
        ([img, "--append", "x=1"], "--append is only for --pxe"),
        (["--pxe", pxe, "--append", "x=1\nshell"], "--append: control characters"),
        (["--pxe", str(tmp_path / "nope")], f"--pxe {tmp_path / 'nope'}: no such directory"),
        (["--pxe", str(empty)], f"--pxe {empty}: no boot.ipxe in it"),
        (["--pxe", str(only_ipxe), "--firmware", "uefi"],
         f"--pxe {only_ipxe}: no grubnetx64.efi in it"),
        ([img, "--disk", str(tmp_path / "d.img")], f"--disk {tmp_path / 'd.img'}: no such"),
        ([img, "--disk", img], f"--disk {img}: already attached"),
        ([img, "--disk", str(tmp_path / "data.img"), "--disk", str(tmp_path / "data.img")],
         "already attached"),
        ([img, "--config", str(tmp_path / "c.yaml")], f"--config {tmp_path / 'c.yaml'}: no such"),
        ([img, "--config", str(bad_doc)], f"{bad_doc}: version: "),
        ([img, "--config", str(not_yaml)], f"{not_yaml}: line "),
    ]
    _raw(tmp_path / "data.img")
    for argv, message in cases:
        err = _error(capsys, [command, *argv, "--accel", "tcg"])
        assert message in err, (argv, err)


def test_argparse_refuses_unknown_firmware_and_format(tiny_qcow2: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in (("--firmware", "efi"), ("--format", "vmdk")):
        with pytest.raises(SystemExit) as e:
            cli.main(["boot", str(tiny_qcow2), flag, value])
        assert e.value.code == 2
        assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err


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
