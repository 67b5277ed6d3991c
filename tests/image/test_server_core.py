"""A headless server: no GUI packages, text-mode boot, nothing failed, serial console,
network and ssh from systemd."""

from __future__ import annotations

import json
from fnmatch import fnmatch

import pytest
import yaml
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


# What may listen beyond loopback: sshd, the DHCP client, the agent's HTTPS port when
# the profile gives it one, and the DNS and DHCP servers (dnsmasq) of the agent's nat and
# isolated networks, on those networks' bridges only. Nothing else answers on the
# network (no LLMNR, mDNS, iSCSI).
NETWORK_LISTENERS = {("tcp", 22): "sshd", ("udp", 68): "systemd-network"}


def _listeners(host: Host) -> list[tuple[str, str, int, str]]:
    """(protocol, address, port, process) of every listening TCP and bound UDP socket."""
    found = []
    for line in host.check_output("ss -H -tulnp").splitlines():
        proto, _state, _rq, _sq, local, *rest = line.split()
        addr, _, port = local.rpartition(":")
        procs = " ".join(rest)
        name = procs.split('(("', 1)[1].split('"', 1)[0] if '(("' in procs else "?"
        found.append((proto, addr.split("%", 1)[0].strip("[]"), int(port), name))
    return found


def test_nothing_listens_on_the_network_but_ssh_the_dhcp_client_and_the_agent(
        host: Host) -> None:
    allowed = dict(NETWORK_LISTENERS)
    tls = (yaml.safe_load(host.file("/etc/hvagent/hvagent.yaml").content_string)
           .get("tls") or {}).get("listen")
    if tls:
        allowed[("tcp", int(tls.rpartition(":")[2]))] = "hvagent"
    loopback = ("127.", "::1")
    outside = [(proto, addr, port, name) for proto, addr, port, name in _listeners(host)
               if not addr.startswith(loopback)]
    assert ("tcp", 22) in {(p, port) for p, _a, port, _n in outside}  # the check sees sshd
    networks = json.loads(host.check_output("hvctl --json net list"))
    served = {n["address"].split("/")[0] for n in networks if n["dhcp_server"] == "running"}
    # dnsmasq's DHCP socket is the wildcard one (it answers on its bridge only).
    dnsmasq = {(p, a, 53) for a in served for p in ("tcp", "udp")} | (
        {("udp", "0.0.0.0", 67)} if served else set())

    def expected(s: tuple[str, str, int, str]) -> bool:
        if s[3] == "dnsmasq":
            return (s[0], s[1], s[2]) in dnsmasq
        return allowed.get((s[0], s[2])) == s[3][:15]

    assert [s for s in outside if not expected(s)] == []


@pytest.mark.smoke
def test_module_loading_is_off_the_agents_critical_chain(host: Host) -> None:
    """hvagent waits for the KVM vendor module (its once-per-boot KVM probe needs
    /dev/kvm) and for nothing of systemd-modules-load.service; the vendor unit itself
    waits for nothing."""
    # critical-chain needs a finished boot; the agent may still be probing KVM.
    settled = host.run("timeout 300 systemctl is-system-running --wait")
    assert settled.stdout.strip() in ("running", "degraded"), settled.stdout + settled.stderr
    chain = host.run("systemd-analyze critical-chain --no-pager hvagent.service")
    print(chain.stdout)  # shows with -s, and on failure
    assert chain.rc == 0, chain.stderr
    assert "hvagent.service" in chain.stdout
    assert "systemd-modules-load.service" not in chain.stdout

    def after(unit: str) -> list[str]:
        return host.check_output("systemctl show -p After --value %s", unit).split()

    agent = after("hvagent.service")
    assert "corehost-kvm-vendor.service" in agent
    assert "systemd-modules-load.service" not in agent
    vendor = after("corehost-kvm-vendor.service")
    assert "systemd-modules-load.service" not in vendor
    assert "sysinit.target" not in vendor
    # The unit ran and loaded what the agent needs (kvm comes with the vendor module).
    assert host.service("corehost-kvm-vendor").is_enabled
    assert host.run("systemctl is-active corehost-kvm-vendor.service").stdout.strip() == "active"
