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
