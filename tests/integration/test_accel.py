"""The KVM probe, its TCG fallback, its per-boot cache and a forced `kvm`, on this host's
real QEMU and /dev/kvm. The probe's verdict is compared with an independent boot of the
same stock kernel, never with a value written into the test."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvagent.errors import InvalidRequest
from hvagent.host import kvm as accel

pytestmark = pytest.mark.integration

PROBE_TIMEOUT = 5.0  # the probe's deadline in these tests; kept short, they boot a kernel


def _boot(args: list[str], kernel: Path, seconds: float) -> str:
    """An independent boot of `kernel` with serial on stdout: "banner" if it prints its
    banner within `seconds`, "exited" if QEMU ends first (e.g. it cannot set up a vCPU
    under this /dev/kvm), else "silent"."""
    proc = subprocess.Popen(
        [accel.QEMU, *args, "-m", "256", "-nodefaults", "-display", "none", "-no-reboot",
         "-serial", "stdio", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and b"Linux version" not in seen:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:  # end of file: QEMU has gone
                    return "exited"
                seen += chunk
        return "banner" if b"Linux version" in seen else "silent"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _banner_within(args: list[str], kernel: Path, seconds: float) -> bool:
    return _boot(args, kernel, seconds) == "banner"


@pytest.fixture()
def kernel() -> Path:
    found = accel.find_probe_kernel()
    assert found is not None, "no stock kernel to probe with (ci/host-deps.sh installs one)"
    return found


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The verdict cache in a test directory instead of the host's."""
    path = tmp_path / "accel.json"
    monkeypatch.setattr(accel, "_cache_file", lambda: path)
    monkeypatch.setenv("COREHOST_KVM_PROBE_TIMEOUT", str(PROBE_TIMEOUT))
    return path


def test_probe_verdict_agrees_with_an_independent_kvm_boot(kernel: Path, cache: Path) -> None:
    # The kernel itself is fine: under TCG it prints its banner.
    assert _banner_within(list(accel.TCG_ARGS), kernel, 120)
    choice = accel.choose_accel("auto", use_cache=False)
    if not accel.kvm_usable():
        assert (choice.accel, choice.reason) == ("tcg", "/dev/kvm missing or not accessible")
        return
    # Give the independent KVM boot four times the probe's deadline.
    outcome = _boot(list(accel.KVM_ARGS), kernel, 4 * PROBE_TIMEOUT)
    assert choice.accel == ("kvm" if outcome == "banner" else "tcg"), (choice, outcome)
    if outcome == "banner":
        assert choice.reason.startswith("probe guest booted under KVM in ")
    elif outcome == "exited":  # QEMU cannot run a vCPU under this /dev/kvm at all
        assert choice.reason == "QEMU exited during the KVM probe"
    else:
        assert choice.reason == (
            f"probe guest showed no sign of life under KVM in {PROBE_TIMEOUT:.0f}s")
    if Path("/sys/module/kvm_pvm").exists():
        # This kind of host (paravirtual nested KVM): a stock kernel hangs under KVM.
        assert choice.accel == "tcg"


def test_probe_guest_that_never_prints_its_banner_hits_the_deadline(tmp_path: Path) -> None:
    if not accel.kvm_usable():
        pytest.fail("this test needs a /dev/kvm to probe")
    silent = tmp_path / "silent-guest"
    silent.write_bytes(b"\0" * 4096)  # QEMU starts it; it never prints "Linux version"
    # Where QEMU cannot run a vCPU under this /dev/kvm at all it exits before any
    # deadline, and the probe must say that instead (the independent run tells which).
    outcome = _boot(list(accel.KVM_ARGS), silent, 6)
    assert outcome != "banner"
    assert accel.probe_kvm(silent, timeout=3) == (False, {
        "exited": "QEMU exited during the KVM probe",
        "silent": "probe guest showed no sign of life under KVM in 3s"}[outcome])


def test_probe_where_qemu_cannot_start_falls_back(tmp_path: Path) -> None:
    assert accel.probe_kvm(tmp_path / "missing-kernel", timeout=30) == (
        False, "QEMU exited during the KVM probe")


def test_verdict_is_cached_per_boot_and_reprobed_after_a_new_boot(cache: Path) -> None:
    if not accel.kvm_usable():
        pytest.fail("this test needs a /dev/kvm to probe (the cache is used only then)")
    first = accel.choose_accel("auto")
    assert not first.reason.endswith("(cached)")
    stored = json.loads(cache.read_text())
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert stored == {"boot_id": boot_id, "accel": str(first.accel), "reason": first.reason}

    again = accel.choose_accel("auto")
    assert (again.accel, again.reason) == (first.accel, first.reason + " (cached)")

    # A verdict from another boot of the host is not trusted: probed again, rewritten.
    cache.write_text(json.dumps({**stored, "boot_id": "another-boot", "accel": "kvm",
                                 "reason": "from an earlier boot"}))
    after = accel.choose_accel("auto")
    assert after.accel == first.accel and not after.reason.endswith("(cached)")
    assert json.loads(cache.read_text())["boot_id"] == boot_id


def test_forced_kvm_where_kvm_does_not_work_is_one_clear_error(
        cache: Path, tiny_qcow2: Path) -> None:
    verdict = accel.choose_accel("auto")
    if verdict.accel == "kvm":
        assert accel.choose_accel("kvm").accel == "kvm"
        return
    with pytest.raises(InvalidRequest) as info:
        accel.choose_accel("kvm")
    reason = verdict.reason.removesuffix(" (cached)")
    assert str(info.value) == (
        f"accel kvm requested, but KVM does not work on this host: {reason} (cached)"
        if cache.exists() else
        f"accel kvm requested, but KVM does not work on this host: {reason}")
    # The command line says the same in one line and exits 2, starting no guest.
    env = {**os.environ, "COREHOST_KVM_PROBE_TIMEOUT": str(PROBE_TIMEOUT)}
    proc = subprocess.run([sys.executable, "-m", "builder.cli", "boot", str(tiny_qcow2),
                           "--accel", "kvm", "--no-console"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith(
        "corehost: accel kvm requested, but KVM does not work on this host: "), proc.stderr
