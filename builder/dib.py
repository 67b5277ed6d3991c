"""Running diskimage-builder: the exact command line and environment, and the run itself.

The command (`disk-image-create`) gets ELEMENTS_PATH = the repo's elements/ + the build's
overlay, DIB_RELEASE from the profile, the Debian mirrors this host's apt already uses
(builder.mirrors), the profile's packages via `-p` and its size via `--image-size`.
DIB's cache (~/.cache/image-create, debootstrap tarballs) is kept between builds.

While DIB runs, its log lines are parsed for phases ("Running hooks from .../root.d")
and scripts ("dib-run-parts Running .../08-debootstrap") and handed to a reporter
(builder.progress shows them). The full log goes to a file. A failure is reported with
the step that failed and the last error lines; an interrupted run leaves no loop
device, mount or work directory behind.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from builder.mirrors import host_mirrors
from builder.paths import elements_dir
from builder.profile import Profile
from builder.render import OVERLAY
from hvagent.host import run

log = logging.getLogger(__name__)

# bootloader element's default, kept when the profile appends to the command line.
DIB_DEFAULT_CMDLINE = "nofb nomodeset gfxpayload=text"
# DIB's phases in the order it runs them (hook directories, then the image conversion).
PHASES = ("elements", "root", "extra-data", "pre-install", "install", "post-install",
          "post-root", "block-device", "pre-finalise", "finalise", "cleanup", "convert")


# Each cleanup command after an interrupted build (losetup, umount, rm of a work dir).
CLEANUP_TIMEOUT = 300.0


def image_cache_dir() -> Path:
    return Path.home() / ".cache" / "image-create"


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class DibCommand:
    argv: list[str]
    env: dict[str, str]  # set on top of the inherited environment

    def shell(self) -> str:
        """The command as one copy-pasteable shell line."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " \\\n  ".join([*assigns, shlex.join(self.argv)])


def dib_executable() -> str:
    beside = Path(sys.executable).parent / "disk-image-create"
    return str(beside) if beside.exists() else "disk-image-create"


def dib_command(profile: Profile, build_dir: Path, apt_dir: Path = Path("/etc/apt")) -> DibCommand:
    """The DIB invocation for a build working in build_dir (overlay in build_dir/elements,
    DIB's own work dirs in build_dir/dibtmp, its output at build_dir/dib/<profile>)."""
    mirror, security = host_mirrors(profile.release, apt_dir)
    overlay_elements = build_dir / "elements"
    output_base = build_dir / "dib" / profile.name
    env = {
        "ELEMENTS_PATH": f"{elements_dir()}:{overlay_elements}",
        "DIB_RELEASE": profile.release,
        "DIB_DISTRIBUTION_MIRROR": mirror,
        "DIB_DEBIAN_SECURITY_MIRROR": security,
        # debian-minimal's ifupdown file is never read; the image brings its own network.
        "DIB_APT_MINIMAL_CREATE_INTERFACES": "0",
        "DIB_IMAGE_CACHE": str(image_cache_dir()),
        # DIB's dib_build.*/dib_image.* go here (not /tmp), so an interrupted build's
        # leftovers are known to be ours. TMPDIR stays as it is: package scripts in the
        # chroot would not find a host-only TMPDIR.
        "TMP_DIR": str(build_dir / "dibtmp"),
    }
    if profile.kernel_modules:  # read by server-core's kernel-modules-rules
        env["DIB_COREHOST_KERNEL_MODULES"] = " ".join(profile.kernel_modules)
    if profile.kernel_cmdline:
        env["DIB_BOOTLOADER_DEFAULT_CMDLINE"] = f"{DIB_DEFAULT_CMDLINE} {profile.kernel_cmdline}"
    # DIB calls helpers installed beside it (dib-block-device, ...).
    bindir = str(Path(dib_executable()).parent)
    path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    if os.path.isabs(bindir) and bindir not in path.split(":"):
        env["PATH"] = f"{bindir}:{path}"
    # Raw: it is what the base cache keeps and the agent layer mounts; outputs convert it.
    argv = [dib_executable(), "-t", "raw", "-o", str(output_base)]
    if profile.image_size_gb is not None:
        argv += ["--image-size", profile.image_size_gb]
    if profile.packages:
        argv += ["-p", ",".join(profile.packages)]
    argv += [*profile.build_elements, OVERLAY]
    return DibCommand(argv, env)


# ---------------------------------------------------------------- running it

_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \| ")
_HOOKS = re.compile(r"^Running hooks from \S+/([\w-]+)\.d$")
_SCRIPT = re.compile(r"^dib-run-parts Running (\S+)/([\w-]+)\.d/(\S+)$")
_END_PROFILING = re.compile(r"^dib-run-parts -+ END PROFILING -+$")
_CONVERT = re.compile(r"^Converting image using qemu-img convert")
_ELEMENTS = re.compile(r"^(Building elements|Expanded element dependencies)")
_ERRORISH = re.compile(r"(^E: |ERROR|[Ee]rror|failed|Unable to|not found|No such)")
_NOISE = re.compile(r"Can not write log \(Is /dev/pts mounted\?\)")


