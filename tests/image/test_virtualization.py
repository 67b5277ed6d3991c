"""The host can run guests under KVM: CPU flag, modules with nesting, /dev/kvm, QEMU."""

from __future__ import annotations

import pytest
from testinfra.host import Host

# KVM_CREATE_VM = _IO(KVMIO=0xAE, 0x01); returns the new VM's file descriptor.
CREATE_VM = (
    "import fcntl, os; "
    "kvm = os.open('/dev/kvm', os.O_RDWR | os.O_CLOEXEC); "
    "print(fcntl.ioctl(kvm, 0xAE01, 0))"
)


def cpu_flags(host: Host) -> list[set[str]]:
    """The flags of every CPU in /proc/cpuinfo."""
    return [
        set(line.split(":", 1)[1].split())
        for line in host.file("/proc/cpuinfo").content_string.splitlines()
        if line.startswith("flags")
    ]


def cpu_vendor_module(host: Host) -> str:
    flags = cpu_flags(host)[0]
    if "svm" in flags:
        return "kvm_amd"
    if "vmx" in flags:
        return "kvm_intel"
    pytest.fail("neither svm nor vmx in /proc/cpuinfo: the CPU exposes no virtualization")


@pytest.mark.smoke
def test_cpu_exposes_svm_or_vmx(host: Host) -> None:
    flags = cpu_flags(host)
    assert flags, "no flags line in /proc/cpuinfo"
    assert all("svm" in f or "vmx" in f for f in flags)


@pytest.mark.smoke
def test_kvm_modules_loaded_with_nesting(host: Host) -> None:
    vendor = cpu_vendor_module(host)
    modules = host.file("/proc/modules").content_string.split("\n")
    loaded = {line.split(" ", 1)[0] for line in modules if line}
    assert {"kvm", vendor, "vhost_net"} <= loaded
    nested = host.file(f"/sys/module/{vendor}/parameters/nested").content_string.strip()
    assert nested in ("1", "Y")


@pytest.mark.smoke
def test_dev_kvm_creates_a_vm(host: Host) -> None:
    assert host.run("test -c /dev/kvm").rc == 0, "/dev/kvm is not a character device"
    out = host.check_output(f'python3 -c "{CREATE_VM}"')
    assert int(out) >= 0


@pytest.mark.parametrize("tool", ["qemu-system-x86_64", "qemu-img", "qemu-storage-daemon"])
def test_qemu_tools_run(host: Host, tool: str) -> None:
    out = host.check_output(f"{tool} --version")
    assert "version" in out.lower()


# Asks the agent on its unix socket (root is its administrator there) for /api/v1/agent.
AGENT_INFO = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "s.sendall(b'GET /api/v1/agent HTTP/1.0\\r\\nHost: agent\\r\\n\\r\\n'); "
    "data = b''.join(iter(lambda: s.recv(65536), b'')); "
    "print(data.split(b'\\r\\n\\r\\n', 1)[1].decode())"
)


def test_booted_with_the_accelerator_corehost_chose(host: Host) -> None:
    """`corehost test` says which accelerator it booted with; the guest's CPU agrees:
    TCG runs QEMU's own CPU model (qemu64), KVM the host's (-cpu host)."""
    import os

    accel = os.environ.get("COREHOST_ACCEL")
    assert accel in ("kvm", "tcg"), "run through `corehost test`, which sets COREHOST_ACCEL"
    models = {line.split(":", 1)[1].strip()
              for line in host.file("/proc/cpuinfo").content_string.splitlines()
              if line.startswith("model name")}
    assert models
    emulated = all("QEMU Virtual CPU" in m for m in models)
    assert emulated == (accel == "tcg"), (accel, os.environ.get("COREHOST_ACCEL_REASON"), models)


def test_agent_reports_its_accelerator_choice(host: Host) -> None:
    import json

    import yaml

    cfg = yaml.safe_load(host.file("/etc/hvagent/hvagent.yaml").content_string)
    # The agent opens its socket only after its own KVM probe (up to its deadline, slow
    # under TCG): wait for it, bounded.
    waited = host.run("timeout 180 sh -c 'until test -S \"$1\"; do sleep 1; done' - %s",
                      cfg["listen"])
    assert waited.rc == 0, f"{cfg['listen']}: the agent's socket never appeared"
    info = json.loads(host.check_output("python3 -c %s %s", AGENT_INFO, cfg["listen"]))
    assert info.get("accel") in ("kvm", "tcg"), info
    if cfg["accel"] == "auto":
        # the probe decided, and says how
        assert info["accel_reason"].startswith(("probe guest", "/dev/kvm", "no probe kernel"))
    else:
        assert info["accel"] == cfg["accel"]
    if info["accel"] == "kvm":
        assert host.run("test -c /dev/kvm").rc == 0
