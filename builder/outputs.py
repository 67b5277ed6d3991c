"""Build outputs: artifacts converted from DIB's raw disk, the PXE bundle, and manifest.json.

Every disk output is the same hybrid GPT disk (elements/block-device-hybrid: BIOS and UEFI).
raw and usb (dd-able onto a stick) are the raw disk itself; qcow2 (compressed, as DIB
would write it), vhd (dynamic, force_size=on so the size is not rounded to CHS
geometry) and vhdx are made with `qemu-img convert`; VHD and VHDX are then checked with
`hvdisk check` (qemu-img cannot check VHD). `pxe` is a directory (builder.pxe) whose
files are artifacts of their own (`pxe.kernel`, `pxe.rootfs`, ...). manifest.json
records the resolved profile, the elements, the installed packages (DIB's dpkg
manifest), each artifact's sha256 and size, the build duration, the base the build
started from (builder.base) and the input hash (builder.inputs) that decides whether
a rebuild is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from builder import pxe
from builder.inputs import Inputs, changed_inputs
from builder.profile import OutputFormat, Profile
from hvagent.host import run
from hvagent.host.formats import QEMU_IMG, DiskFormat, create_options

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# One conversion or copy of an artifact (a few GiB on a slow disk).
CONVERT_TIMEOUT = 1800.0

# The disk format of each image artifact; qemu-img's options for it are the agent's own
# (hvagent.host.formats.create_options: dynamic VHD/VHDX, VHD sizes exact).
_CONVERT: dict[OutputFormat, DiskFormat] = {
    OutputFormat.QCOW2: DiskFormat.QCOW2,
    OutputFormat.VHD: DiskFormat.VPC,
    OutputFormat.VHDX: DiskFormat.VHDX,
}


class OutputError(Exception):
    pass


def artifact_name(profile: Profile, fmt: OutputFormat) -> str:
    suffix = {OutputFormat.USB: "usb.img"}.get(fmt, fmt.value)
    return f"{profile.name}.{suffix}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def produce(profile: Profile, dib_base: Path, dest: Path) -> tuple[dict[str, dict[str, Any]],
                                                                    dict[str, Any] | None]:
    """Write every requested artifact into dest from DIB's output at dib_base (.raw,
    and for pxe .vmlinuz, .initrd, .rootfs.squashfs). Returns ({artifact: {file,
    sha256, size}}, the pxe bundle's description or None)."""
    raw = Path(f"{dib_base}.raw")
    made: dict[str, Path] = {}
    bundle = None
    for fmt in profile.outputs:
        target = dest / artifact_name(profile, fmt)
        if fmt is OutputFormat.PXE:
            try:
                bundle = pxe.make_bundle(profile.name, profile.kernel_cmdline, dib_base,
                                         dest / "pxe")
            except (pxe.PxeError, OSError) as e:
                raise OutputError(str(e)) from None
            for role, rel in bundle["files"].items():
                made[f"pxe.{role}"] = dest / "pxe" / rel
            continue
        if fmt in (OutputFormat.RAW, OutputFormat.USB):  # the same bytes
            os.link(raw, target) if _same_fs(raw, dest) else _copy(raw, target)
        else:
            disk = _CONVERT[fmt]
            # qcow2 compressed, as DIB's own qcow2 output is (qemu-img convert -c).
            extra = ["-c"] if disk is DiskFormat.QCOW2 else []
            try:
                done = run.run([QEMU_IMG, "convert", *extra, "-f", "raw", "-O", disk.qemu,
                                *create_options(disk, fixed=False), raw, target],
                               timeout=CONVERT_TIMEOUT, check=False)
            except run.ProcessFailed as e:  # not installed, or timed out
                raise OutputError(str(e)) from None
            if done.returncode != 0:
                raise OutputError(f"qemu-img convert to {fmt} failed: {done.err.strip()}")
            if disk in (DiskFormat.VPC, DiskFormat.VHDX):
                check_disk(target)
        made[fmt] = target
    return {
        str(key): {"file": str(path.relative_to(dest)), "sha256": sha256_file(path),
                   "size": path.stat().st_size}
        for key, path in made.items()
    }, bundle


def check_disk(image: Path) -> None:
    """The disk tool's check (VHD footer and BAT, VHDX headers and log) on a new output."""
    try:
        done = run.run([sys.executable, "-m", "hvagent.cli.hvdisk", "check", image],
                       timeout=CONVERT_TIMEOUT, check=False, what="hvdisk check")
    except run.ProcessFailed as e:
        raise OutputError(str(e)) from None
    if done.returncode != 0:
        detail = (done.err or done.out).strip().splitlines()
        raise OutputError(f"{image.name}: hvdisk check failed: {detail[-1] if detail else ''}")


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _copy(src: Path, dst: Path) -> None:
    try:
        run.run(["cp", "--sparse=always", src, dst], timeout=CONVERT_TIMEOUT)
    except run.ProcessFailed as e:
        raise OutputError(str(e)) from None


def read_dpkg_manifest(dib_base: Path) -> list[dict[str, str]]:
    """Installed packages from DIB's dpkg manifest (<image>.d/dib-manifests/)."""
    mdir = Path(f"{dib_base}.d") / "dib-manifests"
    for f in sorted(mdir.glob("dib-manifest-dpkg-*")):
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        return sorted(
            ({"name": p["package"], "version": p["version"], "arch": p["arch"]}
             for p in data.get("packages", []) if p.get("status", "ii").startswith("ii")),
            key=lambda p: p["name"],
        )
    return []


def read_manifest(outdir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((outdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reusable(outdir: Path, inputs: Inputs) -> tuple[bool, str]:
    """Whether outdir holds a finished build of exactly these inputs, artifacts intact."""
    m = read_manifest(outdir)
    if m is None:
        return False, "no previous build"
    if m.get("input_hash") != inputs.digest:
        changed = changed_inputs(m.get("inputs", {}), inputs.parts)
        return False, "inputs changed: " + ", ".join(changed)
    for fmt, art in m.get("artifacts", {}).items():
        path = outdir / art["file"]
        if not path.is_file() or path.stat().st_size != art["size"]:
            return False, f"{fmt} artifact missing or changed"
        if sha256_file(path) != art["sha256"]:
            return False, f"{fmt} artifact changed since it was built"
    return True, "up to date"


def write_manifest(dest: Path, data: dict[str, Any]) -> Path:
    path = dest / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"manifest_version": MANIFEST_VERSION, **data}, indent=2) + "\n")
    tmp.replace(path)
    return path
