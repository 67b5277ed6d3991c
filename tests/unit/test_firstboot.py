"""corehost-firstboot applied to a throw-away root (copies of this host's user
databases): what each section writes, the stamp, re-application, and that a bad
document changes nothing at all. Also the sources it reads: a FAT partition image
(mtools), an HTTP URL with a pinned sha256, the kernel command line."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hvagent.cli import firstboot
from hvagent.config import load_config
from hvagent.host.hostconfig import HostConfigError

TOKEN = "tok-" + "7" * 40


@pytest.fixture(scope="module")
def key() -> Iterator[str]:
    d = Path(os.environ.get("TMPDIR", "/tmp"))
    import tempfile

    with tempfile.TemporaryDirectory(dir=d) as tmp:
        path = Path(tmp) / "k"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ci@example.org",
                        "-f", str(path)], check=True, timeout=60)
        yield (Path(tmp) / "k.pub").read_text().strip()


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """A system tree with this host's user databases, login.defs, a skeleton, a shell."""
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        shutil.copy2(Path("/etc") / name, r / "etc" / name)
    shutil.copytree("/etc/skel", r / "etc/skel", symlinks=True)
    (r / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n\n"
                                 "::1\tlocalhost ip6-localhost\n")
    (r / "etc/hostname").write_text("debian\n")
    (r / "bin").mkdir()
    shutil.copy2("/bin/sh", r / "bin/bash")
    (r / "home").mkdir()
    (r / "root").mkdir(mode=0o700)
    (r / "etc/systemd/network").mkdir(parents=True)
    (r / "etc/systemd/network/80-dhcp.network").write_text("[Match]\nName=en*\n")
    (r / "etc/hvagent").mkdir()
    (r / "etc/hvagent/hvagent.yaml").write_text("accel: tcg\n")
    return r


def tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under root with its mode, owner, group and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = "dir"
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, what)
    return out


def run_fb(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvagent.cli.firstboot", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def apply_doc(root: Path, doc: str | dict[str, object],
              name: str = "host-config.yaml") -> tuple[subprocess.CompletedProcess[str], Path]:
    path = root.parent / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return run_fb("--root", root, "--source", f"file:{path}"), path


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as systemd reads it: sections of KEY=VALUE lines in order,
    comments and blank lines ignored."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path}: a setting outside a section"
        k, sep, v = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.append((k.strip(), v.strip()))
    return sections


def passwd(root: Path) -> dict[str, list[str]]:
    return {f[0]: f for f in (line.split(":") for line in
                              (root / "etc/passwd").read_text().splitlines())}


def full_doc(key: str) -> dict[str, object]:
    return {
        "version": 1,
        "hostname": "kvm-07.example.org",
        "users": [{"name": "root", "ssh_authorized_keys": [key]},
                  {"name": "opsuser", "ssh_authorized_keys": [key], "groups": ["adm"]}],
        "network": [{"match": {"name": "en*"}, "dhcp": True},
                    {"match": {"mac": "52:54:00:12:34:56"}, "addresses": ["10.0.2.15/24",
                     "fd00::15/64"], "gateway": "10.0.2.2", "dns": ["10.0.2.3"]}],
        "time": {"servers": ["ntp.example.org", "192.0.2.123"]},
        "agent": {"tls_listen": "0.0.0.0:8443", "bootstrap_token": TOKEN},
    }


