"""The disk-image-create command line and environment, mirrors, and reading DIB's log."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from builder import cli, dib, mirrors
from builder.profile import load

ROOT = Path(__file__).resolve().parents[2]

PROFILE = """\
name: small
release: bookworm
elements: [debian-minimal, vm]
packages: {add: [openssh-server, htop, nano], remove: [nano]}
image_size: 1536M
kernel_cmdline: "quiet net.ifnames=0"
"""

DEB822 = """\
Types: deb deb-src
# a comment
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm-security
Enabled: no

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


@pytest.fixture()
def small(fake_root: Path) -> Path:
    path = fake_root / "profiles" / "small.yaml"
    path.write_text(PROFILE)
    return path


def apt_dir(tmp_path: Path, sources: dict[str, str]) -> Path:
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    for name, text in sources.items():
        (d / name).write_text(text)
    return d


def test_mirrors_from_deb822(tmp_path: Path) -> None:
    d = apt_dir(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert mirrors.host_mirrors("bookworm", d) == ("http://mirror.example/debian",
                                               "http://mirror.example/debian-security")


def test_mirrors_from_one_line_sources(tmp_path: Path) -> None:
    d = apt_dir(tmp_path, {"sources.list": (
        "# deb http://commented.example/debian bookworm main\n"
        "deb [signed-by=/usr/share/keyrings/k.gpg] http://m.example/debian bookworm main\n"
        "deb http://m.example/security bookworm-security main\n")})
    assert mirrors.host_mirrors("bookworm", d) == ("http://m.example/debian",
                                               "http://m.example/security")


def test_mirrors_fall_back_to_debian(tmp_path: Path) -> None:
    # An Ubuntu host: nothing for bookworm.
    d = apt_dir(tmp_path, {"sources.list": "deb http://archive.ubuntu.com/ubuntu noble main\n"})
    assert mirrors.host_mirrors("bookworm", d) == (mirrors.DEFAULT_MIRROR,
                                                   mirrors.DEFAULT_SECURITY_MIRROR)


def test_command_line_and_environment(small: Path, fake_root: Path, tmp_path: Path) -> None:
    d = apt_dir(tmp_path, {"sources.list.d/debian.sources": DEB822})
    build = tmp_path / "b"
    cmd = dib.dib_command(load(small), build, apt_dir=d)
    assert cmd.argv[0].endswith("disk-image-create")
    assert cmd.argv[1:] == [
        "-t", "raw", "-o", str(tmp_path / "b" / "dib" / "small"),
        "--image-size", "1.5",
        "-p", "openssh-server,htop",  # nano removed
        "debian-minimal", "vm", "corehost-overlay",  # the overlay comes last
    ]
    env = cmd.env
    assert env["ELEMENTS_PATH"] == f"{fake_root / 'elements'}:{tmp_path / 'b' / 'elements'}"
    assert env["DIB_RELEASE"] == "bookworm"
    assert env["DIB_DISTRIBUTION_MIRROR"] == "http://mirror.example/debian"
    assert env["DIB_DEBIAN_SECURITY_MIRROR"] == "http://mirror.example/debian-security"
    assert env["DIB_APT_MINIMAL_CREATE_INTERFACES"] == "0"
    assert env["DIB_IMAGE_CACHE"].endswith("/.cache/image-create")
    assert env["TMP_DIR"] == str(build / "dibtmp")  # DIB's work dirs stay inside the build
    assert env["DIB_BOOTLOADER_DEFAULT_CMDLINE"] == (
        "nofb nomodeset gfxpayload=text quiet net.ifnames=0")
    assert "DIB_COREHOST_KERNEL_MODULES" not in env  # no profile entries: the list alone
    # the shell form round-trips to the same argv
    last = cmd.shell().splitlines()[-1].strip()
    assert shlex.split(last) == cmd.argv


def test_profile_kernel_modules_reach_the_module_rules(small: Path, tmp_path: Path) -> None:
    """The profile's entries become DIB_COREHOST_KERNEL_MODULES, which server-core's
    kernel-modules-rules turns into dpkg rules keeping those modules too."""
    small.write_text(small.read_text() + "kernel_modules: [fs/ocfs2, 'drivers/net/wireless/*']\n")
    cmd = dib.dib_command(load(small), tmp_path / "b",
                          apt_dir=apt_dir(tmp_path, {"sources.list.d/debian.sources": DEB822}))
    assert cmd.env["DIB_COREHOST_KERNEL_MODULES"] == "fs/ocfs2 drivers/net/wireless/*"
    rules = ROOT / "elements" / "server-core" / "kernel-modules-rules"
    out = subprocess.run([str(rules), str(rules.parent / "kernel-modules.allow")],
                         capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], **cmd.env})
    assert out.returncode == 0, out.stderr
    assert "path-include=/lib/modules/*/kernel/fs/ocfs2" in out.stdout.splitlines()
    assert "path-include=/lib/modules/*/kernel/drivers/net/wireless/*" in out.stdout.splitlines()


