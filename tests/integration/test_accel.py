"""The KVM probe, its TCG fallback, its per-boot cache and a forced `kvm`, on this host's
real QEMU and /dev/kvm. The probe's verdict is compared with an independent boot of the
same stock kernel, never with a value written into the test."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Agent

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


def test_the_probe_guest_shows_its_banner_where_it_runs(kernel: Path) -> None:
    """The probe's own guest (kernel, command line, console) under TCG, which runs it on
    any host: its banner reaches the probe. A console too quiet to print the banner
    would make every KVM probe fail, and every host run its VMs under TCG."""
    ok, why = accel.probe_guest(kernel, accel.TCG_ARGS, "TCG", timeout=120)
    assert ok, why
    assert why.startswith("probe guest booted under TCG in ")


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



def _held_probes(marker: Path) -> list[int]:
    """Processes of the held probe (the wrapper, then the QEMU it becomes)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0") if d.name.isdigit() else []
        except OSError:
            continue
        if any(a.endswith(b"qemu-system-x86_64") for a in cmd) and b"-kernel" in cmd \
                and str(marker).encode() in b" ".join(cmd):
            pids.append(int(d.name))
    return pids


class HeldProbeAgent:
    """An agent whose KVM probe is held until the test lets it go.

    On this kind of host a KVM probe ends at once (QEMU cannot run a vCPU), so nothing
    real makes it slow: the probe's `qemu-system-x86_64` is found on PATH first as a
    wrapper that waits for the test, then execs the real QEMU, which runs the real probe.
    The agent has a private /run/corehost (a mount namespace), so no verdict cached by
    this host's boot spares it the probe."""

    def __init__(self, tmp_path: Path, kernel: Path) -> None:
        if not accel.kvm_usable():
            pytest.fail("this test needs a /dev/kvm to probe")
        real_qemu = shutil.which(accel.QEMU)
        assert real_qemu is not None
        bindir = tmp_path / "bin"
        bindir.mkdir()
        self.hold = tmp_path / "hold"
        os.mkfifo(self.hold)
        wrapper = bindir / accel.QEMU
        wrapper.write_text(f"#!/bin/sh\nread line < {self.hold}\nexec {real_qemu} \"$@\"\n")
        wrapper.chmod(0o755)
        # A copy of the kernel under this test's directory, so its probe is told apart.
        self.kernel = tmp_path / "probe-kernel"
        shutil.copy(kernel, self.kernel)
        self.log = tmp_path / "agent.log"
        self.agent = Agent(tmp_path)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify"))
        self.notify.settimeout(120)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"),
               "PATH": f"{bindir}:{os.environ['PATH']}",
               "COREHOST_KERNEL": str(self.kernel), "COREHOST_KVM_PROBE_TIMEOUT": "300"}
        Path("/run/corehost").mkdir(parents=True, exist_ok=True)
        private_run = ("mount -t tmpfs corehost-test /run/corehost && exec "
                       f"{sys.executable} -m hvagent.cli.hvagent serve --config "
                       f"{self.agent.config}")
        out = self.log.open("ab")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh",
                                      "-c", private_run], stdout=out, stderr=out, cwd=REPO,
                                     env=env)

    def ready(self) -> str:
        return self.notify.recv(4096).decode()

    def held(self) -> list[int]:
        return _held_probes(self.kernel)

    def release(self) -> None:
        """Let a waiting wrapper go on (nothing if none waits)."""
        with contextlib.suppress(OSError):
            fd = os.open(self.hold, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"go\n")
            os.close(fd)

    def close(self) -> None:
        self.notify.close()
        self.release()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.agent.client.close()


def test_the_agent_serves_while_it_probes_and_the_verdict_follows(
        tmp_path: Path, kernel: Path) -> None:
    """The probe guest may take its whole deadline; systemd hears READY and the API
    answers before the probe ends, and GET /agent then reports its verdict."""
    a = HeldProbeAgent(tmp_path, kernel)
    try:
        message = a.ready()
        assert "READY=1" in message.splitlines(), message
        # READY came while the probe is held, and the API answers meanwhile.
        assert a.held(), a.log.read_text()
        assert a.agent.client.get("/vms", timeout=30).json() == []
        assert a.held()
        a.release()  # let the real probe run
        info = a.agent.client.get("/agent", timeout=120)  # waits for the verdict
        assert info.status_code == 200, info.text
        assert a.held() == []
        # The verdict is the real probe's: the same as an independent one here.
        ok, why = accel.probe_kvm(kernel, timeout=60)
        assert info.json()["accel"] == ("kvm" if ok else "tcg"), (info.json(), why)
        reason = info.json()["accel_reason"]
        assert reason == why if not ok else reason.startswith("probe guest booted")
        # Probed once: the verdict is kept.
        assert a.agent.client.get("/agent", timeout=30).json()["accel_reason"] == reason
    finally:
        a.close()


def test_an_agent_stopped_while_it_probes_exits_and_leaves_no_probe(
        tmp_path: Path, kernel: Path) -> None:
    """SIGTERM while the probe runs (its deadline here is minutes): the agent calls the
    probe off and exits at once, with no probe guest left behind."""
    a = HeldProbeAgent(tmp_path, kernel)
    try:
        assert "READY=1" in a.ready().splitlines()
        assert a.held(), a.log.read_text()
        a.proc.send_signal(signal.SIGTERM)
        # Bounded well below the probe's deadline: a probe nobody calls off holds the
        # exit for the whole deadline.
        # (0, or the SIGTERM uvicorn re-raises once it has shut down: a clean stop to
        # systemd either way)
        assert a.proc.wait(timeout=60) in (0, -signal.SIGTERM), a.log.read_text()
        assert a.held() == []
        assert "Traceback" not in a.log.read_text()
    finally:
        a.close()


def test_an_agent_told_kvm_where_kvm_does_not_work_serves_and_refuses_starts(
        tmp_path: Path) -> None:
    """`accel: kvm` on a host whose KVM does not run guests: the agent still serves (its
    VMs and tokens stay manageable), GET /agent says the accelerator is unavailable and
    why, and starting a VM is a 400 naming the reason, with the VM left stopped."""
    verdict = accel.choose_accel("auto")
    agent = Agent(tmp_path)
    agent.config.write_text(json.dumps({**json.loads(agent.config.read_text()),
                                        "accel": "kvm"}))
    agent.start()
    try:
        info = agent.ok("GET", "/agent")
        created = agent.ok("POST", "/vms", json={"name": "k", "memory_mib": 64})
        r = agent.client.post("/vms/k/start")
        if verdict.accel == "kvm":
            assert info["accel"] == "kvm" and r.status_code == 200, r.text
            return
        reason = verdict.reason.removesuffix(" (cached)")
        assert info["accel"] == "unavailable"
        assert info["accel_reason"].startswith(
            "accel kvm requested, but KVM does not work on this host: " + reason)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["detail"].startswith("accel kvm requested, but KVM does not work")
        assert agent.ok("GET", "/vms/k")["state"] == created["state"]
        assert agent.qemu_pids() == []
    finally:
        agent.stop()
