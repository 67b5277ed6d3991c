"""Booting a built output in QEMU, headless: serial log, ssh on a loopback port, clean stop.

One harness for every output, so each runs the same image tests: a disk image (qcow2,
raw, vhd, vhdx; on virtio or, with `usb`, on an xHCI USB stick) or a PXE bundle, under
SeaBIOS or OVMF (UEFI), with extra virtio disks.

The accelerator comes from hvagent.host.kvm.choose_accel (KVM only when a probe guest
really runs under it, else TCG with SVM exposed). Networking is QEMU user mode with the
guest's port 22 forwarded to a free 127.0.0.1 port. A host config document (`config`,
merged with a document that installs `ssh_key` for root) reaches a disk boot as the
fw_cfg item opt/corehost/config; a PXE boot fetches it over HTTP instead, named with its
sha256 on the kernel command line. `snapshot=True` keeps the image file untouched (its
sha256 stays what manifest.json says) while extra disks keep their writes, so a test can
boot twice with the same data disk. Power-off is ACPI through QMP, then an immediate
quit, then a kill, each only when the previous did not end QEMU in time.

PXE: the bundle directory is mirrored (symlinks) into a served directory next to the
site files the harness writes, which QEMU's TFTP server and an HTTP server on a free
127.0.0.1 port both serve; the guest reaches the latter as 10.0.2.2. Under BIOS the NIC's
iPXE option ROM takes `http://10.0.2.2:PORT/boot.ipxe` as the DHCP boot file and
resolves the bundle's relative paths against it; under UEFI OVMF loads grubnetx64.efi
over TFTP, and GRUB reads grub/grub.cfg (which sources grub/site.cfg) from there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hvagent.drivers import qmp
from hvagent.errors import InvalidRequest
from hvagent.host import hostconfig, run
from hvagent.host.formats import QEMU_IMG, DiskFormat
from hvagent.host.kvm import QEMU, AccelChoice, choose_accel

log = logging.getLogger(__name__)

FW_CFG_CONFIG_NAME = "opt/corehost/config"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# What QEMU user networking calls the host; 127.0.0.1 there is this address in the guest.
GUEST_HOST_ADDR = "10.0.2.2"
# The bundle files each firmware's network boot starts from (builder.pxe writes them).
PXE_IPXE_SCRIPT = "boot.ipxe"
PXE_GRUB_EFI = "grubnetx64.efi"
PXE_GRUB_CFG = "grub/grub.cfg"
# Files the harness adds to the served copy of a bundle (they win over the bundle's own).
SITE_IPXE = "site.ipxe"
SITE_GRUB = "grub/site.cfg"
SERVED_CONFIG = "host-config.yaml"
# qemu-img info on a local file; one ssh probe of a booting guest (ConnectTimeout=5).
INFO_TIMEOUT = 60.0
SSH_PROBE_TIMEOUT = 30.0


class Firmware(StrEnum):
    BIOS = "bios"  # SeaBIOS, QEMU's default
    UEFI = "uefi"  # OVMF


class BootError(Exception):
    pass


class BootOptionsError(BootError, InvalidRequest):
    """What was asked for cannot be booted (a missing file, a clash of options); the
    message is one line naming the file or the `corehost boot` flag."""


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
        raise BootOptionsError(f"{image}: not a disk image qemu-img can read: "
                               f"{run.tail(done.err)}")
    return str(json.loads(done.out)["format"])


def _opt(value: object) -> str:
    """A value inside a QEMU -drive/-netdev option list, where a comma is written twice."""
    return str(value).replace(",", ",,")


@dataclass
class BootOptions:
    """What to boot; the fields are `corehost boot`'s flags, and errors name them so."""

    image: Path | None = None  # a disk image; None with `pxe`
    accel: str = "auto"
    memory: int = 2048  # MiB; a PXE boot holds the root file system in it
    cpus: int = 2
    firmware: Firmware = Firmware.BIOS
    usb: bool = False  # the image on a USB stick (xHCI) instead of virtio
    format: DiskFormat | None = None  # the image's format; None: what qemu-img detects
    pxe: Path | None = None  # a PXE bundle directory, booted over the network
    disks: list[Path] = field(default_factory=list)  # extra virtio disks, writes kept
    config: Path | None = None  # a host config document for first boot
    ssh_key: Path | None = None  # public key for root, merged into the document
    append: str = ""  # PXE only: added to the kernel command line
    snapshot: bool = False  # writes to the image go to a temp overlay, never to the image
    no_reboot: bool = False  # a guest reboot ends QEMU (tests: a panic loop cannot hang)
    serial_log: Path | None = None
    extra_args: list[str] = field(default_factory=list)


