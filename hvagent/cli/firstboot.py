"""`corehost-firstboot`: finds the host config document and applies it at first boot.

Sources, the first that has a document wins: the kernel command line
(``corehost.config=URL``, optionally pinned by ``corehost.config_sha256=HEX``), the
``corehost.yaml`` of the COREHOST-CFG partition, QEMU's fw_cfg item
``opt/corehost/config``. The document is validated and every change planned (including
the checks against the image, such as groups that must exist) before anything is
written, so a bad document changes nothing; each file is then written whole (temporary
file, rename). A stamp records what was applied; with it the next boots do nothing,
unless the image has the every-boot marker (test images).

Exit status: 0 applied or nothing to apply; 1 a bad or unreachable document, or a
failure while applying (one line on stderr); 2 a bad argument.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from hvagent.errors import HVError, OperationFailed
from hvagent.host import hostdoc
from hvagent.host.hostdoc import HostConfigError
from hvagent.host.run import run

if TYPE_CHECKING:
    # The schema (pydantic) is imported only once there is a document to validate: a
    # boot without one, or with one applied already, does not pay for it.
    from hvagent.host import hostconfig
    from hvagent.host.hostconfig import HostConfig

PROG = "corehost-firstboot"
CMDLINE = Path("/proc/cmdline")
FW_CFG_ITEM = "opt/corehost/config"
FW_CFG_RAW = Path("/sys/firmware/qemu_fw_cfg/by_name") / FW_CFG_ITEM / "raw"
PARTLABEL = hostdoc.CONFIG_PARTITION
FS_LABELS = (hostdoc.CONFIG_PARTITION, hostdoc.CONFIG_FS_LABEL)
PARTITION_FILE = hostdoc.CONFIG_FILE
# Under --root:
STAMP = Path("var/lib/corehost/host-config.json")
EVERY_BOOT = Path("usr/lib/corehost/host-config-every-boot")
NETWORK_DIR = Path("etc/systemd/network")
NETWORK_PREFIX = "10-host-config-"  # sorts before the image's 80-dhcp.network
TIMESYNCD_DROP_IN = Path("etc/systemd/timesyncd.conf.d/50-host-config.conf")
AGENT_DROP_IN = Path("etc/hvagent/conf.d/50-host-config.yaml")
# Not on PATH in Debian: it lives with systemd's other helpers.
NETWORK_WAIT_ONLINE = "/usr/lib/systemd/systemd-networkd-wait-online"
NETWORK_WAIT_S = 90
FETCH_RETRY_S = 60.0
FETCH_TIMEOUT_S = 10.0


def log(line: str) -> None:
    print(line, flush=True)


# --- sources ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Document:
    source: str  # for messages and the stamp: a URL, DEV:corehost.yaml, fw_cfg ITEM, a path
    raw: bytes


def parse_cmdline(text: str) -> tuple[str | None, str | None]:
    """(URL of corehost.config=, HEX of corehost.config_sha256=) of a kernel command line;
    a value may be in double quotes, as the kernel allows."""
    url = sha = None
    for word in _kernel_words(text):
        key, sep, value = word.partition("=")
        if sep and key == "corehost.config":
            url = value
        elif sep and key == "corehost.config_sha256":
            sha = value
    return url, sha


def _kernel_words(text: str) -> list[str]:
    words: list[str] = []
    cur: list[str] = []
    quoted = started = False
    for c in text:
        if c == '"':
            quoted, started = not quoted, True
        elif c.isspace() and not quoted:
            if started:
                words.append("".join(cur))
            cur, started = [], False
        else:
            cur.append(c)
            started = True
    if started:
        words.append("".join(cur))
    return words


def fetch(url: str, sha256: str | None, *, retry_s: float = FETCH_RETRY_S) -> Document:
    """The document at an http(s) URL, retried for `retry_s` (the network or the server
    may still be coming up); checked against the pinned sha256 if one is given."""
    import urllib.error
    import urllib.request

    source = f"corehost.config={url}"
    if not url.startswith(("http://", "https://")):
        raise HostConfigError(f"{source}: only http:// and https:// URLs are fetched")
    if sha256 is not None and not hostdoc.SHA256_RE.fullmatch(sha256.lower()):
        raise HostConfigError(f"corehost.config_sha256={sha256[:80]}: not a sha256 "
                              "(64 hex digits)")
    deadline = time.monotonic() + retry_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310
                raw = resp.read(hostdoc.MAX_BYTES + 1)
            break
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = (f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError)
                      else getattr(e, "reason", None) or e)
            if time.monotonic() >= deadline:
                raise HostConfigError(f"{source}: cannot fetch within {retry_s:g} s: "
                                      f"{reason}") from None
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256.lower():
            raise HostConfigError(f"{source}: its sha256 is {got}, corehost.config_sha256 "
                                  f"pins {sha256.lower()}")
    return Document(url, raw)


def from_cmdline() -> Document | None:
    try:
        text = CMDLINE.read_text(errors="replace")
    except OSError:
        return None
    url, sha = parse_cmdline(text)
    if url is None:
        return None
    try:
        wait = run([NETWORK_WAIT_ONLINE, "--any", f"--timeout={NETWORK_WAIT_S}"],
                   timeout=NETWORK_WAIT_S + 10, check=False).returncode
    except HVError as e:  # not installed, or hung: the fetch's own retries still apply
        log(f"warning: {e.message}")
        wait = 1
    if wait != 0:
        log(f"no network online after {NETWORK_WAIT_S} s; fetching {url} anyway")
    return fetch(url, sha)


def read_partition(device: str) -> Document | None:
    """corehost.yaml of a FAT file system (a device or an image file), read with mtools
    (nothing is mounted); None when the file system has no such file."""
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    done = run(["mtype", "-i", device, f"::{PARTITION_FILE}"], timeout=30, check=False,
               env=env)
    source = f"{device}:{PARTITION_FILE}"
    if done.returncode != 0:
        if "not found" in done.err:
            return None
        raise HostConfigError(f"{source}: cannot read: "
                              f"{' / '.join(done.err.split(chr(10))).strip(' /')}")
    return Document(source, done.stdout)


def find_partition() -> str | None:
    """The device of the COREHOST-CFG partition, by GPT name, else by file system label."""
    for token in [f"PARTLABEL={PARTLABEL}"] + [f"LABEL={lb}" for lb in FS_LABELS]:
        done = run(["blkid", "-o", "device", "-t", token], timeout=30, check=False)
        devices = done.out.split()
        if done.returncode == 0 and devices:
            return devices[0]
    return None


def from_partition() -> Document | None:
    device = find_partition()
    return read_partition(device) if device is not None else None


def from_fw_cfg() -> Document | None:
    # Built as a module in Debian's kernel; failure only means "no fw_cfg here".
    with contextlib.suppress(HVError):
        run(["modprobe", "qemu_fw_cfg"], timeout=30, check=False)
    try:
        with FW_CFG_RAW.open("rb") as f:
            raw = f.read(hostdoc.MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HostConfigError(f"fw_cfg {FW_CFG_ITEM}: cannot read: {e.strerror or e}") \
            from None
    return Document(f"fw_cfg {FW_CFG_ITEM}", raw)


def from_file(path: Path) -> Document:
    try:
        with path.open("rb") as f:
            raw = f.read(hostdoc.MAX_BYTES + 1)
    except OSError as e:
        raise HostConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    return Document(str(path), raw)


SOURCES: dict[str, Callable[[], Document | None]] = {
    "cmdline": from_cmdline, "partition": from_partition, "fw_cfg": from_fw_cfg,
}


def find_document(source: str | None) -> Document | None:
    """The document of `source` (a SOURCES name or file:PATH), or of the first source
    that has one."""
    if source is not None and source.startswith("file:"):
        return from_file(Path(source.removeprefix("file:")))
    for name, reader in SOURCES.items():
        if source is None or source == name:
            doc = reader()
            if doc is not None:
                return doc
    return None


def parse(doc: Document) -> HostConfig:
    from hvagent.host import hostconfig

    return hostconfig.load_text(hostdoc.read_bytes(doc.raw, doc.source), doc.source)


# --- planning --------------------------------------------------------------------------

@dataclass
class Plan:
    """Every change, computed before the first is made; `apply` carries them out."""

    root: Path
    files: list[tuple[Path, bytes, int]] = field(default_factory=list)  # path, data, mode
    remove: list[Path] = field(default_factory=list)
    new_users: list[list[str]] = field(default_factory=list)  # useradd argv
    add_groups: list[list[str]] = field(default_factory=list)  # usermod argv
    keys: list[tuple[str, bytes]] = field(default_factory=list)  # user, authorized_keys
    hostname: str | None = None
    networks: list[hostconfig.Network] = field(default_factory=list)
    ntp: bool = False
    applied: list[str] = field(default_factory=list)  # one line per item, for the log

    @property
    def live(self) -> bool:
        """Applying to the running system (not an image or a test tree)."""
        return self.root.resolve() == Path("/")


def _read_db(path: Path) -> dict[str, list[str]]:
    """name -> fields of a colon-separated database (/etc/passwd, /etc/group)."""
    out: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split(":")
            if parts and parts[0] and not line.startswith("#"):
                out.setdefault(parts[0], parts)
    return out


def _under(root: Path, path: str | Path) -> Path:
    return root / str(path).lstrip("/")


def _hosts(old: str, name: str) -> str:
    """/etc/hosts with its 127.0.1.1 line naming `name` (Debian's convention: the FQDN,
    then the short name)."""
    short = name.split(".")[0]
    entry = f"127.0.1.1\t{name}" + (f" {short}" if short != name else "")
    lines = old.splitlines()
    for i, line in enumerate(lines):
        if line.split("#")[0].split()[:1] == ["127.0.1.1"]:
            lines[i] = entry
            break
    else:
        at = next((i + 1 for i, line in enumerate(lines)
                   if line.split()[:1] == ["127.0.0.1"]), None)
        if at is None:
            lines[:0] = ["127.0.0.1\tlocalhost"]
            at = 1
        lines.insert(at, entry)
    return "\n".join(lines) + "\n"


def _network_unit(net: hostconfig.Network) -> str:
    match = f"Name={net.match.name}" if net.match.name else f"MACAddress={net.match.mac}"
    body = ["DHCP=yes"] if net.dhcp else [f"Address={a}" for a in net.addresses]
    if net.gateway:
        body.append(f"Gateway={net.gateway}")
    body += [f"DNS={d}" for d in net.dns]
    return ("# Written by corehost-firstboot from the host config.\n"
            f"[Match]\n{match}\n\n[Network]\n" + "\n".join(body) + "\n")


def plan(config: HostConfig, source: str, root: Path) -> Plan:
    """The changes `config` makes under `root`; HostConfigError (naming `source` and the
    field) for what the image cannot take, before anything is changed."""
    p = Plan(root)
    if config.hostname is not None:
        hosts = _under(root, "/etc/hosts")
        try:
            old = hosts.read_text()
        except FileNotFoundError:
            old = ""
        except (OSError, UnicodeDecodeError) as e:
            raise HostConfigError(f"{hosts}: cannot read: {e}") from None
        p.files.append((_under(root, "/etc/hostname"), f"{config.hostname}\n".encode(), 0o644))
        p.files.append((hosts, _hosts(old, config.hostname).encode(), 0o644))
        p.hostname = config.hostname
        p.applied.append(f"hostname: {config.hostname}")
    _plan_users(p, config, source)
    _plan_network(p, config)
    _plan_time(p, config)
    _plan_agent(p, config)
    return p


def _plan_users(p: Plan, config: HostConfig, source: str) -> None:
    passwd = _read_db(_under(p.root, "/etc/passwd"))
    groups = _read_db(_under(p.root, "/etc/group"))
    for i, user in enumerate(config.users):
        where = f"{source}: users[{i}]"
        for j, g in enumerate(user.groups):
            if g not in groups:
                raise HostConfigError(f"{where}.groups[{j}]: the group {g!r} does not "
                                      "exist on this host")
        if user.name not in passwd:
            if user.name in groups:
                raise HostConfigError(f"{where}.name: a group {user.name!r} exists but no "
                                      "such user; choose another name")
            shell = _under(p.root, user.shell)
            if not os.access(shell, os.X_OK) or shell.is_dir():
                raise HostConfigError(f"{where}.shell: {user.shell} is not a program on "
                                      "this host")
            argv = ["useradd", "--root", str(p.root), "-m", "-s", user.shell]
            if user.groups:
                argv += ["-G", ",".join(user.groups)]
            p.new_users.append(argv + ["--", user.name])
            p.applied.append(f"user {user.name}: created"
                             + (f", groups {','.join(user.groups)}" if user.groups else ""))
        else:
            current = {g for g, f in groups.items()
                       if len(f) > 3 and user.name in f[3].split(",")}
            missing = [g for g in user.groups if g not in current]
            if missing:
                p.add_groups.append(["usermod", "--root", str(p.root), "-a", "-G",
                                     ",".join(missing), "--", user.name])
                p.applied.append(f"user {user.name}: added to {','.join(missing)}")
        if "ssh_authorized_keys" in user.model_fields_set:
            data = "".join(f"{k}\n" for k in user.ssh_authorized_keys).encode()
            p.keys.append((user.name, data))
            n = len(user.ssh_authorized_keys)
            p.applied.append(f"user {user.name}: {n} ssh key{'s' if n != 1 else ''}")


def _owned(p: Plan, directory: Path, prefix: str, keep: set[str]) -> None:
    """Remove files an earlier application wrote that the document no longer has."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for e in sorted(os.scandir(directory), key=lambda e: e.name):
            if e.name.startswith(prefix) and e.name not in keep:
                p.remove.append(directory / e.name)


