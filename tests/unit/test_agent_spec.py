"""VM spec validation and the QEMU command line built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hvagent.drivers.cmdline import VMFiles, blockdev, build_command, cpu_args
from hvagent.spec import NAME_RE, DiskSpec, VMSpec, parse_size

FILES = VMFiles.for_vm("v", Path("/run/x"), Path("/log/x"), Path("/state/x"))
TCG = ["-accel", "tcg"]


def _arg(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_defaults_fill_limits() -> None:
    s = VMSpec(name="v", vcpus=2, memory_mib=256)
    assert (s.max_vcpus, s.max_memory_mib, s.memory_slots) == (2, 256, 0)
    s = VMSpec(name="v", memory_mib=256, max_memory_mib=1024)
    assert s.memory_slots == 8


@pytest.mark.parametrize("fields, message", [
    ({"vcpus": 3, "max_vcpus": 2}, "vcpus (3) is above max_vcpus (2)"),
    ({"memory_mib": 300, "max_memory_mib": 200}, "memory_mib (300) is above max_memory_mib"),
    ({"memory_mib": 100, "max_memory_mib": 200, "memory_slots": 0}, "needs memory_slots"),
    ({"append": "quiet"}, "initrd and append need kernel"),
    ({"disks": [{"path": "/a", "size": 1}]}, "exactly one of path"),
    ({"disks": [{}]}, "exactly one of path"),
    ({"disks": [{"size": "1X"}]}, "not a size"),
    ({"nics": [{"mac": "zz:00:00:00:00:00"}]}, "not a MAC"),
    ({"nics": [{"network": "user", "vlan": 10}]}, "a user-mode NIC has no VLAN"),
    ({"nics": [{"network": "a b"}]}, "is not a valid name"),
    ({"name": "a b"}, "is not a valid name"),
])
def test_bad_specs(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        VMSpec.model_validate({"name": "v", **fields})
    assert message in str(e.value)


def test_sizes_and_vhd_alias() -> None:
    assert parse_size("512M") == 512 << 20 and parse_size("2GiB") == 2 << 30
    assert DiskSpec(size="1G", format="vhd").format == "vpc"


def test_command_line_from_spec() -> None:
    spec = VMSpec(
        name="v", vcpus=2, max_vcpus=4, memory_mib=256, max_memory_mib=1024,
        disks=[DiskSpec(path="/img/a,b.qcow2", format="qcow2"),
               DiskSpec(path="/img/b.vhd", format="vpc")],
        nics=[{"mac": "52:54:00:00:00:01"}], boot_order=["network", "disk"],
        kernel="/k", initrd="/i", append="console=ttyS0",
    )
    cmd = build_command(spec, FILES, TCG)
    assert cmd[0] == "qemu-system-x86_64" and "-nodefaults" in cmd and "-daemonize" in cmd
    assert _arg(cmd, "-machine") == ["q35"]
    assert _arg(cmd, "-m") == ["256M,slots=8,maxmem=1024M"]
    assert _arg(cmd, "-smp") == ["2,maxcpus=4"]
    assert _arg(cmd, "-qmp") == ["unix:/run/x/v.qmp,server=on,wait=off"]
    assert _arg(cmd, "-pidfile") == ["/run/x/v.pid"]
    assert _arg(cmd, "-serial") == ["file:/log/x/v.serial.log"]
    devices = _arg(cmd, "-device")
    assert sum(d.startswith("pcie-root-port,") for d in devices) == 8
    # network first, then the disks in order
    assert "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:00:00:01,bootindex=1" in devices
    assert "virtio-blk-pci,drive=disk0,id=disk0,bootindex=2" in devices
    assert "virtio-blk-pci,drive=disk1,id=disk1,bootindex=3" in devices
    blockdevs = _arg(cmd, "-blockdev")
    assert '"filename": "/img/a,b.qcow2"' in blockdevs[0] and '"driver": "vpc"' in blockdevs[1]
    assert _arg(cmd, "-kernel") == ["/k"] and _arg(cmd, "-append") == ["console=ttyS0"]
    assert cmd[cmd.index("-accel") + 1] == "tcg"


def test_uefi_uses_a_per_vm_variable_store() -> None:
    cmd = build_command(VMSpec(name="v", firmware="uefi"), FILES, TCG)
    assert _arg(cmd, "-drive") == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "if=pflash,format=raw,unit=1,file=/state/x/vms/v/OVMF_VARS.fd",
    ]
    assert "-m" in cmd and _arg(cmd, "-m") == ["512M"]


# limits and hostile input (schema level; the host's limits: tests/integration)

@pytest.mark.parametrize("fields, field", [
    ({"memory_mib": 10**23}, "memory_mib"),
    ({"max_memory_mib": 512 * 1024 + 1}, "max_memory_mib"),
    ({"vcpus": 2**64}, "vcpus"),
    ({"memory_slots": 257}, "memory_slots"),
    ({"disks": [{"size": "99999T"}]}, "size"),
    ({"disks": [{"size": (2040 << 30) + 512, "format": "vhd"}]}, "largest vpc disk"),
    ({"disks": [{"size": (64 << 40) + 512, "format": "vhdx"}]}, "largest vhdx disk"),
    ({"disks": [{"path": "a\0b"}]}, "control character"),
    ({"disks": [{"path": ""}]}, "path"),
    ({"kernel": "/k\x1b"}, "control character"),
    ({"kernel": "/k", "initrd": "/i\0"}, "control character"),
    ({"kernel": "/k", "append": "a\0"}, "control character"),
    ({"kernel": "/" + "é" * 200}, "255 bytes"),
    ({"kernel": "/a" * 600}, "at most 1000 characters"),
])
def test_impossible_or_hostile_specs(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        VMSpec.model_validate({"name": "v", **fields})
    assert field in str(e.value)


def test_largest_disks_of_each_format_are_accepted() -> None:
    from hvagent.spec import MAX_DISK_BYTES
    for fmt, size in MAX_DISK_BYTES.items():
        assert DiskSpec(size=size, format=fmt).size == size


@pytest.mark.parametrize("name", ["vmé", "虚拟机", "a" * 64, "-a", "_a", ".a", "a/b", "a b",
                                  "a\0", "a\n", ""])
def test_names_outside_the_rule_are_refused_with_the_rule(name: str) -> None:
    from hvagent.spec import NAME_RULE
    with pytest.raises(ValidationError) as e:
        VMSpec(name=name)
    assert len(e.value.errors()) == 1 and NAME_RULE in str(e.value)


def test_longest_name_and_the_schema_state_the_rule() -> None:
    assert VMSpec(name="a" * 63).name == "a" * 63
    props = VMSpec.model_json_schema()["properties"]
    assert props["name"]["maxLength"] == 63 and props["name"]["pattern"] == NAME_RE
    assert props["memory_mib"]["maximum"] == 512 * 1024 and props["vcpus"]["maximum"] == 255
    disk = DiskSpec.model_json_schema()["properties"]
    assert disk["size"]["anyOf"][0]["maximum"] == 1 << 51


def test_cross_field_rules_are_marked() -> None:
    with pytest.raises(ValidationError) as e:
        VMSpec(name="v", vcpus=3, max_vcpus=2)
    assert [err["type"] for err in e.value.errors()] == ["cross_field"]


def test_nested_virtualization_policy_becomes_cpu_flags() -> None:
    tcg = ["-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm"]
    assert cpu_args(tcg, nested=True) == tcg
    assert cpu_args(tcg, nested=False) == ["-accel", "tcg,thread=multi", "-cpu",
                                           "qemu64,-svm,-vmx"]
    spec = VMSpec(name="v")
    assert _arg(build_command(spec, FILES, tcg, nested=False), "-cpu") == ["qemu64,-svm,-vmx"]
    assert _arg(build_command(spec, FILES, tcg), "-cpu") == ["qemu64,+svm"]


def test_only_the_agents_own_qcow2_images_use_lazy_refcounts() -> None:
    own = DiskSpec(path="/img/a.qcow2", format="qcow2", size=1 << 20, created=True)
    brought = DiskSpec(path="/img/b.qcow2", format="qcow2")
    raw = DiskSpec(path="/img/c.raw", format="raw", size=1 << 20, created=True)
    assert blockdev("disk0", own)["lazy-refcounts"] is True
    assert "lazy-refcounts" not in blockdev("disk1", brought)
    assert "lazy-refcounts" not in blockdev("disk2", raw)