@dataclass
class DibState:
    phase: str = "start"
    script: str = ""
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=400))

    between: bool = False  # a hook directory has finished, the next not yet started

    @property
    def step(self) -> str:
        if self.between:
            if self.phase == "install":
                return "installing the profile's packages (-p, after install.d)"
            return f"after {self.phase}.d"
        if self.phase in ("start", "elements", "convert"):
            return self.phase
        return f"{self.phase}.d/{self.script}" if self.script else f"{self.phase}.d"

    def feed(self, line: str) -> bool:
        """Update from one log line; True when the phase or script changed."""
        line = _STAMP.sub("", line.rstrip("\n"))
        self.tail.append(line)
        if m := _HOOKS.match(line):
            self.phase, self.script, self.between = m.group(1), "", False
            return True
        if m := _SCRIPT.match(line):
            self.phase, self.script, self.between = m.group(2), m.group(3), False
            return True
        if _END_PROFILING.match(line):
            # Between hook directories DIB runs its own steps; right after install.d it
            # installs the packages given with -p (outside any hook script).
            self.script = ""
            self.between = True
            return True
        if _CONVERT.match(line):
            self.phase, self.script, self.between = "convert", "", False
            return True
        if _ELEMENTS.match(line) and self.phase == "start":
            self.phase = "elements"
            return True
        return False

    def error_lines(self, n: int = 6) -> list[str]:
        recent = [ln.removeprefix("> ").strip() for ln in list(self.tail)[-60:]]
        recent = [ln for ln in recent if ln and not _NOISE.search(ln)
                  and not ln.startswith("+")]
        errors = [ln for ln in recent if _ERRORISH.search(ln)]
        return (errors or recent)[-n:]


class DibFailed(Exception):
    def __init__(self, step: str, returncode: int, lines: list[str], log_path: Path) -> None:
        self.step, self.returncode, self.lines, self.log_path = step, returncode, lines, log_path
        detail = "; ".join(lines)
        super().__init__(f"disk-image-create failed in {step} (exit {returncode}): {detail}")


Reporter = Callable[[DibState], None]


def run_dib(cmd: DibCommand, log_path: Path, report: Reporter | None = None,
            cwd: Path | None = None) -> DibState:
    """Run DIB, tee its output to log_path, call report on each new step; raise DibFailed.
    The caller has made `kpartx` work on this host (builder.hostcompat.ensure_kpartx)."""
    env = {**os.environ, **cmd.env}
    state = DibState()
    with cache_lock(Path(cmd.env["DIB_IMAGE_CACHE"])), open(log_path, "w") as logf:
        logf.write("# " + cmd.shell().replace("\n", "\n# ") + "\n")
        logf.flush()
        proc = run.spawn(
            cmd.argv, env=env, cwd=cwd, stdout=run.PIPE, stderr=run.STDOUT, text=True,
            errors="replace", bufsize=1,
            start_new_session=True,  # so an interrupt reaches DIB's whole process group
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                logf.write(line)
                if state.feed(line) and report is not None:
                    report(state)
            rc = proc.wait()
        except BaseException:
            # Like Ctrl-C would, then whatever of its group is left (chrooted apt, sudo).
            run.stop_group(proc, grace=60.0, sig=signal.SIGINT)
            release_work_dir(cmd)
            raise
    if rc != 0:
        raise DibFailed(state.step, rc, state.error_lines(), log_path)
    return state


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One build at a time per DIB cache: two DIB runs sharing it collide on apt's archive
    lock inside their chroots and fail. A second build waits and says why."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".corehost.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another build is using %s; waiting for it to finish", cache)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def release_work_dir(cmd: DibCommand) -> None:
    work = cmd.env.get("TMP_DIR")
    if work:
        release_tmpdirs({str(p) for p in Path(work).glob("dib_*")})


def mounts_under(d: str) -> list[str]:
    with open("/proc/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return [m for m in points if m == d or m.startswith(d + "/")]


def release_tmpdirs(dirs: set[str]) -> None:
    """Undo what an interrupted DIB leaves behind (its EXIT trap does not survive a
    Ctrl-C reliably): loop devices and mounts under its work dirs, then the dirs."""
    loops = run.run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"], timeout=CLEANUP_TIMEOUT,
                    check=False).out.splitlines()
    for d in sorted(dirs):
        if not os.path.isdir(d):
            continue
        for dev, _, back in (ln.partition(" ") for ln in loops):
            if back.strip().startswith(d + "/"):
                for link in Path("/dev/mapper").glob(f"{Path(dev).name}p*"):
                    link.unlink(missing_ok=True)
                run.run(["partx", "-d", dev], timeout=CLEANUP_TIMEOUT, check=False)
                run.run(["losetup", "-d", dev], timeout=CLEANUP_TIMEOUT, check=False)
        for point in sorted(mounts_under(d), key=len, reverse=True):
            run.run(["umount", "-l", point], timeout=CLEANUP_TIMEOUT, check=False)
        if mounts_under(d):
            log.warning("%s: still has mounts after an interrupted build; left in place", d)
            continue
        remove_tree(d)


def remove_tree(d: str | Path) -> None:
    """rm -rf, never following into anything that is still mounted there."""
    run.run(["rm", "-rf", "--one-file-system", str(d)], timeout=CLEANUP_TIMEOUT, check=False)
