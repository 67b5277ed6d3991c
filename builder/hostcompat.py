"""What the build host lacks, and the stand-ins that let diskimage-builder run anyway.

Hosts without device-mapper (containers, micro-VMs) cannot run DIB's `kpartx`. There,
`partx -a` on the loop device still creates /dev/loopNpM nodes, so a stand-in `kpartx`
maps DIB's calls onto partx and adds the /dev/mapper/loopNpM links DIB expects; a
stand-in `dmsetup` answers the calls DIB makes after it. DIB calls them through sudo,
whose secure_path includes /usr/local/sbin. The stand-ins are the scripts in
builder/standins/. Hosts that have device-mapper are left untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

STANDINS = Path(__file__).resolve().parent / "standins"
INSTALL_DIR = Path("/usr/local/sbin")
# Each stand-in says so in its first lines: a file without the mark is never replaced.
MARKS = {"kpartx": "corehost kpartx stand-in", "dmsetup": "corehost dmsetup stand-in"}


def has_device_mapper() -> bool:
    try:
        misc = Path("/proc/misc").read_text()
    except OSError:
        return False
    return "device-mapper" in misc and Path("/dev/mapper/control").exists()


def _install(name: str) -> None:
    path = INSTALL_DIR / name
    text = (STANDINS / name).read_text()
    current = path.read_text() if path.exists() else None
    if current == text:
        return
    if current is not None and MARKS[name] not in current:
        raise RuntimeError(f"{path} exists and is not corehost's stand-in")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
    log.info("no device-mapper: installed %s", path)


def ensure_kpartx() -> str:
    """Make `sudo kpartx` (and the `dmsetup` calls DIB makes after it) work for DIB;
    returns a one-line description of what is used. Called once per build."""
    if has_device_mapper():
        return "kpartx (device-mapper)"
    for name in MARKS:
        _install(name)
    return "partx stand-in (no device-mapper)"
