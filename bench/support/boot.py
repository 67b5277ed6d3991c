"""Image builds and boots the benchmarks share: a timed `corehost build`, and the serial
console's sign that the agent's unit is active."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from builder import qemu
from builder.paths import repo_root
from hvagent.host import run
from support import say

# systemd's status line on the serial console once the agent's unit is active
# (after its colour codes are stripped).
AGENT_STARTED = "Started hvagent.service"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Bound on one build (a cold build takes many minutes, far less than this).
BUILD_TIMEOUT = 3 * 3600.0


def timed(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> float:
    say("$ " + " ".join(cmd))
    start = time.monotonic()
    with open(log or os.devnull, "w") as out:
        # spawn, not run: the build's stdout and stderr go together into the log.
        proc = run.spawn(cmd, env=env, stdout=out, stderr=run.STDOUT, cwd=repo_root())
        try:
            returncode = proc.wait(timeout=BUILD_TIMEOUT)
        except run.TimeoutExpired:
            sys.exit(f"bench: {cmd[0]} did not finish within {BUILD_TIMEOUT:g} s; log: {log}")
        finally:
            if proc.poll() is None:  # timed out or interrupted: end the build
                run.stop(proc)
    took = time.monotonic() - start
    if returncode != 0:
        sys.exit(f"bench: {cmd[0]} failed (exit {returncode}); log: {log}")
    say(f"  {took:.1f}s")
    return took


def agent_started(machine: qemu.Machine) -> bool:
    try:
        return AGENT_STARTED in ANSI.sub("", machine.serial_log.read_text(errors="replace"))
    except OSError:
        return False
