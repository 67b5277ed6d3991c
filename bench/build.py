"""Build and boot benchmark: corehost's server-core image against a bare DIB image.

In one run, on this machine, with DIB's debootstrap tarball warm for both sides:

* cold build:  `corehost build profiles/server-core.yaml --force`
* no-change rebuild:  `corehost build profiles/server-core.yaml` (reuses the last build)
* agent-only rebuild:  the same after one line of hvagent/ changed (reuses the cached
  base and lays the new agent onto it; the line is taken out again afterwards)
* late-file rebuild:  the same after one line of a late file (an element's late-files:
  server-core's DHCP network file) changed; same target as the agent-only rebuild
* peer:  `disk-image-create debian-minimal vm` with the same package list (every
  package the profile's elements and the profile itself install), plus the one file a
  bare image needs to be reachable at all (systemd-networkd DHCP; debian-minimal brings
  no network configuration);
* image size of both qcow2 files;
* boot under TCG (same QEMU options for both): seconds until sshd answers with its
  banner, and for server-core until systemd reports hvagent.service active (read from
  systemd in the guest over ssh).

Prints the figures and the ratios against the peer, with the targets.
Run as root: `.venv/bin/python bench/build.py` (takes many minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from support import say
from support.boot import timed

from builder import dib, mirrors, qemu
from builder.paths import elements_dir, repo_root
from builder.profile import Profile, load
from builder.render import element_closure

TARGET_COLD = 0.70
TARGET_SIZE = 0.45
TARGET_AGENT = 0.60  # hvagent active against the bare image's sshd
TARGET_AGENT_REBUILD = 0.20  # against the bare image's full build


def package_list(profile: Profile) -> list[str]:
    """Every package the profile's own elements install, then the profile's own."""
    pkgs: list[str] = []
    ours = elements_dir().resolve()
    for element in element_closure(profile.elements):
        f = element / "package-installs.yaml"
        if element.resolve().parent != ours or not f.is_file():
            continue
        for name, opts in (yaml.safe_load(f.read_text()) or {}).items():
            if not (opts or {}).get("uninstall"):
                pkgs.append(name)
    pkgs += profile.packages
    return list(dict.fromkeys(p for p in pkgs if p not in profile.packages_removed))


def bare_network_element(root: Path) -> Path:
    """A one-file element: DHCP on every wired NIC, so the peer's sshd is reachable;
    plus server-core's fix that keeps DNS working in the build chroot once
    systemd-resolved (in the package list, which `-p` installs after install.d) is in."""
    el = root / "bench-bare-network"
    (el / "static/etc/systemd/network").mkdir(parents=True)
    (el / "install.d").mkdir()
    (el / "post-install.d").mkdir()
    (el / "element-deps").write_text("install-static\n")
    dns_fix = elements_dir() / "server-core/install.d/02-server-core-build-dns"
    shutil.copy2(dns_fix, el / "post-install.d" / dns_fix.name)
    (el / "static/etc/systemd/network/80-dhcp.network").write_text(
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n")
    script = el / "install.d/60-bench-networkd"
    script.write_text("#!/bin/bash\nset -eu -o pipefail\n"
                      "systemctl enable systemd-networkd.service\n")
    script.chmod(0o755)
    return root


def build_bare(profile: Profile, work: Path) -> tuple[float, Path]:
    mirror, security = mirrors.host_mirrors(profile.release)
    env = {
        **os.environ,
        "ELEMENTS_PATH": str(bare_network_element(work / "elements")),
        "DIB_RELEASE": profile.release,
        "DIB_DISTRIBUTION_MIRROR": mirror,
        "DIB_DEBIAN_SECURITY_MIRROR": security,
        "DIB_IMAGE_CACHE": str(dib.image_cache_dir()),
        "DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE": "1",
        "DIB_DEBOOTSTRAP_CACHE": "1",
        "PATH": f"{Path(dib.dib_executable()).parent}:{os.environ.get('PATH', '')}",
    }
    out = work / "bare"
    cmd = [dib.dib_executable(), "-t", "qcow2", "-o", str(out)]
    if profile.image_size_gb:
        cmd += ["--image-size", profile.image_size_gb]
    cmd += ["-p", ",".join(package_list(profile)), "debian-minimal", "vm", "bench-bare-network"]
    took = timed(cmd, env=env, log=work / "bare-dib.log")
    return took, out.with_suffix(".qcow2")


def sshd_answers(port: int) -> bool:
    """True when the guest's sshd sends its banner through the forwarded port (QEMU user
    networking accepts the TCP connection even before the guest listens)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(3)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def agent_after_sshd(machine: qemu.Machine, identity: Path) -> float | None:
    """Seconds from ssh.service's activation to hvagent.service's in the guest, from
    systemd's monotonic timestamps (None while the agent is not active yet)."""
    r = subprocess.run(machine.ssh_base(identity)
                       + ["systemctl show -P ActiveEnterTimestampMonotonic"
                          " hvagent.service ssh.service"],
                       capture_output=True, text=True, timeout=60)
    stamps = r.stdout.split()
    if r.returncode != 0 or len(stamps) != 2 or not all(v.isdigit() for v in stamps) \
            or "0" in stamps:
        return None
    return (int(stamps[0]) - int(stamps[1])) / 1e6


