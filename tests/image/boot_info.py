"""What `corehost test` booted, from COREHOST_BOOT (shared by conftest and the checks)."""

from __future__ import annotations

import json
import os
from typing import Any


def booted() -> dict[str, Any]:
    """How the host was booted; a disk under BIOS when COREHOST_BOOT is unset."""
    info = json.loads(os.environ.get("COREHOST_BOOT") or "{}")
    return {"firmware": "bios", "usb": False, "pxe": None, "format": None, "disks": [],
            "config": False, **info}
