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
                          input=input)


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
                              capture_output=True, check=False)
    finally:
        raw.unlink()


def qemu_img_check_ok(image: Path, fmt: str) -> bool:
    """qemu-img check (no corruptions; it has no check for VHD or raw, exit 63)."""
    proc = subprocess.run(["qemu-img", "check", "-f", QEMU_FMT.get(fmt, fmt), str(image)],
                          capture_output=True, check=False)
    return proc.returncode == 0 or (proc.returncode == 63 and fmt in ("vhd", "raw"))
