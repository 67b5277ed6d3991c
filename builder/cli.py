"""The `corehost` command: profiles, build, boot, test.

User mistakes (a bad profile, a missing image, a bad argument) print one line and exit 2;
a build or boot that fails for another reason exits 1 and names the failing step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from builder import build as build_mod
from builder import qemu, render, usb
from builder.paths import display, image_tests_dir, profiles_dir, repo_root
from builder.profile import FIELDS, Profile, ProfileError, list_profiles, load
from builder.progress import Progress
from hvagent.errors import InvalidRequest
from hvagent.host import run
from hvagent.host.formats import DISK_FORMAT_LABELS, DiskFormat

EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """A mistake in what the user asked for; exit 2."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every cleanup that runs for an interrupt
    (DIB's process group stopped, mounts and loop devices released, the build's temp dir
    removed) runs for these too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_stopping: list[int] = []


def _on_stop_signal(signum: int, _frame: object) -> None:
    # Only the first signal unwinds; a second one (an impatient Ctrl-C, `timeout` and CI
    # both sending TERM) must not cut the cleanup short.
    if _stopping:
        return
    _stopping.append(signum)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


@contextlib.contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """INT, TERM and HUP all stop the command the same way while inside. A signal the
    caller set to be ignored (nohup, a background job's SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (main() called from a test thread)
        return
    _stopping.clear()
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    for sig, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(sig, _on_stop_signal)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _say(message: str) -> None:
    try:  # after SIGHUP the terminal may be gone
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corehost", description="Build and boot corehost images.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("profiles", help="list the profiles")
    s.add_argument("--dir", type=Path, default=None, help="profile directory (default profiles/)")
    s.add_argument("--fields", action="store_true",
                   help="print the profile settings as a Markdown table (for the docs)")

    s = sub.add_parser("build", help="build a profile into OUT/<profile>/")
    s.add_argument("profile", help="profile name or path to its YAML file")
    s.add_argument("--dry-run", action="store_true",
                   help="print the resolved profile and the DIB command line; build nothing")
    s.add_argument("--force", action="store_true", help="rebuild even when up to date")
    s.add_argument("--out", type=Path, default=None, help="output root (default out/)")

    for name, helptext in (("boot", "boot an image headless until Ctrl-C"),
                           ("test", "boot an image and run tests/image/ against it")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("image", type=Path, nargs="?", default=None,
                       help="a disk image: qcow2, raw, vhd, vhdx or the usb image")
        s.add_argument("--pxe", type=Path, default=None, metavar="DIR",
                       help="network-boot this PXE bundle (out/<profile>/pxe/) instead")
        s.add_argument("--firmware", choices=[str(f) for f in qemu.Firmware], default="bios",
                       help="bios (SeaBIOS, default) or uefi (OVMF)")
        s.add_argument("--usb", action="store_true",
                       help="attach the image as a USB stick (xHCI) instead of virtio")
        s.add_argument("--format", choices=DISK_FORMAT_LABELS, default=None,
                       help="the image's format, instead of what qemu-img detects")
        s.add_argument("--disk", type=Path, action="append", default=[], metavar="FILE",
                       dest="disks", help="an extra virtio disk whose writes are kept "
                       "(repeatable), e.g. one labelled COREHOST-DATA")
        s.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="a host config document for first boot (fw_cfg; over HTTP "
                       "with --pxe)")
        s.add_argument("--append", default="", metavar="ARGS",
                       help="with --pxe: added to the kernel command line")
        s.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
        s.add_argument("--memory", type=_positive, default=2048, metavar="MIB")
        s.add_argument("--cpus", type=_positive, default=2, metavar="N")
        s.add_argument("--serial-log", type=Path, default=None, metavar="FILE",
                       help="where the serial console goes (default: a temp file)")
        s.add_argument("--timeout", type=_positive, default=600, metavar="S",
                       help="seconds to wait for ssh")
        if name == "boot":
            s.add_argument("--ssh-key", type=Path, default=None, metavar="PUB",
                           help="public key for root, added to the host config document "
                           "(test-access images)")
            s.add_argument("--snapshot", action="store_true",
                           help="throw writes away (the image file stays unchanged)")
            s.add_argument("--no-console", action="store_true",
                           help="do not copy the serial console to the terminal")
        else:
            s.add_argument("--identity", type=Path, default=None, metavar="KEY",
                           help="ssh with this private key (KEY.pub goes into the host "
                           "config) instead of a key made for the run")
            s.epilog = ("Arguments after -- go to pytest, e.g. corehost test IMAGE -- -k ssh. "
                        "The tests find how the host was booted in COREHOST_BOOT (JSON).")

    s = sub.add_parser("write-usb", help="write a usb image onto a USB stick, verified")
    s.add_argument("image", type=Path, help="the build's usb output "
                   "(out/<profile>/<profile>.usb.img)")
    s.add_argument("device", type=Path,
                   help="a whole disk: /dev/sdX or /dev/disk/by-id/usb-...")
    s.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a host config document, placed as corehost.yaml on the stick's "
                   "COREHOST-CFG partition")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first -- is for pytest (`corehost test IMAGE -- -k ssh`).
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = parser().parse_args(argv)
    if passthrough and args.command != "test":
        print("corehost: arguments after -- are only for `corehost test`", file=sys.stderr)
        return EXIT_USAGE
    args.pytest_args = passthrough
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        with stop_signals_unwind():
            return int(COMMANDS[args.command](args))
    except (ProfileError, UsageError, render.RenderError, InvalidRequest) as e:
        print(f"corehost: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (build_mod.BuildError, qemu.BootError) as e:
        print(f"corehost: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Stopped as e:
        _say(f"corehost: stopped by {signal.Signals(e.signum).name}")
        return 128 + e.signum
    except KeyboardInterrupt:
        _say("corehost: interrupted")
        return 128 + signal.SIGINT


# ---------------------------------------------------------------- profiles


def cmd_profiles(args: argparse.Namespace) -> int:
    if args.fields:
        print("| setting | inherited as | default | meaning |\n|---|---|---|---|")
        for f in FIELDS:
            default = "" if f.default is None else json.dumps(f.default, default=str)
            print(f"| `{f.key}` | {f.merge} | {default} | {f.doc} |")
        return 0
    directory = args.dir or profiles_dir()
    if not directory.is_dir():
        raise UsageError(f"{display(directory)}: no such profile directory")
    rows = list_profiles(directory)
    bad = 0
    for file, p in rows:
        if isinstance(p, ProfileError):
            bad += 1
            print(f"{file.stem:<16} ERROR {p}")
            continue
        parent = f"(extends {p.extends_chain[0]})" if p.extends_chain else ""
        outs = ",".join(map(str, p.outputs))
        print(f"{p.name:<16} {outs:<12} {parent:<24} {p.description}")
    if not rows:
        print(f"no profiles in {display(directory)}", file=sys.stderr)
    return EXIT_USAGE if bad else 0


# ---------------------------------------------------------------- build


def _out_root(args: argparse.Namespace) -> Path:
    return args.out if args.out is not None else Path("out")


def _check_elements(profile: Profile) -> None:
    for name in profile.elements:
        if render.find_element(name) is None:
            raise profile.error("elements", f"element {name!r} not found in "
                                f"{display(render.element_search_path()[0])} or diskimage-builder")


def cmd_build(args: argparse.Namespace) -> int:
    profile = load(args.profile)
    _check_elements(profile)
    out_root = _out_root(args)
    if args.dry_run:
        cmd = build_mod.dry_run_command(profile, out_root)
        print("# resolved profile")
        print(yaml.safe_dump(profile.to_dict(), sort_keys=False).rstrip())
        print("\n# disk-image-create (environment set on top of the caller's)")
        print(cmd.shell())
        return 0
    result = build_mod.build(profile, out_root, force=args.force,
                             progress=Progress(f"build {profile.name}"))
    outdir = display(result.outdir)
    if result.reused:
        files = ", ".join(f"{outdir}/{a['file']}" for a in result.manifest["artifacts"].values())
        print(f"{profile.name}: up to date, reusing {files} (--force rebuilds)")
        return 0
    took = result.manifest["build"]["duration_s"]
    print(f"{profile.name}: built in {took:.0f}s")
    for a in result.manifest["artifacts"].values():
        print(f"  {outdir}/{a['file']}  {a['size'] / 2**20:.0f} MiB  sha256 {a['sha256'][:16]}…")
    print(f"  {outdir}/manifest.json  {outdir}/dib.log")
    return 0


# ---------------------------------------------------------------- boot and test


def _boot_options(args: argparse.Namespace, **extra: object) -> qemu.BootOptions:
    # qemu.check_options (run by Machine) states every clash and missing file once.
    return qemu.BootOptions(
        image=args.image, pxe=args.pxe, firmware=qemu.Firmware(args.firmware), usb=args.usb,
        format=DiskFormat(args.format) if args.format else None, disks=list(args.disks),
        config=args.config, append=args.append, accel=args.accel, memory=args.memory,
        cpus=args.cpus, serial_log=args.serial_log, **extra)  # type: ignore[arg-type]


def cmd_boot(args: argparse.Namespace) -> int:
    machine = qemu.Machine(_boot_options(args, ssh_key=args.ssh_key, snapshot=args.snapshot))
    print(f"accelerator: {machine.accel.accel} ({machine.accel.reason})", file=sys.stderr)
    machine.start()
    key = f"-i {args.ssh_key.with_suffix('')} " if args.ssh_key else ""
    served = (f"pxe: {display(args.pxe)} served on http://127.0.0.1:{machine.http_port}/\n"
              if args.pxe is not None else "")
    print(f"serial console: {machine.serial_log}\n{served}"
          f"ssh: ssh {key}-p {machine.ssh_port} -o StrictHostKeyChecking=no "
          f"-o UserKnownHostsFile=/dev/null root@127.0.0.1\nCtrl-C powers the guest off",
          file=sys.stderr, flush=True)
    pos = 0
    try:
        while machine.running:
            if not args.no_console:
                pos = _copy_new(machine.serial_log, pos)
            time.sleep(0.3)
    except KeyboardInterrupt:
        print("\npowering off…", file=sys.stderr, flush=True)
    rc = machine.poweroff()
    if not args.no_console:
        _copy_new(machine.serial_log, pos)
    print(f"QEMU exited ({rc})", file=sys.stderr)
    return 0


def _copy_new(path: Path, pos: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except OSError:
        return pos
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return pos + len(data)


SSH_CONFIG = """\
Host *
  User root
  IdentityFile {key}
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 10
  ControlMaster auto
  ControlPath {control}
  ControlPersist 120
