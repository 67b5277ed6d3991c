"""Real disk-image-create builds of small profiles (tests/builds/profiles/), booted in QEMU.

Slow (a cold build is minutes; DIB's cache makes later ones faster), so marked `image`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from builder import outputs, qemu

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROFILES = HERE / "profiles"

# A cold build plus a boot under TCG takes longer than the suite's default timeout.
# One worker runs this file in order under `pytest -n` (its fixtures are shared).
pytestmark = [pytest.mark.image, pytest.mark.timeout(3600),
              pytest.mark.xdist_group("build_real")]


def corehost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=3600)


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


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _processes_with(token: str) -> list[int]:
    """Pids whose command line contains token."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if token.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def _session_of(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _in_session(sid: int) -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir()
            if d.name.isdigit() and _session_of(int(d.name)) == sid]


def _loops_under(root: Path) -> list[str]:
    lines = subprocess.run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"], capture_output=True,
                           text=True, timeout=30).stdout.splitlines()
    return [ln for ln in lines if str(root) in ln]


def _mounts_under(root: Path) -> list[str]:
    return [m for m in Path("/proc/mounts").read_text().splitlines() if str(root) in m]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: signal.Signals(s).name)
def test_signal_during_a_silent_dib_step_cleans_up(
        sig: int, fake_root: Path, add_element: Callable[..., Path], tmp_path: Path) -> None:
    """INT, TERM and HUP stop a build the same way, even while DIB runs a step that
    prints nothing (so DIB never notices a closed pipe): DIB's whole session is gone, no
    mount or loop device of the build is left, the temp dir is removed and the previous
    output is byte-identical. Cheap: the stub element's root.d step is DIB's first."""
    token = f"corehost-silent-step-{uuid.uuid4().hex}"
    # It stands in for the OS element (DIB wants one), so nothing runs before its step.
    add_element("silent-step", {"element-provides": "operating-system\n",
                                "environment.d/10-silent-step": "export DIB_INIT_SYSTEM=systemd\n",
                                "root.d/10-silent-step": f"""\
        #!/bin/bash
        set -eu -o pipefail
        # silent on purpose: a step that writes nothing while it works
        exec -a {token} sleep 600
        """})
    os.chmod(fake_root / "elements/silent-step/root.d/10-silent-step", 0o755)
    profile = fake_root / "profiles" / "silent.yaml"
    profile.write_text("name: silent\nelements: [silent-step]\noutputs: [qcow2]\n")
    out = tmp_path / "out"
    previous = out / "silent"
    previous.mkdir(parents=True)
    (previous / "silent.qcow2").write_bytes(bytes(range(256)) * 64)
    (previous / "manifest.json").write_text('{"input_hash": "from an earlier build"}\n')
    before = tree(previous)
    log = tmp_path / "stderr.log"
    with log.open("w") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "build", str(profile),
                                 "--out", str(out)], stdout=subprocess.DEVNULL, stderr=errf,
                                cwd=fake_root, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 600  # DIB's cache lock may be held by another build
        while not (step := _processes_with(token)):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "DIB never reached the silent step"
            time.sleep(0.5)
        sid = _session_of(step[0])
        assert sid is not None and sid != os.getsid(0)  # DIB runs in its own session
        assert _mounts_under(out)  # DIB's tmpfs for its build dir is up
        proc.send_signal(sig)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert rc == 128 + sig, err[-3000:]
    assert err.rstrip().splitlines()[-1] == (
        "corehost: interrupted" if sig == signal.SIGINT
        else f"corehost: stopped by {signal.Signals(sig).name}")
    assert "Traceback" not in err
    assert _processes_with(token) == []
    assert _in_session(sid) == []
    assert _mounts_under(out) == []
    assert _loops_under(out) == []
    assert tree(previous) == before
    assert sorted(p.name for p in out.iterdir()) == [".silent.lock", "silent"]


def test_interrupted_build_cleans_up_and_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous = out / "minimal"
    previous.mkdir(parents=True)
    (previous / "minimal.qcow2").write_bytes(b"an earlier image")
    before = tree(previous)
    # An empty base cache of its own: a base an earlier build left (this machine's cache
    # outlives a checkout) would skip DIB, and the build would finish before any signal.
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    # Explicit SIGINT disposition: run from a background job the child would inherit it
    # ignored, and the build would simply finish.
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "build",
                             str(PROFILES / "minimal.yaml"), "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            preexec_fn=_default_signals)
    assert proc.stderr is not None
    mounted_during = None
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if "dib: pre-install.d/" in line:  # inside DIB's chroot, with its mounts up
            mounted_during = sum(str(out) in m for m in Path("/proc/mounts").read_text()
                                 .splitlines())
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            break
    rest = proc.stderr.read()
    assert mounted_during is not None, "DIB never reached pre-install.d: " + "".join(
        seen[-30:])
    assert proc.wait(timeout=600) == 130, rest
    assert "corehost: interrupted" in rest
    assert mounted_during > 0
    assert not (tmp_path / "cache" / "corehost" / "base").exists() or not any(
        p.is_dir() for p in (tmp_path / "cache" / "corehost" / "base").iterdir())
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
        capture_output=True, text=True, check=True, timeout=60).stdout)["format"]
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