def _is_disk(path: Path) -> bool:
    return path.is_file() or path.is_block_device()


def check_options(o: BootOptions) -> None:
    """Every clash and missing file, before anything is started or written."""
    if (o.image is None) == (o.pxe is None):
        raise BootOptionsError("give either an IMAGE or --pxe DIR" if o.image is None
                               else "give an IMAGE or --pxe DIR, not both")
    if o.image is not None:
        if not _is_disk(o.image):
            raise BootOptionsError(f"{o.image}: no such image")
        if o.append:
            raise BootOptionsError("--append is only for --pxe (a disk boots the command "
                                   "line its boot loader holds)")
    if o.pxe is not None:
        for flag, given in (("--usb", o.usb), ("--format", o.format is not None)):
            if given:
                raise BootOptionsError(f"{flag} is for a disk image, not for --pxe")
        if not o.pxe.is_dir():
            raise BootOptionsError(f"--pxe {o.pxe}: no such directory")
        for name in pxe_entry_files(o.firmware):
            if not (o.pxe / name).is_file():
                raise BootOptionsError(f"--pxe {o.pxe}: no {name} in it (not a PXE bundle "
                                       f"for --firmware {o.firmware})")
    if any(not c.isprintable() for c in o.append):
        raise BootOptionsError("--append: control characters (a newline among them) cannot "
                               "go on a kernel command line")
    seen = {o.image.resolve()} if o.image is not None else set()
    for disk in o.disks:
        if not _is_disk(disk):
            raise BootOptionsError(f"--disk {disk}: no such disk image")
        if disk.resolve() in seen:
            raise BootOptionsError(f"--disk {disk}: already attached (QEMU would lock it "
                                   "twice)")
        seen.add(disk.resolve())
    if o.config is not None and not o.config.is_file():
        raise BootOptionsError(f"--config {o.config}: no such file")
    if o.ssh_key is not None and not o.ssh_key.is_file():
        raise BootOptionsError(f"--ssh-key {o.ssh_key}: no such file")


def pxe_entry_files(firmware: Firmware) -> tuple[str, ...]:
    """The bundle files a network boot under `firmware` starts from."""
    return (PXE_IPXE_SCRIPT,) if firmware is Firmware.BIOS else (PXE_GRUB_EFI, PXE_GRUB_CFG)


def host_config(config: Path | None, ssh_key: Path | None) -> dict[str, Any] | None:
    """The document the guest gets: `config` (validated), with root's key from `ssh_key`
    merged in; None when neither is given."""
    doc: dict[str, Any] | None = None
    try:
        if config is not None:
            # As written (exclude_unset): no defaults the guest would read as settings.
            doc = hostconfig.load_file(config).model_dump(mode="json", exclude_unset=True)
        if ssh_key is not None:
            try:
                pub = ssh_key.read_text().strip()
                key_doc = hostconfig.for_ssh_key(pub)
            except (OSError, UnicodeDecodeError, hostconfig.HostConfigError) as e:
                raise BootOptionsError(f"--ssh-key {ssh_key}: {e}") from None
            if doc is None:
                doc = key_doc
            else:
                doc = hostconfig.merge(doc, key_doc)
                hostconfig.validate(doc, f"--config {config} with --ssh-key {ssh_key}")
    except hostconfig.HostConfigError as e:
        raise BootOptionsError(str(e)) from None
    return doc


def _ipxe_site(extra: str) -> str:
    # iPXE's `set` takes the rest of the line as the value.
    return "#!ipxe\n" + (f"set corehost_append {extra}\n" if extra else "")


