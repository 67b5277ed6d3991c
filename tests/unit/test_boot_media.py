"""The boot override and removable media on QEMU's command line: which device boots
first (bootindex), the CD drive and USB stick, and Secure Boot's firmware."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hvagent.drivers.cmdline import (
    OVMF_CODE_SECURE,
    VMFiles,
    boot_indexes,
    build_command,
    ovmf_vars_template,
)
from hvagent.spec import BootDevice, VMSpec

FILES = VMFiles.for_vm("v", Path("/run/x"), Path("/log/x"), Path("/state/x"))
TCG = ["-accel", "tcg"]


def _devices(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]


def _spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {
        "name": "v", "disks": [{"path": "/img/a.qcow2", "format": "qcow2", "created": True}],
        "nics": [{"mac": "52:54:00:00:00:01"}],
        "media": [{"slot": "cd", "image": "/img/x.iso", "source": "http://h/x.iso"}]}
    return VMSpec.model_validate({**base, **kw})


def test_an_enabled_override_boots_its_target_first() -> None:
    spec = _spec(boot_override={"target": "cd", "enabled": "once"})
    assert spec.effective_boot_order() == [BootDevice.CD, BootDevice.DISK]
    assert spec.effective_boot_order(override=False) == [BootDevice.DISK]
    assert boot_indexes(spec, spec.effective_boot_order()) == {"cd0": 1, "disk0": 2}
    devs = _devices(build_command(spec, FILES, TCG))
    cd = next(d for d in devs if d.startswith("ide-cd"))
    assert "bootindex=1" in cd and "drive=media-cd" in cd
    assert any(d.startswith("virtio-blk-pci") and "bootindex=2" in d for d in devs)


def test_a_disabled_override_leaves_the_boot_order() -> None:
    spec = _spec(boot_override={"target": "cd", "enabled": "disabled"})
    assert boot_indexes(spec, spec.effective_boot_order()) == {"disk0": 1}
    cd = next(d for d in _devices(build_command(spec, FILES, TCG)) if d.startswith("ide-cd"))
    assert "bootindex" not in cd


def test_a_nic_keeps_its_boot_rom_only_where_it_may_boot() -> None:
    plain = next(d for d in _devices(build_command(_spec(), FILES, TCG))
                 if d.startswith("virtio-net"))
    assert "romfile=" in plain  # never boots: no PXE ROM
    pxe = _spec(boot_override={"target": "network", "enabled": "continuous"})
    nic = next(d for d in _devices(build_command(pxe, FILES, TCG)) if d.startswith("virtio-net"))
    assert "romfile=" not in nic and "bootindex=1" in nic


def test_an_empty_cd_drive_and_a_usb_stick() -> None:
    empty = _spec(media=[{"slot": "cd"}])
    cd = next(d for d in _devices(build_command(empty, FILES, TCG)) if d.startswith("ide-cd"))
    assert "drive=" not in cd
    usb = _spec(media=[{"slot": "usb", "image": "/img/stick.img", "write_protected": False}],
                boot_override={"target": "usb", "enabled": "once"})
    cmd = build_command(usb, FILES, TCG)
    devs = _devices(cmd)
    assert "qemu-xhci,id=usbhost" in devs
    stick = next(d for d in devs if d.startswith("usb-storage"))
    assert "bootindex=1" in stick and "removable=on" in stick
    assert '"read-only": false' in " ".join(cmd)


def test_secure_boot_uses_the_smm_firmware_and_the_enrolled_keys() -> None:
    spec = VMSpec(name="v", firmware="uefi", secure_boot=True)
    cmd = build_command(spec, FILES, TCG)
    assert "q35,smm=on" in cmd
    assert any(str(OVMF_CODE_SECURE) in a for a in cmd)
    assert "driver=cfi.pflash01,property=secure,value=on" in cmd
    assert ovmf_vars_template(spec).name == "OVMF_VARS_4M.ms.fd"
    assert "smm=on" not in " ".join(build_command(VMSpec(name="v", firmware="uefi"), FILES,
                                                  TCG))


@pytest.mark.parametrize("bad, field", [
    ({"media": [{"slot": "cd"}, {"slot": "cd"}]}, "one drive per slot"),
    ({"secure_boot": True}, "secure_boot needs firmware uefi"),
    ({"media": [{"slot": "dvd"}]}, "slot"),
    ({"boot_override": {"target": "floppy"}}, "target"),
    ({"boot_override": {"enabled": "twice"}}, "enabled"),
])
def test_bad_media_and_boot_specs_name_the_rule(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        VMSpec.model_validate({"name": "v", **bad})
    assert field in str(e.value)