def test_dry_run_prints_profile_and_command_and_builds_nothing(
        small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main(["build", str(small), "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "name: small" in printed and "- openssh-server" in printed
    assert "DIB_RELEASE=bookworm" in printed
    assert "DIB_APT_MINIMAL_CREATE_INTERFACES=0" in printed
    assert "--image-size 1.5 -p openssh-server,htop debian-minimal vm corehost-overlay" in printed
    assert not out.exists()


def test_dry_run_with_unknown_element_exits_2(small: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    small.write_text(PROFILE.replace("[debian-minimal, vm]", "[debian-minimal, vm, nosuch]"))
    assert cli.main(["build", str(small), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("corehost: profiles/small.yaml:3: elements: element 'nosuch' not found")
    assert len(err.splitlines()) == 1


# Lines as DIB 3.43 writes them (timestamps, hook dirs in and outside the chroot).
LOG = """\
2026-11-26 06:13:53.183 | Building elements: base  debian-minimal vm block-device-mbr
2026-11-26 06:13:54.183 | Running hooks from /tmp/dib_build.DOQPYF5K/hooks/root.d
2026-11-26 06:13:54.209 | dib-run-parts Running /tmp/dib_build.DOQPYF5K/hooks/root.d/08-debootstrap
2026-11-26 06:14:08.184 | E: Can not write log (Is /dev/pts mounted?) - posix_openpt (19: No suc
2026-11-26 06:14:40.100 | dib-run-parts Running /tmp/in_target.d/install.d/01-package-installs
2026-11-26 06:14:59.100 | dib-run-parts 01-package-installs completed
2026-11-26 06:14:59.265 | dib-run-parts --------------------- END PROFILING ---------------------
2026-11-26 06:15:05.351 | Reading package lists...
2026-11-26 06:15:05.522 | E: Unable to locate package corehost-no-such-package
2026-11-26 06:15:05.565 | Unmount /tmp/dib_build.DOQPYF5K/mnt/var/cache/apt/archives
"""


def test_log_parsing_names_the_failing_step() -> None:
    state = dib.DibState()
    steps = []
    for line in LOG.splitlines(keepends=True):
        if state.feed(line):
            steps.append(state.step)
    assert steps == [
        "elements", "root.d", "root.d/08-debootstrap", "install.d/01-package-installs",
        "installing the profile's packages (-p, after install.d)",
    ]
    # the harmless /dev/pts complaint is not reported as the error
    assert state.error_lines() == ["E: Unable to locate package corehost-no-such-package"]


def test_builds_sharing_a_dib_cache_take_turns(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # Two DIB runs on one cache collide on apt's archive lock inside their chroots.
    import threading
    import time

    from builder.dib import cache_lock

    order: list[str] = []
    entered = threading.Event()

    def first() -> None:
        with cache_lock(tmp_path / "cache"):
            order.append("first in")
            entered.set()
            time.sleep(0.5)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    entered.wait()
    with cache_lock(tmp_path / "cache"):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]
    assert "another build is using" in caplog.text
