"""The boot harness (builder.qemu, behind `corehost boot|test`) against real QEMU under
TCG, with the tiny guest as the booted system: a PXE bundle network-booted under BIOS
(iPXE) and UEFI (OVMF + GRUB), its site files reaching the kernel command line; a host
config document reaching a disk boot's guest through fw_cfg; a UEFI USB stick booted while
the stick stays unchanged and an extra disk keeps the guest's writes.

The bundles here are minimal ones following builder.pxe's contract: boot.ipxe chains
site.ipxe and loads the kernel and initrd by relative paths; grub/grub.cfg sources
grub/site.cfg and loads from $corehost_base. The guest's command line is read from the
kernel's own `Command line:` line on the serial console (what /proc/cmdline holds).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from builder import qemu
from hvagent.host.formats import DiskFormat

sys.path.insert(0, str(Path(__file__).parent))
import tinyguest  # noqa: E402

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 240.0  # TCG on a shared 2-core machine; OVMF alone takes ~15 s
CMDLINE_RE = re.compile(r"Command line: (?P<cmdline>[^\r\n]*)")

BOOT_IPXE = """#!ipxe
chain --autofree site.ipxe ||
kernel tiny.vmlinuz console=ttyS0 ${corehost_append}
initrd tiny.initrd
boot
"""
# `test -f` cannot see files over TFTP (GRUB's tftp has no directory listing), so the
# site file is sourced unconditionally; the harness always writes one.
GRUB_CFG = """serial --unit=0 --speed=115200
terminal_output serial console
set corehost_base=($root)
set corehost_append=
source $prefix/site.cfg
linux $corehost_base/tiny.vmlinuz console=ttyS0 $corehost_append
initrd $corehost_base/tiny.initrd
boot
"""


@pytest.fixture(scope="module")
def bundle(tiny_guest: tinyguest.TinyGuest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("grub-mkimage") is None or not Path("/usr/lib/grub/x86_64-efi").is_dir():
        pytest.skip("grub-mkimage with x86_64-efi modules (grub-efi-amd64-bin) is not here")
    d = tmp_path_factory.mktemp("pxe")
    (d / "grub").mkdir()
    shutil.copyfile(tiny_guest.kernel, d / "tiny.vmlinuz")
    shutil.copyfile(tiny_guest.initrd, d / "tiny.initrd")
    (d / "boot.ipxe").write_text(BOOT_IPXE)
    (d / "grub" / "grub.cfg").write_text(GRUB_CFG)
    subprocess.run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/grub",
                    "-o", str(d / "grubnetx64.efi"), "efinet", "tftp", "http", "net",
                    "normal", "linux", "configfile", "echo", "serial", "terminal", "test",
                    "sleep"], check=True, timeout=120)
    return d


@pytest.fixture()
def host_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "host.yaml"
    cfg.write_text("version: 1\nhostname: kvm-07\n")
    return cfg


def _guest_cmdline(m: qemu.Machine) -> str:
    found = CMDLINE_RE.search(m.serial_log.read_text(errors="replace"))
    assert found, m.serial_tail()
    return found["cmdline"]


@pytest.mark.parametrize("firmware", list(qemu.Firmware))
def test_pxe_boot_gets_the_site_settings(firmware: qemu.Firmware, bundle: Path,
                                         host_config: Path, tmp_path: Path) -> None:
    marker = f"corehost_marker=pxe-{firmware}"
    m = qemu.Machine(qemu.BootOptions(pxe=bundle, accel="tcg", firmware=firmware, memory=512,
                                      cpus=1, config=host_config, no_reboot=True,
                                      append=marker, serial_log=tmp_path / "serial.log"))
    with m:
        m.wait_for_serial(tinyguest.BOOT_MARKER, timeout=BOOT_TIMEOUT)
        cmdline = _guest_cmdline(m)
        # The document the command line names is the one served, with that checksum.
        url = f"http://127.0.0.1:{m.http_port}/host-config.yaml"
        with urllib.request.urlopen(url, timeout=10) as r:
            served = r.read()
    assert b"hostname: kvm-07" in served
    words = cmdline.split()
    assert marker in words
    assert f"corehost.config=http://10.0.2.2:{m.http_port}/host-config.yaml" in words
    assert f"corehost.config_sha256={hashlib.sha256(served).hexdigest()}" in words
    if firmware is qemu.Firmware.UEFI:  # GRUB fetched the kernel over HTTP (site.cfg's base)
        assert f"BOOT_IMAGE=(http,10.0.2.2:{m.http_port})/tiny.vmlinuz" in words


FW_CFG_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
insmod /fwcfg/qemu_fw_cfg.ko
item=/sys/firmware/qemu_fw_cfg/by_name/opt/corehost/config/raw
if [ -e "$item" ]; then
  echo "FWCFG-BEGIN"; cat "$item"; echo "FWCFG-END"
else
  echo "FWCFG-MISSING"
fi
poweroff -f
"""