def _plan_network(p: Plan, config: HostConfig) -> None:
    directory = _under(p.root, NETWORK_DIR)
    names = set()
    for i, net in enumerate(config.network):
        name = f"{NETWORK_PREFIX}{i}.network"
        names.add(name)
        p.files.append((directory / name, _network_unit(net).encode(), 0o644))
        what = net.match.name or net.match.mac
        how = "DHCP" if net.dhcp else " ".join(net.addresses)
        p.applied.append(f"network {what}: {how}"
                         + (f" via {net.gateway}" if net.gateway else "")
                         + (f", DNS {' '.join(net.dns)}" if net.dns else ""))
    p.networks = list(config.network)
    _owned(p, directory, NETWORK_PREFIX, names)


def _plan_time(p: Plan, config: HostConfig) -> None:
    path = _under(p.root, TIMESYNCD_DROP_IN)
    if config.time is None:
        if path.exists():
            p.remove.append(path)
            p.ntp = True
        return
    text = ("# Written by corehost-firstboot from the host config.\n"
            f"[Time]\nNTP={' '.join(config.time.servers)}\n")
    p.files.append((path, text.encode(), 0o644))
    p.ntp = True
    p.applied.append(f"time: NTP {' '.join(config.time.servers)}")


def _plan_agent(p: Plan, config: HostConfig) -> None:
    path = _under(p.root, AGENT_DROP_IN)
    agent = config.agent
    settings: dict[str, object] = {}
    if agent is not None and agent.tls_listen is not None:
        settings["tls"] = {"listen": agent.tls_listen}
    if agent is not None and agent.bootstrap_token is not None:
        # Only the hash goes to disk: the token itself is never stored on the host.
        settings["bootstrap_token_sha256"] = hashlib.sha256(
            agent.bootstrap_token.encode()).hexdigest()
    elif agent is not None and agent.bootstrap_token_sha256 is not None:
        settings["bootstrap_token_sha256"] = agent.bootstrap_token_sha256
    if not settings:
        if path.exists():
            p.remove.append(path)
        return
    import yaml  # with a document only, as the schema

    text = "# Written by corehost-firstboot from the host config.\n" + yaml.safe_dump(
        settings, sort_keys=False, default_flow_style=False)
    p.files.append((path, text.encode(), 0o600))
    parts = []
    if "tls" in settings:
        parts.append(f"TLS on {agent.tls_listen if agent else ''}")
    if "bootstrap_token_sha256" in settings:
        parts.append("bootstrap token (hash)")
    p.applied.append(f"agent: {', '.join(parts)}")


