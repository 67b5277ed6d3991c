"""The Debian mirrors a build uses: the ones this host's apt already uses, else Debian's.

Both apt source formats are read (deb822 `.sources` files and one-line `.list` files);
the first http(s) source carrying the release is the distribution mirror, the first
carrying `<release>-security` the security mirror.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]


def parse_deb822(text: str) -> list[AptSource]:
    out: list[AptSource] = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(AptSource(uri.rstrip("/"), tuple(fields.get("suites", "").split())))
    return out


def parse_one_line(text: str) -> list[AptSource]:
    out: list[AptSource] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # drop [arch=... signed-by=...] options
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            out.append(AptSource(parts[1].rstrip("/"), (parts[2],)))
    return out


def host_apt_sources(apt_dir: Path = Path("/etc/apt")) -> list[AptSource]:
    sources: list[AptSource] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            sources += parse_deb822(text)
        elif f.suffix == ".list":
            sources += parse_one_line(text)
    return sources


def host_mirrors(release: str, apt_dir: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(distribution mirror, security mirror) this host uses for `release`, else Debian's."""
    mirror = security = None
    for s in host_apt_sources(apt_dir):
        if not s.uri.startswith(("http://", "https://")):
            continue
        if mirror is None and release in s.suites:
            mirror = s.uri
        if security is None and f"{release}-security" in s.suites:
            security = s.uri
    return mirror or DEFAULT_MIRROR, security or DEFAULT_SECURITY_MIRROR