def test_applies_every_section(root: Path, key: str) -> None:
    done, doc = apply_doc(root, full_doc(key))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""

    assert (root / "etc/hostname").read_text() == "kvm-07.example.org\n"
    hosts = (root / "etc/hosts").read_text().splitlines()
    assert hosts == ["127.0.0.1\tlocalhost", "127.0.1.1\tkvm-07.example.org kvm-07", "",
                     "::1\tlocalhost ip6-localhost"]

    # root's keys replaced; the new user made with its group, home and keys
    ak = root / "root/.ssh/authorized_keys"
    assert ak.read_text() == f"{key}\n"
    assert stat.S_IMODE(ak.stat().st_mode) == 0o600 and ak.stat().st_uid == 0
    assert stat.S_IMODE((root / "root/.ssh").stat().st_mode) == 0o700
    user = passwd(root)["opsuser"]
    uid, gid, home, shell = int(user[2]), int(user[3]), user[5], user[6]
    assert uid >= 1000 and home == "/home/opsuser" and shell == "/bin/bash"
    adm = next(line for line in (root / "etc/group").read_text().splitlines()
               if line.startswith("adm:"))
    assert "opsuser" in adm.split(":")[3].split(",")
    uak = root / "home/opsuser/.ssh/authorized_keys"
    assert uak.read_text() == f"{key}\n"
    st = uak.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, uid, gid)
    sst = (root / "home/opsuser/.ssh").stat()
    assert (stat.S_IMODE(sst.st_mode), sst.st_uid, sst.st_gid) == (0o700, uid, gid)

    # network: one file per entry, sorted before the image's catch-all
    net = root / "etc/systemd/network"
    names = sorted(p.name for p in net.iterdir())
    assert names == ["10-host-config-0.network", "10-host-config-1.network",
                     "80-dhcp.network"]
    assert unit(net / "10-host-config-0.network") == {
        "Match": [("Name", "en*")], "Network": [("DHCP", "yes")]}
    assert unit(net / "10-host-config-1.network") == {
        "Match": [("MACAddress", "52:54:00:12:34:56")],
        "Network": [("Address", "10.0.2.15/24"), ("Address", "fd00::15/64"),
                    ("Gateway", "10.0.2.2"), ("DNS", "10.0.2.3")]}

    assert unit(root / "etc/systemd/timesyncd.conf.d/50-host-config.conf") == {
        "Time": [("NTP", "ntp.example.org 192.0.2.123")]}

    # agent: the drop-in has the hash only, and the agent's own loader takes it
    drop_in = root / "etc/hvagent/conf.d/50-host-config.yaml"
    token_hash = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert yaml.safe_load(drop_in.read_text()) == {
        "tls": {"listen": "0.0.0.0:8443"}, "bootstrap_token_sha256": token_hash}
    assert stat.S_IMODE(drop_in.stat().st_mode) == 0o600
    config = load_config(root / "etc/hvagent/hvagent.yaml")
    assert config.tls.listen == "0.0.0.0:8443"
    assert config.bootstrap_token_sha256 == token_hash
    assert config.accel.value == "tcg"  # the image's own settings stay
    for p in root.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p

    stamp = json.loads((root / "var/lib/corehost/host-config.json").read_text())
    assert stamp["source"] == str(doc)
    assert stamp["sha256"] == hashlib.sha256(doc.read_bytes()).hexdigest()
    assert stamp["applied_at"]
    assert stamp["applied"] == [
        "hostname: kvm-07.example.org", "user root: 1 ssh key",
        "user opsuser: created, groups adm", "user opsuser: 1 ssh key",
        "network en*: DHCP",
        "network 52:54:00:12:34:56: 10.0.2.15/24 fd00::15/64 via 10.0.2.2, DNS 10.0.2.3",
        "time: NTP ntp.example.org 192.0.2.123",
        "agent: TLS on 0.0.0.0:8443, bootstrap token (hash)"]
    # the log says the same, one line per item
    for line in stamp["applied"]:
        assert line in done.stdout.splitlines()


def test_second_boot_does_nothing(root: Path, key: str) -> None:
    done, doc = apply_doc(root, full_doc(key))
    assert done.returncode == 0, done.stderr
    before = tree(root)
    doc.write_text(yaml.safe_dump({"version": 1, "hostname": "other"}))
    again = run_fb("--root", root, "--source", f"file:{doc}")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("host config already applied (from ")
    assert tree(root) == before


