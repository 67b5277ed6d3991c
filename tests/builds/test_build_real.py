"""Real disk-image-create builds of small profiles (tests/builds/profiles/), booted in QEMU.

Slow (a cold build is minutes; DIB's cache makes later ones faster), so marked `image`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from builder import outputs, qemu

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROFILES = HERE / "profiles"

pytestmark = pytest.mark.image


def corehost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True,
                          text=True, cwd=REPO)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_failed_build_names_the_step_and_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous = out / "broken"
    previous.mkdir(parents=True)
    (previous / "broken.qcow2").write_bytes(bytes(range(256)) * 4096)
    (previous / "manifest.json").write_text('{"input_hash": "from an earlier build"}\n')
    (previous / "dib.log").write_text("earlier log\n")
    before = tree(previous)

    proc = corehost("build", str(PROFILES / "broken.yaml"), "--out", str(out))

    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("corehost: disk-image-create failed in installing the profile's "
                           "packages (-p, after install.d)")
    assert "Unable to locate package corehost-no-such-package" in last
    assert tree(previous) == before  # byte-identical
    leftovers = [p.name for p in out.iterdir() if ".build-" in p.name or ".old-" in p.name]
    assert leftovers == []
    failed_log = out / "broken.failed.log"
    assert "corehost-no-such-package" in failed_log.read_text()
    assert f"full log: {failed_log}" in last


def test_interrupted_build_cleans_up_and_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous = out / "minimal"
    previous.mkdir(parents=True)
    (previous / "minimal.qcow2").write_bytes(b"an earlier image")
    before = tree(previous)
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "build",
                             str(PROFILES / "minimal.yaml"), "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stderr is not None
    mounted_during = 0
    for line in proc.stderr:
        if "dib: pre-install.d/" in line:  # inside DIB's chroot, with its mounts up
            mounted_during = sum(str(out) in m for m in Path("/proc/mounts").read_text()
                                 .splitlines())
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            break
    rest = proc.stderr.read()
    assert proc.wait() == 130, rest
    assert "corehost: interrupted" in rest
    assert mounted_during > 0
    assert [m for m in Path("/proc/mounts").read_text().splitlines() if str(out) in m] == []
    assert tree(previous) == before
    assert sorted(p.name for p in out.iterdir()) == [".minimal.lock", "minimal"]


@pytest.fixture(scope="module")
def minimal_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("minimal") / "out"
    proc = corehost("build", str(PROFILES / "minimal.yaml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "minimal", proc.stdout


def test_build_writes_artifacts_and_manifest(minimal_build: tuple[Path, str]) -> None:
    outdir, stdout = minimal_build
    assert "minimal: built in" in stdout
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"qcow2", "raw", "vhd"}
    for art in manifest["artifacts"].values():
        path = outdir / art["file"]
        assert path.stat().st_size == art["size"]
        assert outputs.sha256_file(path) == art["sha256"]
    formats = {a: json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(outdir / f"minimal.{a}")],
        capture_output=True, text=True, check=True).stdout)["format"]
        for a in ("qcow2", "raw", "vhd")}
    assert formats == {"qcow2": "qcow2", "raw": "raw", "vhd": "vpc"}
    packages = {p["name"]: p["version"] for p in manifest["packages"]}
    assert packages.get("openssh-server") and packages.get("systemd")
    assert manifest["profile"]["name"] == "minimal"
    assert "debian-minimal" in manifest["elements"] and "corehost-overlay" not in manifest[
        "elements"]
    assert len(manifest["input_hash"]) == 64
    assert manifest["build"]["duration_s"] > 0
    assert "Running hooks from" in (outdir / "dib.log").read_text()


def test_unchanged_inputs_reuse_the_build(minimal_build: tuple[Path, str]) -> None:
    outdir, _ = minimal_build
    before = tree(outdir)
    proc = corehost("build", str(PROFILES / "minimal.yaml"), "--out", str(outdir.parent))
    assert proc.returncode == 0, proc.stderr
    assert f"minimal: up to date, reusing {outdir}/minimal.qcow2" in proc.stdout
    assert tree(outdir) == before


def test_image_boots_to_a_login_prompt_and_stays_unchanged(
        minimal_build: tuple[Path, str]) -> None:
    outdir, _ = minimal_build
    image = outdir / "minimal.qcow2"
    digest = outputs.sha256_file(image)
    machine = qemu.Machine(qemu.BootOptions(image, snapshot=True, no_reboot=True))
    with machine:
        machine.wait_for_serial("login:", timeout=600)
    assert machine.proc is not None and machine.proc.returncode == 0
    # an orderly shutdown through the ACPI power button, not QMP quit or a kill
    assert "reboot: Power down" in machine.serial_log.read_text(errors="replace")
    assert outputs.sha256_file(image) == digest  # -snapshot: the artifact is untouched
