"""The PXE bundle: what a TFTP/HTTP server serves so that a host boots diskless.

From one DIB run (the `pxe` element): the image's kernel and initramfs (DIB's
`baremetal` element copies them out) and its root as a squashfs (the element's
cleanup.d). The root travels as a second initrd, `<name>.rootfs.cpio`, a newc cpio that
holds `corehost/root.squashfs`: the kernel unpacks it beside the initramfs, whose
`boot=corehost` script runs it from RAM under a tmpfs overlay. So the boot loader does
all the fetching and the initramfs needs no NIC driver, firmware, DHCP or HTTP client.

Two boot loaders, both with the profile's kernel command line:
- `boot.ipxe`, an iPXE script (BIOS or UEFI iPXE; paths are relative to the script's
  own URL, so serving this directory over HTTP is enough);
- `grubnetx64.efi` + `grub/grub.cfg`, GRUB's network boot for UEFI firmware that loads
  a bootfile over TFTP (GRUB reads grub/grub.cfg from the same server).
`undionly.kpxe` and `snponly.efi` (Debian's ipxe) are there to chainload iPXE from a
firmware PXE ROM. A server adds its own settings without editing the shipped files:
`site.ipxe` beside boot.ipxe may `set corehost_append ...`; `grub/site.cfg` may set
`corehost_base` (e.g. `(http,192.0.2.1:8080)`, much faster than TFTP) and
`corehost_append` (e.g. `corehost.config=URL`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from hvagent.host import run

# Where the diskless root sits inside the cpio (the initramfs script's path, minus /).
ROOT_IN_CPIO = "corehost/root.squashfs"
# Kernel arguments every diskless boot needs; the profile's kernel_cmdline follows.
BASE_CMDLINE = "boot=corehost console=tty0 console=ttyS0,115200 nofb nomodeset"
IPXE_DIR = Path("/usr/lib/ipxe")
IPXE_LOADERS = ("undionly.kpxe", "snponly.efi")
GRUB_EFI_MODULES = ("efinet", "tftp", "http", "net", "normal", "linux", "configfile", "echo",
                    "serial", "terminal", "test", "sleep", "search", "ls", "cat", "halt",
                    "reboot", "minicmd", "true")
# Packing a few hundred MiB on a slow disk; building the GRUB image.
PACK_TIMEOUT = 900.0
GRUB_TIMEOUT = 120.0


class PxeError(Exception):
    pass


def cmdline(extra: str) -> str:
    return f"{BASE_CMDLINE} {extra}".strip()


def boot_ipxe(name: str, extra_cmdline: str) -> str:
    k, i, r = f"{name}.vmlinuz", f"{name}.initrd", f"{name}.rootfs.cpio"
    return f"""#!ipxe
# corehost {name}: diskless boot. Serve this directory over HTTP (or TFTP) and chain
# this script: the paths below are relative to where it was loaded from. A site.ipxe
# beside it may `set corehost_append ...` (kernel arguments, e.g. corehost.config=URL).
echo corehost {name}: loading the diskless host
chain --autofree site.ipxe || echo corehost: no site.ipxe, shipped settings only
kernel {k} initrd={i} initrd={r} {cmdline(extra_cmdline)} ${{corehost_append}}
initrd {i}
initrd {r}
boot
"""


def grub_cfg(name: str, extra_cmdline: str) -> str:
    k, i, r = f"{name}.vmlinuz", f"{name}.initrd", f"{name}.rootfs.cpio"
    return f"""# corehost {name}: diskless boot through GRUB's network boot (grubnetx64.efi).
