"""A headless server: no GUI packages, text-mode boot, nothing failed, serial console,
network and ssh from systemd."""

from __future__ import annotations

from fnmatch import fnmatch

import pytest
from testinfra.host import Host

GUI_PACKAGES = (
    "xserver-*", "xwayland", "libgtk*", "gdm3", "lightdm", "sddm", "*-desktop",
    "qemu-system-gui", "xorg", "weston",
)


def installed_packages(host: Host) -> list[str]:
    out = host.check_output("dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n'")
    return [line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["ii"]]


def test_no_gui_package_installed(host: Host) -> None:
    pkgs = installed_packages(host)
    assert "openssh-server" in pkgs  # the query itself works
    gui = [p for p in pkgs if any(fnmatch(p, pattern) for pattern in GUI_PACKAGES)]
    assert gui == []


@pytest.mark.smoke
def test_default_target_is_multi_user(host: Host) -> None:
    assert host.check_output("systemctl get-default") == "multi-user.target"


@pytest.mark.smoke
def test_no_failed_units(host: Host) -> None:
    out = host.check_output("systemctl --failed --plain --no-legend")
    assert out.strip() == ""


def test_serial_getty_on_ttys0(host: Host) -> None:
    getty = host.service("serial-getty@ttyS0")
    assert getty.is_running


def test_network_by_systemd(host: Host) -> None:
    assert host.service("systemd-networkd").is_running
    assert host.service("systemd-resolved").is_running
    assert host.file("/etc/resolv.conf").linked_to == "/run/systemd/resolve/stub-resolv.conf"


def test_ssh_host_keys_made_on_this_host(host: Host) -> None:
    # Keys generated at first boot, not baked into the image that every host shares.
    assert host.service("ssh-keygen").is_enabled
    assert host.file("/etc/ssh/ssh_host_ed25519_key").exists


def test_docs_and_man_pages_kept_out(host: Host) -> None:
    count = "find /usr/share/man /usr/share/info -type f 2>/dev/null | wc -l"
    assert host.check_output(count) == "0"
    assert host.check_output(
        "find /usr/share/doc -type f ! -name copyright | wc -l"
    ) == "0"