"""


# The whole image suite, and the two short ssh helpers around it.
IMAGE_TESTS_TIMEOUT = 3600.0
SSH_HELPER_TIMEOUT = 60.0


def cmd_test(args: argparse.Namespace) -> int:
    tests = image_tests_dir()
    if not tests.is_dir():
        raise UsageError(f"{display(tests)}: no image tests found")
    extra = list(args.pytest_args)
    opts = _boot_options(args, snapshot=True, no_reboot=True)
    qemu.check_options(opts)  # before a key is made for a boot that cannot happen
    booting = display(args.image if args.image is not None else args.pxe)
    if args.identity is not None and not (args.identity.is_file()
                                          and _public(args.identity).is_file()):
        raise UsageError(f"--identity {args.identity}: needs the private key and "
                         f"{args.identity.name}.pub beside it")
    with tempfile.TemporaryDirectory(prefix="corehost-test-") as tmp:
        key = args.identity.resolve() if args.identity else Path(tmp) / "id_ed25519"
        if args.identity is None:
            run.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corehost-test",
                     "-f", key], timeout=SSH_HELPER_TIMEOUT)
        opts.ssh_key = _public(key)
        machine = qemu.Machine(opts)
        print(f"accelerator: {machine.accel.accel} ({machine.accel.reason})", file=sys.stderr)
        with machine:
            print(f"booting {booting}; serial console: {machine.serial_log}",
                  file=sys.stderr, flush=True)
            took = machine.wait_for_ssh(key, timeout=args.timeout)
            print(f"ssh ready on 127.0.0.1:{machine.ssh_port} after {took:.0f}s",
                  file=sys.stderr, flush=True)
            # The checks look at a booted system, not one still starting its units.
            settled, state = machine.wait_for_boot(key, timeout=args.timeout)
            print(f"boot settled ({state}) {settled:.0f}s later", file=sys.stderr, flush=True)
            config = Path(tmp) / "ssh_config"
            config.write_text(SSH_CONFIG.format(key=key, control=Path(tmp) / "cm-%C"))
            cmd = [sys.executable, "-m", "pytest", str(tests),
                   f"--hosts=ssh://root@127.0.0.1:{machine.ssh_port}",
                   f"--ssh-config={config}", "-p", "no:cacheprovider", *extra]
            env = {**os.environ,
                   "COREHOST_IMAGE": str((args.image or args.pxe).resolve()),
                   "COREHOST_SERIAL_LOG": str(machine.serial_log),
                   # what the guest was booted with, for the image tests to check
                   "COREHOST_ACCEL": str(machine.accel.accel),
                   "COREHOST_ACCEL_REASON": machine.accel.reason,
                   "COREHOST_BOOT": json.dumps(machine.booted())}
            rc = _run_image_tests(cmd, env)
            # End the shared ssh connection before the guest goes away.
            run.run(["ssh", "-F", config, "-p", str(machine.ssh_port), "-O", "exit",
                     "127.0.0.1"], timeout=SSH_HELPER_TIMEOUT, check=False)
        print(f"image tests: pytest exit {rc}", file=sys.stderr)
        return rc


def _public(key: Path) -> Path:
    """ssh-keygen's public half of a private key file: the same name plus .pub."""
    return key.with_name(key.name + ".pub")