# --- applying --------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    """`path` replaced whole by `data`: a temporary file beside it, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fchown(f.fileno(), uid, gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def apply(p: Plan) -> None:
    """Carry out a plan: users first (the commands that can still fail), then every file,
    then the running services."""
    for argv in p.new_users + p.add_groups:
        run(argv, timeout=60)
    passwd = _read_db(_under(p.root, "/etc/passwd"))
    for name, data in p.keys:
        fields = passwd.get(name)
        if fields is None or len(fields) < 6 or not fields[2].isdigit():
            raise OperationFailed(f"user {name}: not in {_under(p.root, '/etc/passwd')} "
                                  "after useradd")
        uid, gid, home = int(fields[2]), int(fields[3]), _under(p.root, fields[5])
        if not home.exists():  # an image without root's home, a user without one
            home.mkdir(mode=0o700, parents=True)
            os.chown(home, uid, gid)
        ssh = home / ".ssh"
        ssh.mkdir(exist_ok=True)
        os.chown(ssh, uid, gid)
        os.chmod(ssh, 0o700)
        write_atomic(ssh / "authorized_keys", data, 0o600, uid, gid)
    for path, data, mode in p.files:
        write_atomic(path, data, mode)
    for path in p.remove:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            log(f"removed {path} (no longer in the host config)")
    if p.live:
        _apply_live(p)