def boot(image: Path, agent: bool, timeout: float = 600.0) -> tuple[float, float | None]:
    """Seconds from QEMU's start until sshd answers and (when `agent`) until systemd
    reports hvagent.service active.

    The agent's time is read from systemd in the guest (the console stops showing unit
    status once a getty owns it): its activation minus ssh.service's, added to the moment
    sshd answered here, so both figures count from QEMU's start."""
    with tempfile.TemporaryDirectory(prefix="corehost-bench-key-") as tmp:
        identity = Path(tmp) / "id"
        if agent:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(identity)], check=True, timeout=60)
        opts = qemu.BootOptions(image=image, accel="tcg", snapshot=True, no_reboot=True,
                                ssh_key=identity.with_suffix(".pub") if agent else None)
        ssh: float | None = None
        started: float | None = None
        with qemu.Machine(opts) as machine:
            start = time.monotonic()
            while ssh is None or (agent and started is None):
                now = time.monotonic() - start
                if now > timeout or not machine.running:
                    raise qemu.BootError(f"{image.name}: not up after {now:.0f}s:\n"
                                         f"{machine.serial_tail()}")
                if ssh is None and sshd_answers(machine.ssh_port):
                    ssh = time.monotonic() - start
                if agent and ssh is not None:
                    gap = agent_after_sshd(machine, identity)
                    started = None if gap is None else ssh + gap
                time.sleep(0.5)
    say(f"  boot {image.name}: sshd {ssh:.1f}s"
        + (f", hvagent active {started:.1f}s" if started is not None else ""))
    return ssh, started


def one_change_rebuild(corehost: str, profile: str, work: Path, path: Path, what: str,
                       comment: bytes) -> float:
    """Seconds to rebuild after one line of `path` changed (restored afterwards, and the
    image rebuilt from the restored source is what the boot figures measure)."""
    original = path.read_bytes()
    try:
        path.write_bytes(original + comment + b" bench/build.py: a " + what.encode()
                         + b" change\n")
        took = timed([corehost, "build", profile], log=work / f"{what}.log")
    finally:
        path.write_bytes(original)
    if '"reused": true' not in (repo_root() / "out" / Path(profile).stem
                                / "manifest.json").read_text():
        say(f"WARNING: the {what} rebuild did not reuse the base")
    timed([corehost, "build", profile], log=work / f"{what}-restore.log")  # not measured
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--profile", default="profiles/server-core.yaml")
    args = ap.parse_args()
    profile = load(args.profile)
    corehost = str(Path(sys.executable).parent / "corehost")
    image = repo_root() / "out" / profile.name / f"{profile.name}.qcow2"
    tarball = dib.image_cache_dir() / f"debootstrap-debian-{profile.release}-amd64.tar.gz"

    with tempfile.TemporaryDirectory(prefix="corehost-bench-") as tmp:
        work = Path(tmp)
        if not tarball.is_file():
            say("warming DIB's debootstrap cache (not measured)")
            timed([corehost, "build", args.profile], log=work / "warm.log")
        cold = timed([corehost, "build", args.profile, "--force"], log=work / "cold.log")
        nochange = timed([corehost, "build", args.profile], log=work / "nochange.log")
        if "up to date" not in (work / "nochange.log").read_text():
            say("WARNING: an input (elements, profile, agent source) changed during the run: "
                "the no-change figure is a full rebuild")
        agent_only = one_change_rebuild(corehost, args.profile, work,
                                        repo_root() / "hvagent" / "__init__.py",
                                        "agent-only", b"\n#")
        late_only = one_change_rebuild(
            corehost, args.profile, work,
            repo_root() / "elements/server-core/static/etc/systemd/network/80-dhcp.network",
            "late-file", b"#")
        bare_build, bare_image = build_bare(profile, work)
        size, bare_size = image.stat().st_size, bare_image.stat().st_size
        ours_ssh, ours_agent = boot(image, agent=True)
        bare_ssh, _ = boot(bare_image, agent=False)

    assert ours_agent is not None
    mib = 1024 * 1024
    rows = [
        ("cold build (s)", cold, bare_build, TARGET_COLD),
        ("no-change rebuild (s)", nochange, bare_build, None),
        ("agent-only rebuild (s)", agent_only, bare_build, TARGET_AGENT_REBUILD),
        ("late-file rebuild (s)", late_only, bare_build, TARGET_AGENT_REBUILD),
        ("image size (MiB)", size / mib, bare_size / mib, TARGET_SIZE),
        ("boot to sshd (s, TCG)", ours_ssh, bare_ssh, None),
        ("boot to hvagent active (s, TCG)", ours_agent, bare_ssh, TARGET_AGENT),
    ]
    print(f"\n{'':34}{'server-core':>12}{'bare DIB':>10}{'ratio':>8}  target")
    for what, ours, peer, target in rows:
        ratio = ours / peer
        verdict = "" if target is None else f"<= {target:.2f}x " + (
            "ok" if ratio <= target else "MISSED")
        print(f"{what:34}{ours:12.1f}{peer:10.1f}{ratio:7.2f}x  {verdict}")
    print(f"\npeer: disk-image-create debian-minimal vm -p {','.join(package_list(profile))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
