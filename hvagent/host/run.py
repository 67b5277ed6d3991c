"""The one process runner: every subprocess the product starts goes through here.

Like mkosi's ``run()``: the argv is logged at debug, every call has a timeout, and a
failure raises ProcessFailed whose message names the program and ends with the tail of
its stderr, so callers never format subprocess errors themselves.

- ``run``      a short command, waited for (bytes out, bytes err, status).
- ``arun``     the same from asyncio code, without blocking the loop.
- ``spawn``    a long-lived process (a QEMU, a FUSE export, disk-image-create) whose
               lifetime the caller owns; ``stop`` ends one, bounded; ``stop_group``
               ends one started in its own session with all its children.
- ``aspawn``   ``spawn`` for asyncio code.

asyncio is imported by the two functions that use it, and logging is used once someone
imported it: hvdisk imports this module on every run, and those imports alone would cost
more than a small qemu-img conversion.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from hvagent.errors import OperationFailed

if TYPE_CHECKING:
    import asyncio

LOGGER = "hvagent.run"


def _log_argv(how: str, args: Sequence[str]) -> None:
    # Only once something has imported logging: before that nobody configured it, so a
    # debug record would be dropped anyway, and hvdisk saves the import (~5-10 ms a run).
    if "logging" in sys.modules:
        sys.modules["logging"].getLogger(LOGGER).debug("%s: %s", how, _describe(args))

DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
TimeoutExpired = subprocess.TimeoutExpired
Popen = subprocess.Popen

# How much of stderr an error message carries.
TAIL_LINES = 5
TAIL_CHARS = 600


class ProcessFailed(OperationFailed):
    """A command exited non-zero, timed out, or could not be started."""

    def __init__(self, message: str, *, argv: Sequence[str], returncode: int | None,
                 stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class Completed(NamedTuple):  # (not a dataclass: that import costs hvdisk ~10 ms)
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


def tail(data: bytes | str | None, lines: int = TAIL_LINES) -> str:
    """The last few non-empty lines of a process's output, on one line."""
    if not data:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[-TAIL_CHARS:]


def _name(argv: Sequence[str], what: str | None) -> str:
    return what or Path(str(argv[0])).name


def _describe(argv: Sequence[str]) -> str:
    return shlex.join(str(a) for a in argv)


def _failure(argv: Sequence[str], what: str | None, returncode: int | None,
             stdout: bytes, stderr: bytes, timeout: float | None) -> ProcessFailed:
    name = _name(argv, what)
    if returncode is None:
        message = f"{name} did not finish within {timeout:g} s"
    else:
        message = f"{name} failed (exit {returncode})"
    detail = tail(stderr) or tail(stdout)
    if detail:
        message += f": {detail}"
    return ProcessFailed(message, argv=argv, returncode=returncode, stdout=stdout,
                         stderr=stderr)


def _not_started(argv: Sequence[str], what: str | None, err: OSError) -> ProcessFailed:
    return ProcessFailed(f"{_name(argv, what)} could not be started: {err.strerror or err}",
                         argv=argv, returncode=None)


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float, check: bool = True,
        input: bytes | None = None, env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None, what: str | None = None,
        stdout: int | IO[Any] | None = PIPE) -> Completed:
    """Run a command to completion. ``check`` raises ProcessFailed on a non-zero exit;
    a timeout (the process is killed) and a missing program always raise."""
    args = [str(a) for a in argv]
    _log_argv("run", args)
    try:
        proc = subprocess.run(args, input=input, stdout=stdout, stderr=PIPE,
                              stdin=None if input is not None else DEVNULL,
                              env=dict(env) if env is not None else None, cwd=cwd,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        out = e.stdout if isinstance(e.stdout, bytes) else b""
        err = e.stderr if isinstance(e.stderr, bytes) else b""
        raise _failure(args, what, None, out, err, timeout) from None
    except OSError as e:
        raise _not_started(args, what, e) from None
    done = Completed(args, proc.returncode, proc.stdout or b"", proc.stderr or b"")
    if check and proc.returncode != 0:
        raise _failure(args, what, proc.returncode, done.stdout, done.stderr, timeout)
    return done


async def arun(argv: Sequence[str | os.PathLike[str]], *, timeout: float, check: bool = True,
               input: bytes | None = None, env: Mapping[str, str] | None = None,
               what: str | None = None) -> Completed:
    """``run`` for asyncio code: the loop keeps serving while the command runs."""
    import asyncio

    args = [str(a) for a in argv]
    _log_argv("run", args)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=PIPE if input is not None else DEVNULL, stdout=PIPE, stderr=PIPE,
            env=dict(env) if env is not None else None)
    except OSError as e:
        raise _not_started(args, what, e) from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise _failure(args, what, None, b"", b"", timeout) from None
    assert proc.returncode is not None
    done = Completed(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise _failure(args, what, proc.returncode, out, err, timeout)
    return done


def spawn(argv: Sequence[str | os.PathLike[str]], *, stdin: int | IO[Any] | None = DEVNULL,
          stdout: int | IO[Any] | None = DEVNULL, stderr: int | IO[Any] | None = PIPE,
          env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
          what: str | None = None, **popen: Any) -> subprocess.Popen[Any]:
    """Start a long-lived process; the caller owns it (see ``stop``)."""
    args = [str(a) for a in argv]
    _log_argv("spawn", args)
    try:
        return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr,
                                env=dict(env) if env is not None else None, cwd=cwd, **popen)
    except OSError as e:
        raise _not_started(args, what, e) from None


async def aspawn(argv: Sequence[str | os.PathLike[str]], *, stdout: int | None = DEVNULL,
                 stderr: int | None = PIPE, what: str | None = None,
                 **kwargs: Any) -> asyncio.subprocess.Process:
    """``spawn`` for asyncio code."""
    import asyncio

    args = [str(a) for a in argv]
    _log_argv("spawn", args)
    try:
        return await asyncio.create_subprocess_exec(*args, stdin=DEVNULL, stdout=stdout,
                                                    stderr=stderr, **kwargs)
    except OSError as e:
        raise _not_started(args, what, e) from None


def stop(proc: subprocess.Popen[Any], *, grace: float = 10.0,
         sig: int = signal.SIGTERM) -> int | None:
    """End a spawned process: ``sig``, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return proc.wait(timeout=grace)


def stop_group(proc: subprocess.Popen[Any], *, grace: float = 10.0,
               sig: int = signal.SIGTERM) -> int:
    """End a process spawned with ``start_new_session=True`` and everything in its process
    group: ``sig`` to the group (SIGINT is Ctrl-C's), ``grace`` seconds for it to finish,
    then SIGKILL to whatever of the group is left (a leader that exited may leave
    children behind)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def failure(proc_argv: Sequence[str], returncode: int | None, stderr: bytes | str,
            *, what: str | None = None, timeout: float | None = None) -> ProcessFailed:
    """The ProcessFailed for a spawned process that ended badly (same wording as run)."""
    err = stderr.encode() if isinstance(stderr, str) else stderr
    return _failure(list(proc_argv), what, returncode, b"", err, timeout)