def _apply_live(p: Plan) -> None:
    """Tell the running system; a failure here is a warning (the files are in place for
    the next boot)."""
    def best_effort(argv: list[str]) -> None:
        try:
            run(argv, timeout=60)
        except HVError as e:
            log(f"warning: {e.message}")

    if p.hostname is not None:
        best_effort(["hostname", p.hostname])
    networkd = run(["systemctl", "is-active", "--quiet", "systemd-networkd.service"],
                   timeout=30, check=False)
    if (p.networks or p.remove) and networkd.returncode == 0:
        best_effort(["networkctl", "reload"])
        links = _matching_links(p.networks)
        if links:
            best_effort(["networkctl", "reconfigure", *links])
    if p.ntp:
        best_effort(["systemctl", "try-restart", "systemd-timesyncd.service"])


def _matching_links(networks: Sequence[hostconfig.Network]) -> list[str]:
    links = []
    with contextlib.suppress(FileNotFoundError):
        for e in sorted(os.scandir("/sys/class/net"), key=lambda e: e.name):
            try:
                mac = Path(e.path, "address").read_text().strip().lower()
            except OSError:
                mac = ""
            if any((n.match.name and fnmatch.fnmatchcase(e.name, n.match.name))
                   or (n.match.mac and n.match.mac == mac) for n in networks):
                links.append(e.name)
    return links


