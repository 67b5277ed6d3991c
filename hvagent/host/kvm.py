"""Which accelerator really runs a guest on this host.

KVM is chosen only when a probe guest (a stock Linux kernel) prints its banner on the
serial console under KVM within a deadline. Some hosts expose a /dev/kvm under which a
stock kernel hangs silently after its real-mode setup, so the existence of /dev/kvm
proves nothing. Otherwise TCG with a CPU model that exposes SVM, so that nested
virtualization still works inside the guest. The verdict is cached per host boot.

Both the image builder (`corehost boot`) and the agent use this module.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import select
import threading
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from hvagent.errors import Conflict, InvalidRequest
from hvagent.host import run

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# Where ci/host-deps.sh unpacks a stock Debian kernel on build machines.
KERNEL_CACHE = Path("/var/cache/corehost/kernel")
PROBE_MARKER = b"Linux version"
DEFAULT_PROBE_TIMEOUT = 10.0
# Under TCG only SVM can be exposed (QEMU cannot emulate VMX).
TCG_ARGS = ("-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm")
KVM_ARGS = ("-accel", "kvm", "-cpu", "host")


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel  # KVM or TCG, never AUTO
    reason: str

    @property
    def qemu_args(self) -> list[str]:
        return list(KVM_ARGS if self.accel is Accel.KVM else TCG_ARGS)


def find_probe_kernel() -> Path | None:
    """A bootable stock kernel: $COREHOST_KERNEL, the running host's, or the build cache."""
    env = os.environ.get("COREHOST_KERNEL")
    if env:
        return Path(env)
    candidates = sorted(glob.glob("/boot/vmlinuz-*")) + sorted(
        glob.glob(str(KERNEL_CACHE / "boot" / "vmlinuz-*"))
    )
    for c in candidates:
        if os.access(c, os.R_OK):
            return Path(c)
    return None


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class ProbeStopped(Conflict):
    """The probe was called off (the agent is stopping): there is no verdict."""


def probe_kvm(kernel: Path, timeout: float = DEFAULT_PROBE_TIMEOUT,
              stop: threading.Event | None = None) -> tuple[bool, str]:
    """Boot `kernel` under KVM: (True, how long) when its banner reaches serial in time,
    else (False, why). ProbeStopped when `stop` is set first."""
    return probe_guest(kernel, KVM_ARGS, "KVM", timeout, stop)


def probe_guest(kernel: Path, accel_args: tuple[str, ...], name: str, timeout: float,
                stop: threading.Event | None = None) -> tuple[bool, str]:
    """The probe guest under `accel_args` (KVM's for the verdict; TCG's proves the probe
    itself sees a kernel that runs)."""
    cmd = [
        QEMU, *accel_args, "-m", "256", "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-kernel", str(kernel),
        # No `loglevel=` below 6: the banner is a KERN_NOTICE, and a quieter console
        # would never show it, so the probe would fail wherever KVM works.
        "-append", "console=ttyS0 panic=-1",
    ]
    proc = run.spawn(cmd, stdout=run.PIPE, stderr=run.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise ProbeStopped(f"the {name} probe was called off")
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen = (seen + chunk)[-4096:]
                if PROBE_MARKER in seen:
                    took = timeout - (deadline - time.monotonic())
                    return True, f"probe guest booted under {name} in {took:.1f}s"
            elif proc.poll() is not None:
                break
        else:
            return False, f"probe guest showed no sign of life under {name} in {timeout:.0f}s"
        return False, f"QEMU exited during the {name} probe"
    finally:
        proc.kill()
        proc.wait()


def _cache_file() -> Path:
    base = Path("/run/corehost") if os.geteuid() == 0 else Path.home() / ".cache" / "corehost"
    return base / "accel.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def choose_accel(requested: Accel | str = Accel.AUTO, *, use_cache: bool = True,
                 stop: threading.Event | None = None) -> AccelChoice:
    """Resolve `auto` by probing (cached per host boot). `tcg` is always honoured; `kvm`
    only where the probe shows KVM works, else InvalidRequest. Setting `stop` calls a
    running probe off (ProbeStopped)."""
    requested = Accel(requested)
    if requested is Accel.TCG:
        return AccelChoice(Accel.TCG, "requested")
    choice = _probed(use_cache, stop)
    if requested is Accel.KVM:
        # A forced KVM on a host where it does not really run a guest would only hang
        # the guest silently at 100 % CPU: refuse it with the probe's finding.
        if choice.accel is not Accel.KVM:
            raise InvalidRequest(f"accel kvm requested, but KVM does not work on this host: "
                                 f"{choice.reason}")
        return AccelChoice(Accel.KVM, f"requested; {choice.reason}")
    return choice


def _probed(use_cache: bool, stop: threading.Event | None = None) -> AccelChoice:
    """What the probe concludes (cached per host boot)."""
    if not kvm_usable():
        return AccelChoice(Accel.TCG, "/dev/kvm missing or not accessible")
    cache = _cache_file()
    key = _boot_id()
    if use_cache:
        try:
            data = json.loads(cache.read_text())
            if data.get("boot_id") == key:
                return AccelChoice(Accel(data["accel"]), data["reason"] + " (cached)")
        except (OSError, ValueError, KeyError):
            pass
    kernel = find_probe_kernel()
    if kernel is None:
        choice = AccelChoice(Accel.TCG, "no probe kernel found; KVM not verified")
    else:
        timeout = float(os.environ.get("COREHOST_KVM_PROBE_TIMEOUT", DEFAULT_PROBE_TIMEOUT))
        ok, why = probe_kvm(kernel, timeout, stop)  # ProbeStopped: nothing is cached
        choice = AccelChoice(Accel.KVM if ok else Accel.TCG, why)
    log.info("accelerator: %s (%s)", choice.accel, choice.reason)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"boot_id": key, **asdict(choice)}))
        tmp.replace(cache)
    except OSError:
        pass
    return choice
