"""P2V: turning a physical disk (a block device or a raw dump of one) into a VM disk,
and working out how to boot it.

`p2v` reads the source once, hashing every byte read (sha256) and skipping zero runs so
the intermediate copy is sparse, then converts it (qemu-img, sparse) to VHDX or qcow2.
`detect_boot` looks inside the image, read-only: a partition table with an EFI system
partition holding a loader means UEFI, else BIOS; virtio drivers in the guest's
initramfs (or built into its kernel) mean a virtio disk, else an emulated SATA disk
with a warning.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat as st
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hvagent.disk import image as img
from hvagent.disk.errors import DiskError
from hvagent.disk.fs import GuestImage, disk_layout, make_fs
from hvagent.disk.parttable import Partition
from hvagent.disk.progress import Progress, no_progress
from hvagent.disk.volume import Volume
from hvagent.drivers import storage
from hvagent.host.formats import DiskFormat

CHUNK = 4 << 20
SPARSE_GRAIN = 64 << 10
_ZERO = bytes(SPARSE_GRAIN)
VIRTIO_DISK_DRIVERS = ("virtio_blk", "virtio_scsi")


@dataclass(frozen=True)
class P2VResult:
    source: str
    output: str
    format: str
    bytes_read: int
    sha256: str
    virtual_size: int
    actual_size: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _source_size(source: Path) -> int:
    with source.open("rb") as fh:
        return fh.seek(0, os.SEEK_END)


def _mounted(source: Path) -> bool:
    """A block device mounted on this host would be copied while it changes."""
    if not source.is_block_device():
        return False
    rdev = source.stat().st_rdev
    dev = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    parts = {p.name for p in Path(f"/sys/dev/block/{dev}").glob("*") if p.is_dir()}
    devs = {dev} | {Path(f"/sys/dev/block/{dev}/{p}/dev").read_text().strip()
                    for p in parts if Path(f"/sys/dev/block/{dev}/{p}/dev").exists()}
    return any(line.split()[2] in devs for line in mounts if len(line.split()) > 2)


def p2v(source: Path, out: Path, to: DiskFormat, *, progress: Progress = no_progress,
        overwrite: bool = False) -> P2VResult:
    if not source.exists():
        raise DiskError(f"{source}: no such file or device")
    mode = source.stat().st_mode
    if not (st.S_ISBLK(mode) or st.S_ISREG(mode)):
        raise DiskError(f"{source}: not a block device or a raw disk dump")
    if st.S_ISREG(mode) and img.detect_format(source) is not DiskFormat.RAW:
        raise DiskError(f"{source}: is a {img.detect_format(source).label} image, not a raw "
                        "disk; use `hvdisk convert`")
    if _mounted(source):
        raise DiskError(f"{source}: is mounted on this host; unmount it first")
    img.ensure_not_in_use(source)
    if out.exists() and not overwrite:
        raise DiskError(f"{out}: already exists")
    size = _source_size(source)
    if size == 0:
        raise DiskError(f"{source}: is empty")
    digest = hashlib.sha256()
    read = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".p2v-", dir=out.parent) as work:
        raw = Path(work) / "disk.raw"
        with source.open("rb", buffering=0) as src, raw.open("wb") as dst:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                view = memoryview(chunk)
                for off in range(0, len(chunk), SPARSE_GRAIN):
                    piece = view[off : off + SPARSE_GRAIN]
                    if piece == _ZERO[: len(piece)]:
                        dst.seek(len(piece), os.SEEK_CUR)  # leave a hole
                    else:
                        dst.write(piece)
                read += len(chunk)
                progress(0.8 * read / size)
            dst.truncate(read)
        if read != size:
            raise DiskError(f"{source}: read {read} of {size} bytes")
        if to is DiskFormat.RAW:
            os.replace(raw, out)
        else:
            img.convert(raw, out, to, src_format=DiskFormat.RAW, overwrite=overwrite,
                        progress=lambda d: progress(0.8 + 0.2 * d))
    info = img.image_info(out, to)
    progress(1.0)
    return P2VResult(str(source), str(out), to.label, read, digest.hexdigest(),
                     info.virtual_size, info.actual_size)


# -- boot detection ---------------------------------------------------------------------
def _decompress(data: bytes) -> bytes | None:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00" or data[:3] == b"\x5d\x00\x00":
        return lzma.decompress(data)
    tools = {b"\x28\xb5\x2f\xfd": "zstd", b"\x02\x21\x4c\x18": "lz4", b"BZh": "bzip2",
             b"\x89LZO": "lzop"}
    for magic, tool in tools.items():
        if data.startswith(magic):
            if shutil.which(tool) is None:
                raise DiskError(f"initramfs is {tool}-compressed and {tool} is not installed")
            done = storage.tool([tool, "-dc"], "read the initramfs", input=data)
            # zstd/lz4 complain about trailing padding after the frame; keep what decoded.
            return done.stdout or None
    return None


def initramfs_names(data: bytes, depth: int = 0) -> list[str]:
    """File names in an initramfs: concatenated newc cpio archives (early microcode,
    then the main one), each possibly compressed."""
    names: list[str] = []
    pos = 0
    while pos < len(data):
        magic = data[pos : pos + 6]
        if magic in (b"070701", b"070702"):
            hdr = data[pos : pos + 110]
            if len(hdr) < 110:
                break
            filesize, namesize = int(hdr[54:62], 16), int(hdr[94:102], 16)
            name = data[pos + 110 : pos + 110 + namesize - 1].decode(errors="replace")
            pos = (pos + 110 + namesize + 3) & ~3
            pos = (pos + filesize + 3) & ~3
            if name != "TRAILER!!!":
                names.append(name)
        elif data[pos] == 0:
            pos += 1
        else:
            if depth < 3:
                inner = _decompress(data[pos:])
                if inner:
                    names.extend(initramfs_names(inner, depth + 1))
            break
    return names


@dataclass
class BootDetection:
    firmware: str  # "uefi" or "bios"
    disk_bus: str  # "virtio" or "sata"
    partition_table: str
    esp: int | None = None
    root: int | None = None
    kernels: list[str] = field(default_factory=list)
    initramfs: str | None = None
    virtio_drivers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _boot_files(fs: object) -> tuple[list[str], list[str], str]:
    """(kernels, initramfs images, boot dir) in an ext file system: /boot/ on a root
    file system, or the top level of a separate /boot partition."""
    assert hasattr(fs, "ls")
    for base in ("/boot", "/"):
        try:
            names = [str(e["name"]) for e in fs.ls(base)]  # type: ignore[attr-defined]
        except DiskError:
            continue
        kernels = sorted(n for n in names if n.startswith("vmlinuz"))
        initrds = sorted(n for n in names if re.match(r"^(initrd|initramfs)", n))
        if kernels or initrds:
            return kernels, initrds, base
    return [], [], "/boot"


def detect_boot(image: Path) -> BootDetection:
    return GuestImage(image).read_disk(_detect)


def _detect(raw: Path) -> BootDetection:
    scheme, parts = disk_layout(raw)
    det = BootDetection(firmware="bios", disk_bus="sata", partition_table=scheme)
    for p in parts:
        if p.is_esp and p.fs == "vfat":
            det.esp = p.number
            fat = make_fs(Volume(raw, p.start, p))
            try:
                efi = [str(e["name"]) for e in fat.ls("/EFI")]
            except DiskError:
                efi = []
            if efi:
                det.firmware = "uefi"
            else:
                det.warnings.append(f"EFI system partition {p.number} holds no /EFI "
                                    "loaders; assuming BIOS boot")
    ext: list[Partition] = [p for p in parts if p.fs and p.fs.startswith("ext")]
    builtin: set[str] = set()
    for p in sorted(ext, key=lambda p: -p.size):
        fs = make_fs(Volume(raw, p.start, p))
        kernels, initrds, base = _boot_files(fs)
        if det.root is None:
            try:
                fs.stat("/etc")
                det.root = p.number
                for mod_dir in fs.ls("/lib/modules"):
                    text = fs.cat(f"/lib/modules/{mod_dir['name']}/modules.builtin")
                    builtin |= {Path(x).name.split(".")[0]
                                for x in text.decode(errors="replace").split()}
            except DiskError:
                pass
        if initrds and det.initramfs is None:
            det.kernels = kernels
            newest = max(initrds, key=lambda n: [int(x) if x.isdigit() else 0
                                                 for x in re.split(r"[.-]", n)])
            path = f"{base.rstrip('/')}/{newest}"
            det.initramfs = f"partition {p.number}:{path}"
            names = initramfs_names(fs.cat(path))
            mods = {Path(n).name.split(".")[0] for n in names if ".ko" in n}
            det.virtio_drivers = sorted(m for m in mods if m.startswith("virtio"))
    in_kernel = sorted(d for d in VIRTIO_DISK_DRIVERS if d in builtin)
    have = set(det.virtio_drivers) | set(in_kernel)
    if in_kernel:
        det.virtio_drivers = sorted(set(det.virtio_drivers) | {f"{d} (built in)"
                                                               for d in in_kernel})
    if have & set(VIRTIO_DISK_DRIVERS):
        det.disk_bus = "virtio"
    elif det.initramfs is None and not in_kernel:
        det.warnings.append("no initramfs found in the guest; using an emulated SATA disk")
    else:
        det.warnings.append("the guest's initramfs has no virtio disk driver; using an "
                            "emulated SATA disk (slower) — add virtio_blk to its initramfs")
    if det.root is None:
        det.warnings.append("no Linux root file system (ext2/3/4 with /etc) found")
    return det
