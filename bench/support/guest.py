"""The tiny guest the benchmarks boot: the integration tests' own (a stock Debian kernel
and a busybox initramfs that reports its state on the serial console), so that a figure
is measured on exactly the guest the tests check. It is loaded from its file, once;
`tinyguest` is that module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from support import REPO

_SOURCE = REPO / "tests" / "integration" / "tinyguest.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tinyguest", _SOURCE)
    assert spec is not None and spec.loader is not None, _SOURCE
    module = importlib.util.module_from_spec(spec)
    sys.modules["tinyguest"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


tinyguest = sys.modules.get("tinyguest") or _load()


def build_guest(work: Path) -> Any:
    """The tiny guest (a tinyguest.TinyGuest), built in work/guest, readable by QEMU
    running as libvirt-qemu too."""
    guest = tinyguest.build(work / "guest")
    (work / "guest").chmod(0o755)
    (work / "guest" / "tiny-initrd.gz").chmod(0o644)
    return guest
