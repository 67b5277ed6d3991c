"""What the build host lacks, and the stand-ins that let diskimage-builder run anyway.

Hosts without device-mapper (containers, micro-VMs) cannot run DIB's `kpartx`. There,
`partx -a` on the loop device still creates /dev/loopNpM nodes, so a stand-in `kpartx`
maps DIB's calls onto partx and adds the /dev/mapper/loopNpM links DIB expects. DIB
calls it through sudo, whose secure_path includes /usr/local/sbin. Hosts that have
device-mapper are left untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

STANDIN_PATH = Path("/usr/local/sbin/kpartx")
STANDIN_MARK = "corehost kpartx stand-in"

# Written with Debian's system python3, which DIB itself requires on the host.
STANDIN = f'''#!/usr/bin/python3
# {STANDIN_MARK}: maps kpartx -a/-u/-d onto partx (no device-mapper on this host).
import glob, os, subprocess, sys

args = [a for a in sys.argv[1:] if not a.startswith("-")]
flags = "".join(a[1:] for a in sys.argv[1:] if a.startswith("-"))
if len(args) != 1:
    sys.exit("kpartx stand-in: expected one device, got %r" % sys.argv[1:])
dev = args[0]
name = os.path.basename(dev)
os.makedirs("/dev/mapper", exist_ok=True)
if "d" in flags:
    for link in glob.glob("/dev/mapper/%sp*" % name):
        os.unlink(link)
    subprocess.run(["partx", "-d", dev], check=False)
    sys.exit(0)
if "a" in flags or "u" in flags:
    if subprocess.run(["partx", "-a", dev], capture_output=True).returncode != 0:
        subprocess.run(["partx", "-u", dev], check=True)
    subprocess.run(["udevadm", "settle"], check=False, capture_output=True)
    for node in sorted(glob.glob("/dev/%sp*" % name)):
        link = "/dev/mapper/" + os.path.basename(node)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(node, link)
        if "v" in flags:
            print("add map %s" % os.path.basename(node))
    sys.exit(0)
sys.exit("kpartx stand-in: unsupported flags %r" % sys.argv[1:])
'''


DMSETUP_PATH = Path("/usr/local/sbin/dmsetup")
DMSETUP_MARK = "corehost dmsetup stand-in"

# In containers (/.dockerenv) DIB runs `dmsetup --noudevsync mknodes` after kpartx, and
# `dmsetup remove loopNpM` when rolling back; without device-mapper both have nothing to
# do beyond what the kpartx stand-in does. Anything else goes to the real dmsetup.
DMSETUP = f"""#!/bin/sh
# {DMSETUP_MARK}: no device-mapper on this host; the kpartx stand-in made /dev/mapper links.
if ! grep -qw device-mapper /proc/misc 2>/dev/null; then
    for a in "$@"; do
        case "$a" in
            mknodes) exit 0 ;;
            remove) eval "last=\\${{$#}}"; rm -f "/dev/mapper/$(basename "$last")"; exit 0 ;;
        esac
    done
fi
exec /usr/sbin/dmsetup "$@"
"""


def has_device_mapper() -> bool:
    try:
        misc = Path("/proc/misc").read_text()
    except OSError:
        return False
    return "device-mapper" in misc and Path("/dev/mapper/control").exists()


def _install(path: Path, text: str, mark: str) -> None:
    current = path.read_text() if path.exists() else None
    if current == text:
        return
    if current is not None and mark not in current:
        raise RuntimeError(f"{path} exists and is not corehost's stand-in")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
    log.info("no device-mapper: installed %s", path)


def ensure_kpartx() -> str:
    """Make `sudo kpartx` (and the `dmsetup` calls DIB makes after it) work for DIB;
    returns a one-line description of what is used."""
    if has_device_mapper():
        return "kpartx (device-mapper)"
    _install(STANDIN_PATH, STANDIN, STANDIN_MARK)
    _install(DMSETUP_PATH, DMSETUP, DMSETUP_MARK)
    return "partx stand-in (no device-mapper)"