def test_every_boot_marker_reapplies(root: Path, key: str) -> None:
    done, doc = apply_doc(root, full_doc(key))
    assert done.returncode == 0, done.stderr
    marker = root / "usr/lib/corehost/host-config-every-boot"
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    doc.write_text(yaml.safe_dump({"version": 1, "hostname": "kvm-08",
                                   "users": [{"name": "opsuser", "ssh_authorized_keys": []}],
                                   "network": [{"match": {"name": "eth0"}, "dhcp": True}]}))
    again = run_fb("--root", root, "--source", f"file:{doc}")
    assert again.returncode == 0, again.stderr
    assert (root / "etc/hostname").read_text() == "kvm-08\n"
    assert "127.0.1.1\tkvm-08" in (root / "etc/hosts").read_text().splitlines()
    assert (root / "home/opsuser/.ssh/authorized_keys").read_text() == ""
    assert (root / "root/.ssh/authorized_keys").read_text() == f"{key}\n"  # not in the doc
    assert sorted(p.name for p in (root / "etc/systemd/network").iterdir()) == [
        "10-host-config-0.network", "80-dhcp.network"]
    assert unit(root / "etc/systemd/network/10-host-config-0.network")["Match"] == [
        ("Name", "eth0")]
    # sections the document no longer has: the files this tool wrote for them go
    assert not (root / "etc/systemd/timesyncd.conf.d/50-host-config.conf").exists()
    assert not (root / "etc/hvagent/conf.d/50-host-config.yaml").exists()
    assert passwd(root)["opsuser"]  # still there, made once
    stamp = json.loads((root / "var/lib/corehost/host-config.json").read_text())
    assert stamp["applied"][0] == "hostname: kvm-08"


BAD_DOCS = [
    ("version: 1\nhostname: Bad_Name\n", "hostname: 'Bad_Name' is not a host name"),
    ("version: 1\nusers: [{name: root, ssh_authorized_keys: [nope]}]\n",
     "users[0].ssh_authorized_keys[0]: not an ssh public key"),
    ("version: 1\nnetwork: [{match: {name: e}, addresses: [10.0.0.5/24], gateway: 10.9.0.1}]\n",
     "network[0]: gateway 10.9.0.1 is not inside"),
    ("version: 1\nagent: {tls_listen: '0.0.0.0:65536'}\n", "agent.tls_listen: "),
    ("version: 1\nusers: [\n", "line 3, column 1: not valid YAML"),
    ("[1, 2]\n", "the top level is a list"),
    ("", "empty"),
    # valid in form, but not on this host: found while planning, still before any change
    ("version: 1\nhostname: good\nusers: [{name: newuser, groups: [no-such-group]}]\n",
     "users[0].groups[0]: the group 'no-such-group' does not exist"),
    ("version: 1\nhostname: good\nusers: [{name: newuser, shell: /bin/zsh-missing}]\n",
     "users[0].shell: /bin/zsh-missing is not a program"),
    ("version: 1\nhostname: good\nusers: [{name: users}]\n",
     "users[0].name: a group 'users' exists but no such user"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_DOCS,
                         ids=[str(i) for i in range(len(BAD_DOCS))])
def test_bad_document_changes_nothing(root: Path, key: str, text: str, expected: str) -> None:
    before = tree(root)
    # the good parts of a bad document (a hostname, a key) are not applied either
    path = root.parent / "host-config.yaml"
    path.write_text(text)
    done = run_fb("--root", root, "--source", f"file:{path}")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"corehost-firstboot: {path}: {expected}"), lines[0]
    assert lines[0].endswith(" (nothing was applied)")
    assert tree(root) == before


def test_binary_and_oversize_documents_change_nothing(root: Path) -> None:
    before = tree(root)
    for name, data, expected in (
            ("bin.yaml", b"version: 1\n\xff\xfe", "not UTF-8 text"),
            ("big.yaml", b"version: 1\n" + b"#" * (2 << 20), "larger than")):
        path = root.parent / name
        path.write_bytes(data)
        done = run_fb("--root", root, "--source", f"file:{path}")
        assert done.returncode == 1
        assert done.stderr.startswith(f"corehost-firstboot: {path}: {expected}")
        assert len(done.stderr.splitlines()) == 1
    assert tree(root) == before


def test_missing_file_source(root: Path, tmp_path: Path) -> None:
    before = tree(root)
    done = run_fb("--root", root, "--source", f"file:{tmp_path}/none.yaml")
    assert done.returncode == 1
    assert done.stderr == (f"corehost-firstboot: {tmp_path}/none.yaml: cannot read: "
                           "No such file or directory (nothing was applied)\n")
    assert tree(root) == before


def test_no_document_is_nothing_to_apply(root: Path) -> None:
    before = tree(root)
    # this machine's kernel command line has no corehost.config=
    done = run_fb("--root", root, "--source", "cmdline")
    assert (done.returncode, done.stdout) == (0, "no host config: nothing to apply\n")
    assert tree(root) == before