def _grub_quote(text: str) -> str:
    # Inside GRUB's double quotes a backslash escapes `$`, `"` and itself.
    return '"' + "".join("\\" + c if c in '\\"$' else c for c in text) + '"'


def _grub_site(base: str, extra: str) -> str:
    return f"set corehost_base={base}\nset corehost_append={_grub_quote(extra)}\n"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("pxe http: " + format, *args)


class _Server:
    """The served directory over HTTP on a free loopback port, in a thread."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = int(self.httpd.server_address[1])
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pxe-http",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(10)
            self.thread = None
        self.httpd.server_close()


class Machine:
    """A QEMU process for one output; use as a context manager (powers off on exit)."""

    def __init__(self, opts: BootOptions) -> None:
        check_options(opts)
        self.document = host_config(opts.config, opts.ssh_key)
        self.opts = opts
        self.workdir = Path(tempfile.mkdtemp(prefix="corehost-boot-"))
        self.serial_log = opts.serial_log or self.workdir / "serial.log"
        self.qmp_path = self.workdir / "qmp.sock"
        self.vars_path = self.workdir / "OVMF_VARS.fd"  # UEFI variables of this boot only
        self.served = self.workdir / "served"  # PXE: what TFTP and HTTP serve
        self.config_path = (self.served if opts.pxe else self.workdir) / SERVED_CONFIG
        self.ssh_port = free_port()
        self.accel: AccelChoice = choose_accel(opts.accel)
        self.http: _Server | None = _Server(self.served) if opts.pxe else None
        self.http_port = self.http.port if self.http is not None else None
        self.proc: run.Popen[Any] | None = None
        self._formats: dict[Path, str] = {}

    def _format(self, disk: Path) -> str:
        if disk not in self._formats:
            self._formats[disk] = image_format(disk)
        return self._formats[disk]

    def image_format(self) -> str | None:
        """The format QEMU is told the image has (None for a PXE boot)."""
        o = self.opts
        if o.image is None:
            return None
        return o.format.qemu if o.format is not None else self._format(o.image)

    def kernel_append(self) -> str:
        """PXE: what the site files add to the bundle's kernel command line."""
        words = []
        if self.document is not None:
            digest = hashlib.sha256(self._document_bytes()).hexdigest()
            words += [f"corehost.config=http://{GUEST_HOST_ADDR}:{self.http_port}/"
                      f"{SERVED_CONFIG}", f"corehost.config_sha256={digest}"]
        if self.opts.append:
            words.append(self.opts.append)
        return " ".join(words)

    def _document_bytes(self) -> bytes:
        assert self.document is not None
        return hostconfig.dump(self.document).encode()

    def booted(self) -> dict[str, Any]:
        """How the guest was booted, for the image tests (COREHOST_BOOT)."""
        o = self.opts
        fmt = self.image_format()
        return {"firmware": str(o.firmware), "usb": o.usb,
                "pxe": str(o.pxe.resolve()) if o.pxe is not None else None,
                "format": DiskFormat(fmt).label if fmt in set(DiskFormat) else fmt,
                "disks": [str(d.resolve()) for d in o.disks], "config": o.config is not None}

    def command(self) -> list[str]:
        o = self.opts
        cmd = [
            QEMU, *self.accel.qemu_args, "-m", str(o.memory), "-smp", str(o.cpus),
            "-nodefaults", "-display", "none", "-no-user-config",
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if o.firmware is Firmware.UEFI:
            cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file={_opt(OVMF_CODE)}",
                    "-drive", f"if=pflash,format=raw,file={_opt(self.vars_path)}"]
        if o.image is not None:
            # snapshot=on throws the image's writes away, so host flushes are pointless.
            drive = f"file={_opt(o.image)},format={self.image_format()}"
            keep_out = ",snapshot=on,cache=unsafe" if o.snapshot else ""
            if o.usb:
                cmd += ["-drive", f"{drive},if=none,id=stick{keep_out}",
                        "-device", "qemu-xhci,id=xhci",
                        "-device", "usb-storage,bus=xhci.0,drive=stick,bootindex=1"]
            else:
                cmd += ["-drive", f"{drive},if=virtio{keep_out}"]
        for disk in o.disks:
            cmd += ["-drive", f"file={_opt(disk)},format={self._format(disk)},if=virtio"]
        netdev = "user,id=net0"
        nic = "virtio-net-pci,netdev=net0"
        if o.pxe is not None:
            boot = (f"http://{GUEST_HOST_ADDR}:{self.http_port}/{PXE_IPXE_SCRIPT}"
                    if o.firmware is Firmware.BIOS else PXE_GRUB_EFI)
            netdev += f",tftp={_opt(self.served)},bootfile={_opt(boot)}"
            nic += ",bootindex=0"
        cmd += [
            "-netdev", f"{netdev},hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", nic,
            "-device", "virtio-rng-pci",  # sshd key generation would otherwise wait for entropy
        ]
        if o.no_reboot:
            cmd.append("-no-reboot")
        if self.document is not None and o.pxe is None:
            cmd += ["-fw_cfg", f"name={FW_CFG_CONFIG_NAME},file={_opt(self.config_path)}"]
        return cmd + o.extra_args

    def prepare(self) -> None:
        """Write what the command line refers to: the UEFI variables, the document, the
        served copy of a PXE bundle with its site files."""
        o = self.opts
        if o.firmware is Firmware.UEFI:
            if not OVMF_CODE.is_file() or not OVMF_VARS.is_file():
                raise BootError(f"{OVMF_CODE}: no OVMF firmware here (Debian package ovmf)")
            shutil.copyfile(OVMF_VARS, self.vars_path)
        if o.pxe is not None:
            bundle = o.pxe.resolve()
            shutil.rmtree(self.served, ignore_errors=True)  # prepared afresh each time
            self.served.mkdir()
            for path in sorted(bundle.rglob("*")):
                target = self.served / path.relative_to(bundle)
                if path.is_dir() and not path.is_symlink():
                    target.mkdir(exist_ok=True)
                else:
                    target.symlink_to(path.resolve())
            extra = self.kernel_append()
            site = {SITE_IPXE: _ipxe_site(extra),
                    SITE_GRUB: _grub_site(f"(http,{GUEST_HOST_ADDR}:{self.http_port})", extra)}
            for name, text in site.items():
                target = self.served / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)  # a bundle's own site file is replaced
                target.write_text(text)
        if self.document is not None:
            self.config_path.unlink(missing_ok=True)
            self.config_path.write_bytes(self._document_bytes())

    def start(self) -> Machine:
        self.serial_log.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        self.prepare()
        log.info("qemu: %s", " ".join(cmd))
        if self.http is not None:
            self.http.start()
        # Own session: Ctrl-C reaches us, and we power the guest off cleanly.
        try:
            self.proc = run.spawn(cmd, start_new_session=True)
        except run.ProcessFailed as e:
            self._stop_http()
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

    def wait_for_boot(self, identity: Path, timeout: float = 600.0) -> tuple[float, str]:
        """Seconds until systemd's boot job queue is empty, and the state it reached
        (`running`, or `degraded` when a unit failed: the checks say which). A unit of
        Type=notify, as the agent's, is active only once it said it is ready."""
        start = time.monotonic()
        try:
            done = run.run([*self.ssh_base(identity), "systemctl", "is-system-running",
                            "--wait"], timeout=timeout, check=False)
        except run.ProcessFailed:
            return time.monotonic() - start, f"still starting after {timeout:.0f}s"
        return time.monotonic() - start, done.out.strip() or done.err.strip()

    def _stop_http(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None

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
            self._stop_http()
            # The temp dir stays only while it holds the serial log (for reading later);
            # the document (it may hold a bootstrap token) never outlives the boot.
            self.qmp_path.unlink(missing_ok=True)
            self.config_path.unlink(missing_ok=True)
            self.vars_path.unlink(missing_ok=True)
            shutil.rmtree(self.served, ignore_errors=True)
            if self.opts.serial_log is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
