"""Running diskimage-builder: the exact command line and environment, and the run itself.

The command (`disk-image-create`) gets ELEMENTS_PATH = the repo's elements/ + the build's
overlay, DIB_RELEASE from the profile, the Debian mirrors this host's apt already uses,
the profile's packages via `-p` and its size via `--image-size`. DIB's cache
(~/.cache/image-create, debootstrap tarballs) is kept between builds.

While DIB runs, its log lines are parsed for phases ("Running hooks from .../root.d")
and scripts ("dib-run-parts Running .../08-debootstrap"): a rich progress display on a
terminal, plain log lines otherwise. The full log goes to a file. A failure is reported
with the step that failed and the last error lines.
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
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import hostcompat
from builder.paths import elements_dir
from builder.profile import Profile
from builder.render import OVERLAY

log = logging.getLogger(__name__)

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# bootloader element's default, kept when the profile appends to the command line.
DIB_DEFAULT_CMDLINE = "nofb nomodeset gfxpayload=text"
# DIB's phases in the order it runs them (hook directories, then the image conversion).
PHASES = ("elements", "root", "extra-data", "pre-install", "install", "post-install",
          "post-root", "block-device", "pre-finalise", "finalise", "cleanup", "convert")


def image_cache_dir() -> Path:
    return Path.home() / ".cache" / "image-create"


# ---------------------------------------------------------------- mirrors from host apt


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]


def parse_deb822(text: str) -> list[AptSource]:
    out: list[AptSource] = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(AptSource(uri.rstrip("/"), tuple(fields.get("suites", "").split())))
    return out


def parse_one_line(text: str) -> list[AptSource]:
    out: list[AptSource] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # drop [arch=... signed-by=...] options
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            out.append(AptSource(parts[1].rstrip("/"), (parts[2],)))
    return out


def host_apt_sources(apt_dir: Path = Path("/etc/apt")) -> list[AptSource]:
    sources: list[AptSource] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            sources += parse_deb822(text)
        elif f.suffix == ".list":
            sources += parse_one_line(text)
    return sources


def host_mirrors(release: str, apt_dir: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(distribution mirror, security mirror) this host uses for `release`, else Debian's."""
    mirror = security = None
    for s in host_apt_sources(apt_dir):
        if not s.uri.startswith(("http://", "https://")):
            continue
        if mirror is None and release in s.suites:
            mirror = s.uri
        if security is None and f"{release}-security" in s.suites:
            security = s.uri
    return mirror or DEFAULT_MIRROR, security or DEFAULT_SECURITY_MIRROR


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
    if profile.kernel_cmdline:
        env["DIB_BOOTLOADER_DEFAULT_CMDLINE"] = f"{DIB_DEFAULT_CMDLINE} {profile.kernel_cmdline}"
    # DIB calls helpers installed beside it (dib-block-device, ...).
    bindir = str(Path(dib_executable()).parent)
    path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    if os.path.isabs(bindir) and bindir not in path.split(":"):
        env["PATH"] = f"{bindir}:{path}"
    argv = [dib_executable(), "-t", "qcow2", "-o", str(output_base)]
    if profile.image_size_gb is not None:
        argv += ["--image-size", profile.image_size_gb]
    if profile.packages:
        argv += ["-p", ",".join(profile.packages)]
    argv += [*profile.elements, OVERLAY]
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
    """Run DIB, tee its output to log_path, call report on each new step; raise DibFailed."""
    hostcompat.ensure_kpartx()
    env = {**os.environ, **cmd.env}
    state = DibState()
    with cache_lock(Path(cmd.env["DIB_IMAGE_CACHE"])), open(log_path, "w") as logf:
        logf.write("# " + cmd.shell().replace("\n", "\n# ") + "\n")
        logf.flush()
        proc = subprocess.Popen(
            cmd.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
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
            _stop(proc)
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


def _stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt DIB like Ctrl-C would, then end whatever of its group is left."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60.0)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (chrooted apt, sudo) of DIB's group
    except ProcessLookupError:
        pass
    proc.wait()


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
    loops = subprocess.run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"],
                           capture_output=True, text=True).stdout.splitlines()
    for d in sorted(dirs):
        if not os.path.isdir(d):
            continue
        for dev, _, back in (ln.partition(" ") for ln in loops):
            if back.strip().startswith(d + "/"):
                for link in Path("/dev/mapper").glob(f"{Path(dev).name}p*"):
                    link.unlink(missing_ok=True)
                subprocess.run(["partx", "-d", dev], capture_output=True)
                subprocess.run(["losetup", "-d", dev], capture_output=True)
        for point in sorted(mounts_under(d), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        if mounts_under(d):
            log.warning("%s: still has mounts after an interrupted build; left in place", d)
            continue
        # --one-file-system: never follow into anything that is still mounted
        subprocess.run(["rm", "-rf", "--one-file-system", d], capture_output=True)


# ---------------------------------------------------------------- progress


class Progress:
    """DIB phases as a rich progress bar on a terminal, else one log line per step."""

    def __init__(self, title: str, terminal: bool | None = None) -> None:
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.title = title
        self.started = time.monotonic()
        self._progress: Any = None  # rich.progress.Progress, imported only on a terminal
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.fields[step]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=len(PHASES), step="start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr,
                  flush=True)

    def __call__(self, state: DibState) -> None:
        if self._progress is not None and self._task is not None:
            done = PHASES.index(state.phase) if state.phase in PHASES else 0
            self._progress.update(self._task, completed=done, step=state.step)
        else:
            self.note(f"dib: {state.step}")
