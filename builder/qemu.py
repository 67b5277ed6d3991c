"""Booting a built image in QEMU, headless: serial log, ssh on a loopback port, clean stop.

The accelerator comes from hvagent.host.kvm.choose_accel (KVM only when a probe guest
really runs under it, else TCG with SVM exposed). Networking is QEMU user mode with the
guest's port 22 forwarded to a free 127.0.0.1 port. A public key can be handed to the
guest through fw_cfg (opt/corehost/authorized_keys), which images built with
`test_access: true` install for root at boot. `snapshot=True` keeps the image file
untouched (its sha256 stays what manifest.json says). Power-off is ACPI through QMP,
then an immediate quit, then a kill, each only when the previous did not end QEMU in time.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvagent.drivers import qmp
from hvagent.host import run
from hvagent.host.formats import QEMU_IMG
from hvagent.host.kvm import QEMU, AccelChoice, choose_accel

log = logging.getLogger(__name__)

FW_CFG_KEY_NAME = "opt/corehost/authorized_keys"
# qemu-img info on a local file; one ssh probe of a booting guest (ConnectTimeout=5).
INFO_TIMEOUT = 60.0
SSH_PROBE_TIMEOUT = 30.0


class BootError(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_format(image: Path) -> str:
    try:
        done = run.run([QEMU_IMG, "info", "--output=json", image], timeout=INFO_TIMEOUT,
                       check=False)
    except run.ProcessFailed as e:
        raise BootError(f"{image}: {e}") from None
    if done.returncode != 0:
        raise BootError(f"{image}: not a disk image qemu-img can read: {done.err.strip()}")
    return str(json.loads(done.out)["format"])


@dataclass
class BootOptions:
    image: Path
    accel: str = "auto"
    memory: int = 2048  # MiB
    cpus: int = 2
    ssh_key: Path | None = None  # public key handed to the guest via fw_cfg
    snapshot: bool = False  # writes go to a temp overlay, never to the image
    no_reboot: bool = False  # a guest reboot ends QEMU (tests: a panic loop cannot hang)
    serial_log: Path | None = None
    extra_args: list[str] = field(default_factory=list)


class Machine:
    """A QEMU process for one image; use as a context manager (powers off on exit)."""

    def __init__(self, opts: BootOptions) -> None:
        if not opts.image.is_file():
            raise BootError(f"{opts.image}: no such image")
        if opts.ssh_key is not None and not opts.ssh_key.is_file():
            raise BootError(f"{opts.ssh_key}: no such public key file")
        self.opts = opts
        self.workdir = Path(tempfile.mkdtemp(prefix="corehost-boot-"))
        self.serial_log = opts.serial_log or self.workdir / "serial.log"
        self.qmp_path = self.workdir / "qmp.sock"
        self.ssh_port = free_port()
        self.accel: AccelChoice = choose_accel(opts.accel)
        self.proc: run.Popen[Any] | None = None

    def command(self) -> list[str]:
        o = self.opts
        fmt = image_format(o.image)
        cmd = [
            QEMU, *self.accel.qemu_args, "-m", str(o.memory), "-smp", str(o.cpus),
            "-nodefaults", "-display", "none", "-no-user-config",
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            # With -snapshot every write is thrown away, so host flushes are pointless.
            "-drive", f"file={o.image},format={fmt},if=virtio"
            + (",cache=unsafe" if o.snapshot else ""),
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",  # sshd key generation would otherwise wait for entropy
        ]
        if o.snapshot:
            cmd.append("-snapshot")
        if o.no_reboot:
            cmd.append("-no-reboot")
        if o.ssh_key is not None:
            cmd += ["-fw_cfg", f"name={FW_CFG_KEY_NAME},file={o.ssh_key}"]
        return cmd + o.extra_args

    def start(self) -> Machine:
        self.serial_log.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        log.info("qemu: %s", " ".join(cmd))
        # Own session: Ctrl-C reaches us, and we power the guest off cleanly.
        try:
            self.proc = run.spawn(cmd, start_new_session=True)
        except run.ProcessFailed as e:
            raise BootError(str(e)) from None
        return self

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.poweroff()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def serial_tail(self, lines: int = 15) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def _died(self) -> BootError:
        assert self.proc is not None
        err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        return BootError(f"QEMU exited with {self.proc.returncode}: {err or self.serial_tail()}")

    def ssh_base(self, identity: Path) -> list[str]:
        return [
            "ssh", "-i", str(identity), "-p", str(self.ssh_port),
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "root@127.0.0.1",
        ]

    def wait_for_serial(self, text: str, timeout: float = 600.0) -> float:
        """Seconds until `text` shows up on the serial console."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.running:
                raise self._died()
            try:
                if text in self.serial_log.read_text(errors="replace"):
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.5)
        raise BootError(f"{text!r} not on the serial console after {timeout:.0f}s; last lines:\n"
                        f"{self.serial_tail()}")

    def wait_for_ssh(self, identity: Path, timeout: float = 600.0) -> float:
        """Seconds until `ssh root@... true` with the key succeeds."""
        start = time.monotonic()
        last = ""
        while time.monotonic() - start < timeout:
            if not self.running:
                raise self._died()
            try:
                done = run.run([*self.ssh_base(identity), "true"], timeout=SSH_PROBE_TIMEOUT,
                               check=False)
            except run.ProcessFailed as e:  # a probe that hung: try again
                last = str(e)
                continue
            if done.returncode == 0:
                return time.monotonic() - start
            last = done.err.strip()
            time.sleep(2)
        raise BootError(f"no ssh on 127.0.0.1:{self.ssh_port} after {timeout:.0f}s ({last}); "
                        f"serial console:\n{self.serial_tail()}")

    def poweroff(self, timeout: float = 120.0) -> int | None:
        """Stop the guest: ACPI power button, then QMP quit, then SIGKILL. Returns QEMU's
        exit status."""
        try:
            if self.proc is None:
                return None
            if self.proc.poll() is None:
                qmp.press_power_button(self.qmp_path)
                try:
                    self.proc.wait(timeout)
                except run.TimeoutExpired:
                    log.warning("guest ignored the ACPI power button for %.0fs; quitting", timeout)
                    qmp.quit_now(self.qmp_path)
                    try:
                        self.proc.wait(10)
                    except run.TimeoutExpired:
                        run.stop_group(self.proc, grace=0, sig=signal.SIGKILL)
            return self.proc.returncode
        finally:
            # The temp dir stays only while it holds the serial log (for reading later).
            self.qmp_path.unlink(missing_ok=True)
            if self.opts.serial_log is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