def _copy_checkout(dest: Path) -> Path:
    """The tracked files of this checkout (with their working-tree contents) at dest."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True, timeout=60).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


def test_an_agent_or_late_file_change_reuses_the_base_and_boots_with_it(
        tmp_path: Path) -> None:
    """Build profiles/ci.yaml from a copy of the checkout whose agent has one more line
    and two of whose late files (a template, a static file) do: the base that CI's own
    build of the same profile left in the cache is reused (no DIB run; the manifest says
    so), the new agent and files are laid onto it, and the booted image runs that agent
    and has those files. (Run alone, the first build of the copy makes the base and a second
    one, after the edit, is the reuse.)"""
    copy = _copy_checkout(tmp_path / "checkout")
    out = tmp_path / "out"

    def build() -> dict[str, object]:
        proc = subprocess.run([sys.executable, "-m", "builder.cli", "build", "profiles/ci.yaml",
                               "--out", str(out)], capture_output=True, text=True, cwd=copy,
                              timeout=3600, env={**os.environ, "PYTHONPATH": str(copy)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(json.loads((out / "ci" / "manifest.json").read_text())["build"])

    first = build()
    mark = uuid.uuid4().hex
    init = copy / "hvagent" / "__init__.py"
    init.write_text(init.read_text() + f"\nLAYER_TEST_MARK = {mark!r}\n")
    # Two late files (elements' late-files) change too: a template and a static file.
    late = {"etc/hvagent/hvagent.yaml":
            copy / "elements/hvagent/templates/etc/hvagent/hvagent.yaml.j2",
            "etc/systemd/network/80-dhcp.network":
            copy / "elements/server-core/static/etc/systemd/network/80-dhcp.network"}
    for source in late.values():
        source.write_text(source.read_text() + f"# {mark}\n")
    second = build()

    base = second["base"]
    assert isinstance(base, dict)
    assert base["reused"] is True
    assert base["key"] == first["base"]["key"]  # type: ignore[index]
    layer = base["layer"]
    assert layer and any(s.startswith("agent: corehost-") for s in layer["steps"]), layer
    assert f"late files: {', '.join('/' + p for p in sorted(base['late_files']))}" in layer[
        "steps"], layer
    assert set(late) <= set(base["late_files"])
    assert any(s.startswith("pxe: ") for s in layer["steps"]), layer

    # The PXE root carries the new agent too (the squashfs inside the rootfs cpio).
    rootfs = out / "ci" / "pxe"
    cpio = next(rootfs.glob("*rootfs*"))
    unpacked = tmp_path / "cpio"
    unpacked.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=cpio.open("rb"), cwd=unpacked,
                   check=True, timeout=300)
    squash = unpacked / "corehost" / "root.squashfs"
    shown = subprocess.run(["unsquashfs", "-cat", str(squash),
                            "opt/hvagent/lib/python3.11/site-packages/hvagent/__init__.py"],
                           capture_output=True, text=True, timeout=300)
    assert mark in shown.stdout, shown.stderr
    shown = subprocess.run(["unsquashfs", "-cat", str(squash), "etc/hvagent/hvagent.yaml"],
                           capture_output=True, text=True, timeout=300)
    assert f"# {mark}" in shown.stdout, shown.stderr

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True, timeout=60)
    machine = qemu.Machine(qemu.BootOptions(out / "ci" / "ci.qcow2", snapshot=True,
                                            no_reboot=True, cpus=1,
                                            ssh_key=key.with_suffix(".pub")))
    with machine:
        machine.wait_for_ssh(key, timeout=900)
        machine.wait_for_boot(key, timeout=600)
        ssh = machine.ssh_base(key)
        active = subprocess.run([*ssh, "systemctl", "is-active", "hvagent.service"],
                                capture_output=True, text=True, timeout=60)
        assert active.stdout.strip() == "active", active.stdout + active.stderr
        seen = subprocess.run([*ssh, "/opt/hvagent/bin/python -c "
                               "'import hvagent; print(hvagent.LAYER_TEST_MARK)'"],
                              capture_output=True, text=True, timeout=120)
        assert seen.stdout.strip() == mark, seen.stderr
        for path in late:  # the late files as this build made them
            text = subprocess.run([*ssh, "cat", f"/{path}"], capture_output=True, text=True,
                                  timeout=60)
            assert text.stdout.endswith(f"# {mark}\n"), (path, text.stdout, text.stderr)
        # The agent answers on its socket: the laid-on package is the one serving.
        version = subprocess.run([*ssh, "hvctl", "--json", "host", "info"], capture_output=True,
                                 text=True, timeout=120)
        assert version.returncode == 0, version.stdout + version.stderr