def _fw_cfg_initrd(tiny_guest: tinyguest.TinyGuest, dest: Path) -> Path:
    """The tiny guest's initramfs with a second archive appended (the kernel unpacks both,
    later files win): the fw_cfg module and an init that prints the config item."""
    _kernel, moddir = tinyguest.find_kernel()
    mods = tinyguest.resolve_modules(moddir, ("qemu_fw_cfg",))
    assert mods and mods[-1].name.startswith("qemu_fw_cfg"), mods
    root = dest / "overlay"
    (root / "fwcfg").mkdir(parents=True)
    (root / "fwcfg" / "qemu_fw_cfg.ko").write_bytes(tinyguest._read_module(mods[-1]))
    (root / "init").write_text(FW_CFG_INIT)
    (root / "init").chmod(0o755)
    files = "\n".join(["fwcfg", "fwcfg/qemu_fw_cfg.ko", "init"]).encode()
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                          stdout=subprocess.PIPE, check=True, timeout=60).stdout
    initrd = dest / "fwcfg-initrd.gz"
    initrd.write_bytes(tiny_guest.initrd.read_bytes() + gzip.compress(cpio))
    return initrd


def test_disk_boot_hands_the_document_over_fw_cfg(tiny_guest: tinyguest.TinyGuest,
                                                 host_config: Path, tmp_path: Path) -> None:
    initrd = _fw_cfg_initrd(tiny_guest, tmp_path)
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True,
                   timeout=60)
    pub = tmp_path / "id.pub"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(pub.with_suffix(""))],
                   check=True, timeout=60)
    # The image is blank: the kernel comes from -kernel, what matters is the fw_cfg item.
    m = qemu.Machine(qemu.BootOptions(
        disk, accel="tcg", memory=512, cpus=1, config=host_config, ssh_key=pub,
        snapshot=True, no_reboot=True, serial_log=tmp_path / "serial.log",
        extra_args=["-kernel", str(tiny_guest.kernel), "-initrd", str(initrd),
                    "-append", "console=ttyS0 quiet"]))
    with m:
        assert m.proc is not None
        assert m.proc.wait(BOOT_TIMEOUT) == 0  # the guest's init powers off when done
    text = m.serial_log.read_text(errors="replace").replace("\r", "")
    assert "FWCFG-BEGIN" in text, text[-2000:]
    got = text.split("FWCFG-BEGIN\n", 1)[1].split("FWCFG-END", 1)[0]
    assert "hostname: kvm-07" in got
    assert pub.read_text().split()[1] in got  # root's key merged into the document
    assert disk.stat().st_size < 1 << 20  # snapshot=on: nothing written to the image


ESP_START = 4096  # sectors; p1 is a BIOS boot partition as in the product's disk
USB_GRUB_CFG = """serial --unit=0 --speed=115200
terminal_output serial console
linux /tiny.vmlinuz console=ttyS0 corehost_marker=usb-uefi tiny_disk_log tiny_poweroff_after=3
initrd /tiny.initrd
boot
"""


def _uefi_stick(tiny_guest: tinyguest.TinyGuest, dest: Path) -> Path:
    """A small GPT disk whose ESP (FAT, written with mtools) holds a GRUB BOOTX64.EFI,
    its grub.cfg and the tiny guest."""
    for tool in ("sgdisk", "mformat", "grub-mkimage"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not here")
    disk = dest / "stick.img"
    with disk.open("wb") as f:
        f.truncate(48 << 20)
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:+1M", "-t", "1:EF02", "-n",
                    f"2:{ESP_START}:0", "-t", "2:EF00", str(disk)], check=True,
                   capture_output=True, timeout=60)
    efi = dest / "BOOTX64.EFI"
    cfg = dest / "grub.cfg"
    cfg.write_text(USB_GRUB_CFG)
    subprocess.run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/BOOT", "-o", str(efi),
                    "part_gpt", "fat", "linux", "normal", "serial", "terminal", "echo",
                    "configfile"], check=True, timeout=120)
    esp = f"{disk}@@{ESP_START * 512}"
    last = (48 << 20) // 512 - 34  # the backup GPT's sectors end the disk
    for argv in (["mformat", "-i", esp, "-T", str(last - ESP_START), "-h", "64", "-s", "32",
                  "-v", "ESP", "::"],
                 ["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"],
                 ["mcopy", "-i", esp, str(efi), str(cfg), "::/EFI/BOOT/"],
                 ["mcopy", "-i", esp, str(tiny_guest.kernel), "::/tiny.vmlinuz"],
                 ["mcopy", "-i", esp, str(tiny_guest.initrd), "::/tiny.initrd"]):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return disk


def test_uefi_usb_stick_with_a_data_disk(tiny_guest: tinyguest.TinyGuest,
                                         tmp_path: Path) -> None:
    stick = _uefi_stick(tiny_guest, tmp_path)
    before = hashlib.sha256(stick.read_bytes()).hexdigest()
    data = tmp_path / "data.raw"
    with data.open("wb") as f:
        f.truncate(1 << 20)
    m = qemu.Machine(qemu.BootOptions(
        stick, accel="tcg", firmware=qemu.Firmware.UEFI, usb=True,
        format=DiskFormat.RAW, disks=[data], memory=512, cpus=1, snapshot=True,
        no_reboot=True, serial_log=tmp_path / "serial.log"))
    with m:
        assert m.proc is not None
        assert m.proc.wait(BOOT_TIMEOUT) == 0, m.serial_tail()  # powered off after 3 lines
    text = m.serial_log.read_text(errors="replace")
    assert tinyguest.BOOT_MARKER in text
    assert "corehost_marker=usb-uefi" in _guest_cmdline(m).split()
    # The guest's only virtio disk is the data disk: its writes are there; the stick's
    # (snapshot=on) never reached the file.
    assert b"TINY-DISK counter=2" in data.read_bytes()
    assert hashlib.sha256(stick.read_bytes()).hexdigest() == before