# Files load from the server GRUB itself came from (TFTP) unless grub/site.cfg sets
# corehost_base, e.g. `set corehost_base=(http,192.0.2.1:8080)`; corehost_append adds
# kernel arguments (e.g. corehost.config=URL).
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
set corehost_base="($root)"
# GRUB cannot test -f over TFTP: a missing site.cfg only prints "file not found".
source "$prefix/site.cfg"
menuentry "corehost {name} (diskless)" {{
    echo "corehost {name}: loading the diskless host from $corehost_base"
    linux "$corehost_base/{k}" {cmdline(extra_cmdline)} $corehost_append
    initrd "$corehost_base/{i}" "$corehost_base/{r}"
}}
"""


def make_grub_netboot(target: Path) -> None:
    """GRUB for x86_64-efi with its network modules built in; prefix /grub on the server
    it booted from."""
    try:
        run.run(["grub-mkimage", "-O", "x86_64-efi", "-o", target, "-p", "/grub",
                 *GRUB_EFI_MODULES], timeout=GRUB_TIMEOUT, what="grub-mkimage")
    except run.ProcessFailed as e:
        raise PxeError(f"{e} (Debian: apt-get install grub-efi-amd64-bin)") from None


def pack_rootfs(squashfs: Path, target: Path) -> None:
    """The squashfs as a newc cpio at ROOT_IN_CPIO, owned by root."""
    stage = target.parent / ".rootfs-cpio"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / Path(ROOT_IN_CPIO).parent).mkdir(parents=True)
    os.link(squashfs, stage / ROOT_IN_CPIO)
    names = f"{Path(ROOT_IN_CPIO).parent}\n{ROOT_IN_CPIO}\n".encode()
    try:
        with open(target, "wb") as out:
            run.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], input=names,
                    cwd=stage, stdout=out, timeout=PACK_TIMEOUT, what="cpio")
    except run.ProcessFailed as e:
        raise PxeError(str(e)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def make_bundle(name: str, extra_cmdline: str, dib_base: Path, dest: Path) -> dict[str, Any]:
    """Write the bundle into dest (a new directory); returns the manifest's `pxe` entry:
    every file with its role, and what a server must serve."""
    parts = {"kernel": Path(f"{dib_base}.vmlinuz"), "initrd": Path(f"{dib_base}.initrd"),
             "squashfs": Path(f"{dib_base}.rootfs.squashfs")}
    for role, path in parts.items():
        if not path.is_file():
            raise PxeError(f"pxe: the build left no {role} ({path.name}); is the pxe "
                           f"element in the build?")
    dest.mkdir()
    (dest / "grub").mkdir()
    files = {
        "kernel": f"{name}.vmlinuz", "initrd": f"{name}.initrd",
        "rootfs": f"{name}.rootfs.cpio", "ipxe_script": "boot.ipxe",
        "grub_efi": "grubnetx64.efi", "grub_cfg": "grub/grub.cfg",
    }
    shutil.copyfile(parts["kernel"], dest / files["kernel"])
    shutil.copyfile(parts["initrd"], dest / files["initrd"])
    pack_rootfs(parts["squashfs"], dest / files["rootfs"])
    (dest / files["ipxe_script"]).write_text(boot_ipxe(name, extra_cmdline))
    (dest / files["grub_cfg"]).write_text(grub_cfg(name, extra_cmdline))
    make_grub_netboot(dest / files["grub_efi"])
    for loader in IPXE_LOADERS:
        src = IPXE_DIR / loader
        if not src.is_file():
            raise PxeError(f"pxe: {src} missing (Debian: apt-get install ipxe)")
        shutil.copyfile(src, dest / loader)
        files[loader.replace(".", "_")] = loader
    return {
        "dir": dest.name,
        "files": files,
        "kernel_cmdline": cmdline(extra_cmdline),
        "serve": {
            "http": f"everything in {dest.name}/ (boot.ipxe loads the rest by relative path)",
            "tftp": ["grubnetx64.efi", "grub/grub.cfg", "undionly.kpxe", "snponly.efi"],
            "dhcp_bootfile": {"bios": "undionly.kpxe, then boot.ipxe for iPXE clients",
                              "uefi": "grubnetx64.efi (or snponly.efi, then boot.ipxe)"},
            "site_files": ["site.ipxe", "grub/site.cfg"],
        },
    }
