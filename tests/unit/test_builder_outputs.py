"""Artifacts made with the real qemu-img, the dpkg manifest, and the reuse decision."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder import outputs
from builder.inputs import Inputs
from builder.profile import load


def info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return dict(json.loads(out))


def raw_bytes(path: Path, fmt: str, tmp: Path) -> bytes:
    dest = tmp / f"{path.name}.check.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(dest)],
                   check=True, timeout=60)
    return dest.read_bytes()


@pytest.fixture()
def every_output(fake_root: Path) -> Path:
    path = fake_root / "profiles" / "all.yaml"
    path.write_text("name: all\nelements: [debian-minimal]\n"
                    "outputs: [qcow2, raw, vhd, vhdx, usb]\n")
    return path


def test_every_format_holds_the_same_disk(every_output: Path, tiny_qcow2: Path,
                                          tmp_path: Path) -> None:
    """Every output is made from DIB's raw disk (what the base cache keeps)."""
    dib_base = tmp_path / "dib" / "all"
    dib_base.parent.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(tiny_qcow2),
                    f"{dib_base}.raw"], check=True, timeout=60)
    dest = tmp_path / "result"
    dest.mkdir()
    arts, bundle = outputs.produce(load(every_output), dib_base, dest)
    assert bundle is None  # no pxe output asked for
    assert {k: v["file"] for k, v in arts.items()} == {
        "qcow2": "all.qcow2", "raw": "all.raw", "vhd": "all.vhd", "vhdx": "all.vhdx",
        "usb": "all.usb.img"}
    formats = {"qcow2": "qcow2", "raw": "raw", "vhd": "vpc", "vhdx": "vhdx", "usb": "raw"}
    want = raw_bytes(tiny_qcow2, "qcow2", tmp_path)
    assert want[1 << 20:(1 << 20) + 4] == b"\x5a" * 4
    for kind, art in arts.items():
        path = dest / art["file"]
        assert info(path)["format"] == formats[kind]
        # force_size=on keeps the VHD at exactly the source size (no CHS rounding)
        assert info(path)["virtual-size"] == 100 * 2**20, kind
        assert raw_bytes(path, formats[kind], tmp_path) == want, kind
        assert art["size"] == path.stat().st_size
        assert art["sha256"] == outputs.sha256_file(path)


@pytest.fixture()
def pxe_profile(fake_root: Path) -> Path:
    path = fake_root / "profiles" / "net.yaml"
    path.write_text("name: net\nelements: [debian-minimal]\noutputs: [pxe]\n"
                    "kernel_cmdline: 'corehost.ram=75%'\n")
    return path


def test_pxe_bundle_serves_the_kernel_initramfs_and_root(pxe_profile: Path,
                                                         tmp_path: Path) -> None:
    base = tmp_path / "dib" / "net"
    base.parent.mkdir()
    for suffix, data in ((".vmlinuz", b"kernel"), (".initrd", b"initramfs"),
                         (".rootfs.squashfs", b"hsqs" + bytes(range(256)) * 64)):
        Path(f"{base}{suffix}").write_bytes(data)
    dest = tmp_path / "result"
    dest.mkdir()
    arts, bundle = outputs.produce(load(pxe_profile), base, dest)
    assert bundle is not None
    assert {k: v["file"] for k, v in arts.items()} == {
        "pxe.kernel": "pxe/net.vmlinuz", "pxe.initrd": "pxe/net.initrd",
        "pxe.rootfs": "pxe/net.rootfs.cpio", "pxe.ipxe_script": "pxe/boot.ipxe",
        "pxe.grub_efi": "pxe/grubnetx64.efi", "pxe.grub_cfg": "pxe/grub/grub.cfg",
        "pxe.undionly_kpxe": "pxe/undionly.kpxe", "pxe.snponly_efi": "pxe/snponly.efi"}
    for art in arts.values():
        assert outputs.sha256_file(dest / art["file"]) == art["sha256"]
    # The root travels as a second initrd: a newc cpio at the path the initramfs reads.
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=(dest / "pxe/net.rootfs.cpio")
                             .read_bytes(), capture_output=True, timeout=60, check=True)
    assert listing.stdout.decode().split() == ["corehost", "corehost/root.squashfs"]
    extracted = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout",
                                "corehost/root.squashfs"],
                               input=(dest / "pxe/net.rootfs.cpio").read_bytes(),
                               capture_output=True, timeout=60, check=True).stdout
    assert extracted == Path(f"{base}.rootfs.squashfs").read_bytes()
    want = "boot=corehost console=tty0 console=ttyS0,115200 nofb nomodeset corehost.ram=75%"
    assert bundle["kernel_cmdline"] == want
    ipxe = (dest / "pxe/boot.ipxe").read_text()
    assert ipxe.startswith("#!ipxe\n") and want in ipxe and "chain --autofree site.ipxe" in ipxe
    grub = dest / "pxe/grub/grub.cfg"
    assert want in grub.read_text() and 'source "$prefix/site.cfg"' in grub.read_text()
    check = subprocess.run(["grub-script-check", str(grub)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert (dest / "pxe/grubnetx64.efi").read_bytes()[:2] == b"MZ"  # a PE/COFF EFI binary


def test_pxe_bundle_without_the_pxe_element_names_what_is_missing(
        pxe_profile: Path, tmp_path: Path) -> None:
    dest = tmp_path / "result"
    dest.mkdir()
    with pytest.raises(outputs.OutputError, match="no kernel .*pxe element"):
        outputs.produce(load(pxe_profile), tmp_path / "nothing", dest)


def test_dpkg_manifest_is_read(tmp_path: Path) -> None:
    base = tmp_path / "dib" / "img"
    mdir = Path(f"{base}.d") / "dib-manifests"
    mdir.mkdir(parents=True)
    # the shape DIB's dpkg element writes (dpkg-query output massaged by sed)
    (mdir / "dib-manifest-dpkg-img").write_text(
        '{"packages": [\n'
        '{"package": "zlib1g","arch": "amd64","version": "1:1.2.13","status": "ii "},\n'
        '{"package": "bash","arch": "amd64","version": "5.2.15-2","status": "ii "},\n'
        '{"package": "gone","arch": "amd64","version": "1","status": "rc "}\n]}\n')
    assert outputs.read_dpkg_manifest(base) == [
        {"name": "bash", "version": "5.2.15-2", "arch": "amd64"},
        {"name": "zlib1g", "version": "1:1.2.13", "arch": "amd64"},
    ]


def test_reuse_only_when_hash_matches_and_artifacts_intact(tmp_path: Path) -> None:
    outdir = tmp_path / "p"
    outdir.mkdir()
    art = outdir / "p.qcow2"
    art.write_bytes(b"image bytes")
    inputs = Inputs("abc", {})
    assert outputs.reusable(outdir, inputs) == (False, "no previous build")
    outputs.write_manifest(outdir, {"input_hash": "abc", "inputs": {"elements": {"vm": "1"}},
                                    "artifacts": {"qcow2": {
        "file": art.name, "sha256": outputs.sha256_file(art), "size": art.stat().st_size}}})
    assert outputs.reusable(outdir, inputs) == (True, "up to date")
    changed = Inputs("def", {"elements": {"vm": "2"}, "agent_source": "x"})
    assert outputs.reusable(outdir, changed) == (
        False, "inputs changed: agent source, element vm")
    art.write_bytes(b"image BYTES")  # same size, different content (booted without -snapshot)
    assert outputs.reusable(outdir, inputs) == (False, "qcow2 artifact changed since it was built")
    art.unlink()
    assert outputs.reusable(outdir, inputs) == (False, "qcow2 artifact missing or changed")
