"""What the benchmarks share: the tiny guest they boot (guest), a real hvagent process
with its HTTP client (agent), and the libvirt peer set up as a Debian host runs it
(libvirt). A benchmark is run as a script (`python bench/NAME.py`), so this package is
found beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def say(msg: str) -> None:
    """A progress line, prefixed with the benchmark's name."""
    print(f"[{Path(sys.argv[0]).stem}] {msg}", flush=True)


def qemu_pids(marker: bytes) -> list[int]:
    """The QEMU processes whose command line contains `marker` (a VM's QMP socket
    directory, a libvirt domain's `-name guest=NAME,`)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and marker in cmd:
            pids.append(int(d.name))
    return pids