def test_check_validates_without_changing(root: Path, key: str) -> None:
    before = tree(root)
    good = root.parent / "good.yaml"
    good.write_text(yaml.safe_dump(full_doc(key)))
    done = run_fb("--root", root, "--check", good)
    assert done.returncode == 0, done.stderr
    assert "  user opsuser: created, groups adm" in done.stdout.splitlines()
    bad = root.parent / "bad.yaml"
    bad.write_text("version: 1\nusers: [{name: x, groups: [nogroup-here]}]\n")
    done = run_fb("--root", root, "--check", bad)
    assert done.returncode == 1
    assert done.stderr == (f"corehost-firstboot: {bad}: users[0].groups[0]: the group "
                           "'nogroup-here' does not exist on this host\n")
    assert tree(root) == before


@pytest.mark.parametrize("args", [["--source", "floppy"], ["--source", "file:"],
                                  ["--root", "/nonexistent-dir"], ["--bogus"]])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    done = run_fb(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


# --- sources ---

def test_partition_image_read_with_mtools(tmp_path: Path) -> None:
    img = tmp_path / "cfg.img"
    with img.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mformat", "-i", str(img), "-v", "COREHOSTCFG", "::"], check=True,
                   timeout=60)
    assert firstboot.read_partition(str(img)) is None  # no corehost.yaml: no document
    src = tmp_path / "corehost.yaml"
    src.write_text("version: 1\nhostname: from-usb\n")
    subprocess.run(["mcopy", "-i", str(img), str(src), "::corehost.yaml"], check=True,
                   timeout=60)
    doc = firstboot.read_partition(str(img))
    assert doc is not None and doc.source == f"{img}:corehost.yaml"
    assert firstboot.parse(doc).hostname == "from-usb"
    # not a FAT file system at all: an error, not "no document"
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 65536)
    with pytest.raises(HostConfigError, match=rf"^{junk}:corehost.yaml: cannot read"):
        firstboot.read_partition(str(junk))


@pytest.fixture()
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(www), **kw)  # type: ignore[arg-type]

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_fetch_with_pinned_sha256(http_server: tuple[str, Path]) -> None:
    base, www = http_server
    body = b"version: 1\nhostname: from-http\n"
    (www / "kvm-07.yaml").write_bytes(body)
    url = f"{base}/kvm-07.yaml"
    good = hashlib.sha256(body).hexdigest()
    doc = firstboot.fetch(url, good.upper(), retry_s=5)
    assert doc.raw == body and firstboot.parse(doc).hostname == "from-http"
    assert firstboot.fetch(url, None, retry_s=5).raw == body
    with pytest.raises(HostConfigError, match=rf"its sha256 is {good}, corehost.config_sha256 "
                                              rf"pins {'0' * 64}$"):
        firstboot.fetch(url, "0" * 64, retry_s=5)
    with pytest.raises(HostConfigError, match=r"^corehost.config_sha256=abc: not a sha256"):
        firstboot.fetch(url, "abc", retry_s=5)
    with pytest.raises(HostConfigError, match=r"cannot fetch within 1 s: HTTP 404 "):
        firstboot.fetch(f"{base}/missing.yaml", None, retry_s=1)
    with pytest.raises(HostConfigError, match=r"only http:// and https://"):
        firstboot.fetch("file:///etc/passwd", None, retry_s=1)


@pytest.mark.parametrize(("cmdline", "expected"), [
    ("BOOT_IMAGE=/vmlinuz root=LABEL=x ro", (None, None)),
    ("boot=corehost corehost.config=http://10.0.2.2:8000/h.yaml quiet",
     ("http://10.0.2.2:8000/h.yaml", None)),
    (f'a "corehost.config=https://s/x y.yaml" corehost.config_sha256={"a" * 64}\n',
     ("https://s/x y.yaml", "a" * 64)),
    ("corehost.configx=http://no corehost.config", (None, None)),
])
def test_parse_cmdline(cmdline: str, expected: tuple[str | None, str | None]) -> None:
    assert firstboot.parse_cmdline(cmdline) == expected
