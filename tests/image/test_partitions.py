"""Partition management on the booted host: the agent creates and starts a child VM.

The child direct-boots the host's own kernel and initrd, so the check needs no guest
image; the agent decides KVM (nested) or TCG by itself (hvagent.host.kvm). Its new disk
goes to the profile's storage_dir (the CI profile moves it to /srv/vms), which the
agent's sandboxed unit must be allowed to write.
"""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import Iterator

import pytest
import yaml
from testinfra.host import Host

# The host runs under TCG in CI, and the child under nested virtualization on top:
# give the banner generous time; a healthy child prints it within seconds.
BANNER_WAIT_S = 180


@pytest.fixture
def child(host: Host) -> Iterator[str]:
    name = f"imgcheck-{uuid.uuid4().hex[:8]}"
    yield name
    host.run(f"hvctl vm stop {name} --force")
    host.run(f"hvctl vm delete {name}")


def host_kernel(host: Host) -> tuple[str, str]:
    kernels = sorted(host.check_output("ls /boot/vmlinuz-*").split())
    assert kernels, "no kernel in /boot"
    version = kernels[-1].removeprefix("/boot/vmlinuz-")
    initrd = f"/boot/initrd.img-{version}"
    assert host.file(initrd).exists
    return kernels[-1], initrd


@pytest.mark.needs_disk  # the child boots the host's /boot kernel
def test_child_vm_boots_the_hosts_kernel(host: Host, child: str) -> None:
    kernel, initrd = host_kernel(host)
    create = host.run(
        f"hvctl vm create {child} --vcpus 1 --memory 256 --kernel {kernel} "
        f"--initrd {initrd} --append {shlex.quote('console=ttyS0 panic=-1')}"
    )
    assert create.rc == 0, create.stderr
    start = host.run(f"hvctl vm start {child}")
    assert start.rc == 0, start.stderr

    shown = json.loads(host.check_output(f"hvctl --json vm show {child}"))
    assert shown["name"] == child
    assert shown["state"] == "running"

    # Poll inside the host (one ssh round trip) until the banner reaches the serial log.
    wait = host.run(
        f"end=$(( $(date +%s) + {BANNER_WAIT_S} )); "
        f"while [ $(date +%s) -lt $end ]; do "
        f"hvctl vm console {child} --lines 400 | grep -q 'Linux version' && exit 0; "
        f"sleep 2; done; exit 1"
    )
    console = host.run(f"hvctl vm console {child} --lines 400").stdout
    assert wait.rc == 0, f"no kernel banner on the child's console:\n{console[-2000:]}"
    assert "Linux version" in console

    shown = json.loads(host.check_output(f"hvctl --json vm show {child}"))
    assert shown["state"] == "running"


def agent_config(host: Host) -> dict[str, str]:
    cfg = yaml.safe_load(host.file("/etc/hvagent/hvagent.yaml").content_string)
    assert isinstance(cfg, dict)
    return cfg


def test_unit_may_write_the_storage_dir(host: Host) -> None:
    storage = agent_config(host)["storage_dir"]
    shown = host.check_output("systemctl show --property=ReadWritePaths hvagent.service")
    writable = [p.lstrip("-") for p in shown.removeprefix("ReadWritePaths=").split()]
    assert storage in writable, shown


@pytest.mark.needs_disk  # the child boots the host's /boot kernel
def test_child_vm_disk_is_created_in_the_storage_dir(host: Host, child: str) -> None:
    storage = agent_config(host)["storage_dir"]
    kernel, initrd = host_kernel(host)
    create = host.run(
        f"hvctl vm create {child} --vcpus 1 --memory 256 --new-disk 64M --kernel {kernel} "
        f"--initrd {initrd} --append {shlex.quote('console=ttyS0 panic=-1')}"
    )
    assert create.rc == 0, create.stderr
    shown = json.loads(host.check_output(f"hvctl --json vm show {child}"))
    disk = shown["spec"]["disks"][0]["path"]
    assert disk.startswith(storage.rstrip("/") + "/"), (disk, storage)
    assert host.file(disk).is_file

    start = host.run(f"hvctl vm start {child}")
    assert start.rc == 0, start.stderr
    shown = json.loads(host.check_output(f"hvctl --json vm show {child}"))
    assert shown["state"] == "running"
    # The running QEMU holds the disk in the storage dir open for writing.
    held = host.run(f"ls -l /proc/{shown['pid']}/fd")
    assert held.rc == 0 and disk in held.stdout, held.stdout
