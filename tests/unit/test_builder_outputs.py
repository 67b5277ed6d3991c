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
    dest = tmp_path / "result"
    dest.mkdir()
    arts = outputs.produce(load(every_output), tiny_qcow2, dest)
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
