"""Real test disks for hvdisk tests: an EFI system partition (FAT, made with mtools)
and an ext4 root (made with `mke2fs -d` from a tree with known content and tricky
symlinks), inside an MBR or GPT (sfdisk), converted to qcow2 / raw / VHD / VHDX."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
DISK_SIZE = 64 * MiB
ESP_START, ESP_SIZE = 1 * MiB, 16 * MiB
ROOT_START = ESP_START + ESP_SIZE
ROOT_SIZE = DISK_SIZE - ROOT_START - 1 * MiB  # leave room for the backup GPT
FORMATS = ("qcow2", "raw", "vhd", "vhdx")
QEMU_FMT = {"vhd": "vpc"}
MTOOLS_ENV = {**os.environ, "MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1"}

# Guest content: path -> bytes. Binary content proves byte-exact round trips.
FILES = {
    "etc/hostname": b"guest-one\n",
    "etc/motd": b"welcome\n",
    "usr/lib/os-release": b"ID=test\n",
    "usr/share/blob.bin": bytes(range(256)) * 1024 + b"tail",
    "home/user/notes with space.txt": b"spaces ok\n",
    # Enough entries to fill the directory's blocks: a new name needs the dir to grow.
    **{f"var/full/entry-with-a-long-name-{i:03d}.conf": b"%d\n" % i for i in range(150)},
}
# Symlinks: absolute, relative, one that climbs above the root, a loop, a dangling one.
SYMLINKS = {
    "lib": "usr/lib",
    "etc/abs-hostname": "/etc/hostname",
    "etc/escape": "../../../../../../etc/hostname",
    "etc/escape-dir": "../../../../..",
    "loop-a": "loop-b",
    "loop-b": "loop-a",
    "etc/dangling": "/etc/created-by-dangling",
    "etc/long": "/etc/.." * 10 + "/etc/motd",  # too long for the inode: a slow symlink
}
ESP_FILES = {
    "EFI/BOOT/BOOTX64.EFI": b"MZ-not-really-an-efi-binary" * 100,
    "EFI/debian/grub.cfg": b"set root=(hd0,gpt2)\n",
}


@dataclass(frozen=True)
class TestDisk:
    path: Path
    fmt: str
    scheme: str

    def sha256(self) -> str:
        return sha256(self.path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def run(*cmd: str | Path, env: dict[str, str] | None = None, input: bytes | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, env=env,
                          input=input, timeout=60)


def make_tree(root: Path) -> Path:
    tree = root / "rootfs"
    for rel, data in FILES.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    for rel, target in SYMLINKS.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tree / rel)
    (tree / "etc/hostname").chmod(0o644)
    return tree


def make_raw(work: Path, scheme: str) -> Path:
    """A raw disk with partition 1 = ESP (FAT16) and partition 2 = ext4 root."""
    work.mkdir(parents=True, exist_ok=True)
    raw = work / f"disk-{scheme}.raw"
    with raw.open("wb") as fh:
        fh.truncate(DISK_SIZE)
    s = 512
    if scheme == "gpt":
        table = (f"label: gpt\nstart={ESP_START // s}, size={ESP_SIZE // s}, "
                 "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
                 f"start={ROOT_START // s}, size={ROOT_SIZE // s}, "
                 "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    else:
        table = (f"label: dos\nstart={ESP_START // s}, size={ESP_SIZE // s}, type=ef\n"
                 f"start={ROOT_START // s}, size={ROOT_SIZE // s}, type=83, bootable\n")
    run("sfdisk", "-q", raw, input=table.encode())
    tree = make_tree(work / f"tree-{scheme}")
    run("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, "-E", f"offset={ROOT_START}", raw,
        f"{ROOT_SIZE // 1024}k")
    esp = f"{raw}@@{ESP_START}"
    run("mformat", "-i", esp, "-T", str(ESP_SIZE // s), "-h", "64", "-s", "32", "-v", "ESP",
        "::", env=MTOOLS_ENV)
    host = work / f"esp-{scheme}"
    for rel, data in ESP_FILES.items():
        (host / rel).parent.mkdir(parents=True, exist_ok=True)
        (host / rel).write_bytes(data)
    for d in ("EFI", "EFI/BOOT", "EFI/debian"):
        run("mmd", "-i", esp, f"::/{d}", env=MTOOLS_ENV)
    for rel in ESP_FILES:
        run("mcopy", "-i", esp, host / rel, f"::/{rel}", env=MTOOLS_ENV)
    return raw


def convert(raw: Path, fmt: str, dest: Path) -> Path:
    if fmt == "raw":
        shutil.copyfile(raw, dest)
        return dest
    opts = ["-o", "force_size=on"] if fmt == "vhd" else []
    run("qemu-img", "convert", "-f", "raw", "-O", QEMU_FMT.get(fmt, fmt), *opts, raw, dest)
    return dest


def ext_clean(image: Path, fmt: str, work: Path) -> subprocess.CompletedProcess[bytes]:
    """e2fsck -fn on the root partition, through an independent raw conversion."""
    raw = work / f"fsck-{image.name}.raw"
    run("qemu-img", "convert", "-f", QEMU_FMT.get(fmt, fmt), "-O", "raw", image, raw)
    try:
        return subprocess.run(["e2fsck", "-fn", f"{raw}?offset={ROOT_START}"],
                              capture_output=True, check=False, timeout=60)
    finally:
        raw.unlink()


def qemu_img_check_ok(image: Path, fmt: str) -> bool:
    """qemu-img check (no corruptions; it has no check for VHD or raw, exit 63)."""
    proc = subprocess.run(["qemu-img", "check", "-f", QEMU_FMT.get(fmt, fmt), str(image)],
                          capture_output=True, check=False, timeout=60)
    return proc.returncode == 0 or (proc.returncode == 63 and fmt in ("vhd", "raw"))


# -- a bootable "physical" disk for P2V ------------------------------------------------------
P2V_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do insmod "/modules/$m" 2>/dev/null; done
root=$(sed -n 's/.*root=\([^ ]*\).*/\1/p' /proc/cmdline)
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /newroot
mount -t ext4 "$root" /newroot || { echo "P2V-INITRD cannot mount $root"; sh; }
for fs in dev proc sys; do mount --move /$fs /newroot/$fs; done
exec switch_root /newroot /sbin/init
"""
INITTAB = """::sysinit:/bin/hostname -F /etc/hostname
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
"""


