"""Finding and reading a host config document, before its schema: the size limit, where
a disk carries one, the error every message of it uses.

Standard library only. corehost-firstboot imports this on every boot; a boot that finds
no document (or has applied one already) never loads the schema
(hvagent.host.hostconfig and pydantic), which costs seconds on a slow first boot.
"""

from __future__ import annotations

import re

from hvagent.errors import InvalidRequest

# A host config is a few hundred bytes; anything near this is not one.
MAX_BYTES = 1 << 20
# Where a disk carries its host config: the GPT name of a small FAT partition (its FAT
# volume label is CONFIG_FS_LABEL: FAT labels hold 11 characters) and the file on it.
CONFIG_PARTITION = "COREHOST-CFG"
CONFIG_FS_LABEL = "COREHOSTCFG"
CONFIG_FILE = "corehost.yaml"
SHA256_RE = re.compile(r"[0-9a-f]{64}")


class HostConfigError(InvalidRequest):
    """A host config that cannot be read or is not valid; the message is one line naming
    the source and the field."""


def read_bytes(raw: bytes, source: str) -> str:
    """The text of a host config's bytes: size and UTF-8 checked."""
    if len(raw) > MAX_BYTES:
        raise HostConfigError(f"{source}: larger than {MAX_BYTES} bytes: not a host config")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HostConfigError(f"{source}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                              f"offset {e.start})") from None