def _run_image_tests(cmd: list[str], env: dict[str, str]) -> int:
    """pytest on the terminal (its output is the report); bounded, never left running."""
    proc = run.spawn(cmd, stdout=None, stderr=None, cwd=repo_root(), env=env)
    try:
        return proc.wait(IMAGE_TESTS_TIMEOUT)
    except run.TimeoutExpired:
        raise qemu.BootError(f"image tests still running after {IMAGE_TESTS_TIMEOUT:.0f}s; "
                             "stopped") from None
    finally:
        run.stop(proc)


# ---------------------------------------------------------------- write-usb


def cmd_write_usb(args: argparse.Namespace) -> int:
    try:
        written = usb.write(args.image, args.device, config=args.config)
    except usb.WriteFailed as e:
        print(f"corehost: {e}", file=sys.stderr)
        return EXIT_FAILED
    except usb.Interrupted as e:
        _say(f"corehost: {e}")
        return 128 + e.signum
    print(f"sha256 {written.sha256}")
    print(f"verified: {args.device} holds {args.image} ({written.size} bytes)")
    if written.config_partition is not None:
        print(f"config: {args.config} is {usb.CONFIG_FILE} on partition "
              f"{written.config_partition.number} ({usb.CONFIG_PARTITION}), read back")
    return 0


COMMANDS = {"profiles": cmd_profiles, "build": cmd_build, "boot": cmd_boot, "test": cmd_test,
            "write-usb": cmd_write_usb}


if __name__ == "__main__":
    sys.exit(main())