def _stamp(root: Path) -> dict[str, object] | None:
    try:
        data = json.loads(_under(root, STAMP).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- command line ----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Apply the host config at first "
                                 "boot (hostname, users, network, time, agent).")
    ap.add_argument("--root", type=Path, default=Path("/"),
                    help="apply to the system in DIR (default /)")
    ap.add_argument("--source", metavar="cmdline|partition|fw_cfg|file:PATH",
                    help="read only this source (default: the first that has a document)")
    ap.add_argument("--check", type=Path, metavar="FILE",
                    help="validate FILE against the schema and this system; change nothing")
    return ap


def _check_source(ap: argparse.ArgumentParser, source: str | None) -> None:
    if source is None or source in SOURCES:
        return
    if source.startswith("file:") and source != "file:":
        return
    ap.error(f"--source {source!r}: give one of {', '.join(SOURCES)} or file:PATH")


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _check_source(ap, args.source)
    root: Path = args.root
    if not root.is_dir():
        ap.error(f"--root {root}: not a directory")
    if args.check is not None:
        from hvagent.host import hostconfig

        try:
            config = hostconfig.load_file(args.check)
            p = plan(config, str(args.check), root)
        except HostConfigError as e:
            print(f"{PROG}: {e.message}", file=sys.stderr)
            return 1
        log(f"{args.check}: a valid host config; it would apply:")
        for line in p.applied:
            log(f"  {line}")
        return 0

    stamp = _stamp(root)
    if stamp is not None and not _under(root, EVERY_BOOT).exists():
        log(f"host config already applied (from {stamp.get('source')} at "
            f"{stamp.get('applied_at')}): nothing to do")
        return 0
    try:
        doc = find_document(args.source)
        if doc is None:
            log("no host config: nothing to apply")
            return 0
        config = parse(doc)
        p = plan(config, doc.source, root)
    except HostConfigError as e:
        print(f"{PROG}: {e.message} (nothing was applied)", file=sys.stderr)
        return 1
    except HVError as e:  # a tool that could not run while looking for a source
        print(f"{PROG}: {e.message} (nothing was applied)", file=sys.stderr)
        return 1

    log(f"applying the host config from {doc.source}")
    try:
        apply(p)
        record = {"source": doc.source, "sha256": hashlib.sha256(doc.raw).hexdigest(),
                  "applied_at": datetime.now(UTC).isoformat(timespec="seconds"),
                  "applied": p.applied}
        write_atomic(_under(root, STAMP), (json.dumps(record, indent=2) + "\n").encode(),
                     0o644)
    except HVError as e:
        print(f"{PROG}: applying the host config from {doc.source} failed: {e.message}",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: applying the host config from {doc.source} failed: "
              f"{e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    for line in p.applied:
        log(line)
    log(f"host config applied; recorded in {_under(root, STAMP)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