def _initramfs(work: Path, modules: tuple[str, ...]) -> bytes:
    import tinyguest

    _kernel, moddir = tinyguest.find_kernel()
    root = work / "initramfs"
    for d in ("bin", "proc", "sys", "dev", "modules", "newroot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    names = []
    for mod in tinyguest.resolve_modules(moddir, modules):
        name = f"{mod.name.split('.ko')[0]}.ko"  # load order is in modules.list
        (root / "modules" / name).write_bytes(tinyguest._read_module(mod))
        names.append(name)
    (root / "modules.list").write_text("\n".join(names) + "\n")
    (root / "init").write_text(P2V_INIT)
    (root / "init").chmod(0o755)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                          input="\n".join(files).encode(), capture_output=True,
                          check=True, timeout=60).stdout
    return run("zstd", "-q", "-c", input=cpio).stdout  # Debian's default compression


def make_physical_disk(work: Path, *, uefi: bool = True, virtio: bool = True) -> Path:
    """A bootable Linux disk as it would come off a physical machine: GPT + ESP (kernel,
    initrd and a UEFI shell startup script) + ext4 root with busybox and a getty on the
    serial line, or with uefi=False an MBR disk with only the root (not bootable here,
    for detection). virtio=False leaves the virtio drivers out of the initramfs."""
    import tinyguest

    work.mkdir(parents=True, exist_ok=True)
    kernel, moddir = tinyguest.find_kernel()
    version = moddir.name
    # ext4 needs crc32c, a soft dependency that modules.dep does not list.
    mods = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4") if virtio else (
        "ahci", "crc32c_generic", "ext4")
    initrd = _initramfs(work, mods)
    rootfs = work / "rootfs"
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "boot", "root", "tmp",
              f"lib/modules/{version}"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    for tool in ("sh", "mount", "hostname", "getty", "login", "sed", "ls"):
        os.symlink("busybox", rootfs / "bin" / tool)
    os.symlink("../bin/busybox", rootfs / "sbin/init")
    os.symlink("../bin/busybox", rootfs / "sbin/getty")
    (rootfs / "etc/inittab").write_text(INITTAB)
    (rootfs / "etc/hostname").write_text("p2vguest\n")
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/os-release").write_text("ID=p2vtest\n")
    (rootfs / f"boot/initrd.img-{version}").write_bytes(initrd)
    shutil.copy2(kernel, rootfs / f"boot/vmlinuz-{version}")
    shutil.copy2(moddir / "modules.builtin", rootfs / f"lib/modules/{version}/modules.builtin")
    size, esp_size = 160 * MiB, 48 * MiB
    raw = work / "physical.raw"
    with raw.open("wb") as fh:
        fh.truncate(size)
    root_start = ESP_START + esp_size if uefi else ESP_START
    root_size = size - root_start - MiB
    s = 512
    if uefi:
        table = (f"label: gpt\nstart={ESP_START // s}, size={esp_size // s}, "
                 "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
                 f"start={root_start // s}, size={root_size // s}, "
                 "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    else:
        table = f"label: dos\nstart={root_start // s}, size={root_size // s}, type=83\n"
    run("sfdisk", "-q", raw, input=table.encode())
    run("mke2fs", "-q", "-F", "-t", "ext4", "-d", rootfs, "-E", f"offset={root_start}", raw,
        f"{root_size // 1024}k")
    if uefi:
        esp = f"{raw}@@{ESP_START}"
        run("mformat", "-i", esp, "-T", str(esp_size // s), "-h", "64", "-s", "32", "::",
            env=MTOOLS_ENV)
        (work / "initrd.img").write_bytes(initrd)
        # No \EFI\BOOT\BOOTX64.EFI: OVMF falls back to its shell, which runs startup.nsh.
        (work / "startup.nsh").write_text(
            "fs0:\r\n\\EFI\\linux\\vmlinuz.efi initrd=\\EFI\\linux\\initrd.img "
            # no_timer_check: the IO-APIC timer check fails on a busy host under TCG.
            "root=/dev/vda2 console=ttyS0 rw quiet no_timer_check\r\n")
        for d in ("EFI", "EFI/linux"):
            run("mmd", "-i", esp, f"::/{d}", env=MTOOLS_ENV)
        run("mcopy", "-i", esp, kernel, "::/EFI/linux/vmlinuz.efi", env=MTOOLS_ENV)
        run("mcopy", "-i", esp, work / "initrd.img", "::/EFI/linux/initrd.img", env=MTOOLS_ENV)
        run("mcopy", "-i", esp, work / "startup.nsh", "::/startup.nsh", env=MTOOLS_ENV)
    shutil.rmtree(rootfs)
    shutil.rmtree(work / "initramfs")
    return raw
