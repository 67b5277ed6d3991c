"""Boot media made from the tiny test guest, for virtual-media (Ironic-style) tests: a
BIOS-bootable ISO 9660 image and a loopback HTTP server to fetch it from.

- ``make_iso``         the guest's kernel and initrd on an ISO that ISOLINUX boots through
                       El Torito, without a prompt and with its console on the first serial
                       port; isohybrid, so that the very same file also boots as a hard disk.
- ``serve_directory``  a threading http.server on 127.0.0.1 (a free port) for the duration
                       of a ``with`` block.

The ISOLINUX files come from the Debian packages isolinux and syslinux-common, the image
from xorriso (ci/host-deps.sh installs them).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinyguest import TinyGuest

from hvagent.host import run as runner

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
# The MBR that makes the ISO isohybrid; it must come from the same syslinux as isolinux.bin.
ISOHYBRID_MBR = Path("/usr/lib/ISOLINUX/isohdpfx.bin")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")  # ISOLINUX 6 loads it first
XORRISO_TIMEOUT = 120.0
# An ISO 9660 volume id: at most 32 "d-characters".
LABEL_RE = re.compile(r"[A-Z0-9_]{1,32}")

ISOLINUX_CFG = """SERIAL 0 115200
DEFAULT tiny
PROMPT 0
TIMEOUT 0
LABEL tiny
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND {append}
"""


def make_iso(guest: TinyGuest, out: Path, append: str, label: str = "TINYISO") -> Path:
    """Write `out`: an ISO 9660 image (volume id `label`) that boots `guest` with the
    kernel command line `append` from a CD-ROM (El Torito, ISOLINUX) and, isohybrid, from
    a hard disk. Written whole or not at all."""
    if not LABEL_RE.fullmatch(label):
        raise ValueError(f"ISO label {label!r}: 1 to 32 of A-Z, 0-9 and _")
    if "\n" in append or "\r" in append:
        raise ValueError("the kernel command line must be one line")
    for f in (ISOLINUX_BIN, ISOHYBRID_MBR, LDLINUX):
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing (run ci/host-deps.sh)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="bootmedia-", dir=out.parent))
    tmp = out.with_name(out.name + ".tmp")
    try:
        tree = stage / "iso"
        (tree / "isolinux").mkdir(parents=True)
        # Copies: the boot info table is patched into isolinux.bin on the image.
        shutil.copyfile(ISOLINUX_BIN, tree / "isolinux" / "isolinux.bin")
        shutil.copyfile(LDLINUX, tree / "isolinux" / "ldlinux.c32")
        (tree / "isolinux" / "isolinux.cfg").write_text(ISOLINUX_CFG.format(append=append))
        shutil.copyfile(guest.kernel, tree / "vmlinuz")
        shutil.copyfile(guest.initrd, tree / "initrd.gz")
        runner.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", tmp, "-V", label, "-r",
                    "-isohybrid-mbr", ISOHYBRID_MBR,
                    "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
                    "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", tree],
                   timeout=XORRISO_TIMEOUT)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request on stderr would only bury a failing test's output


@contextmanager
def serve_directory(path: Path) -> Iterator[str]:
    """Serve the files under `path` over HTTP on loopback while the block runs; yields
    the base URL "http://127.0.0.1:PORT"."""
    handler = functools.partial(_QuietHandler, directory=str(path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name=f"serve {path}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
