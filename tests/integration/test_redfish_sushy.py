"""An Ironic-style redfish-virtual-media deploy, driven by sushy (the Redfish client
OpenStack Ironic uses) against a real agent and a real guest: power off, eject, insert a
bootable ISO served over HTTP, boot from the CD once, power on — the guest boots the ISO —
and the next reboot boots the disk again."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sushy
import tinyguest
from bootmedia import make_iso, serve_directory
from redfish_support import console, create_vm, wait_console
from secure_agent import SecureAgent

pytestmark = pytest.mark.integration

VM = "deploy"


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory,
           tiny_guest: tinyguest.TinyGuest) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("sushy")
    a = SecureAgent(root)
    media = root / "www"
    media.mkdir()
    make_iso(tiny_guest, media / "cd.iso", tiny_guest.append(tag="cd"))
    # The VM's disk: the same guest, told apart by its tag (isohybrid: it boots as a disk).
    disk = root / "images" / "disk.img"
    disk.parent.mkdir(parents=True, exist_ok=True)
    make_iso(tiny_guest, root / "disk.iso", tiny_guest.append(tag="disk"))
    shutil.copyfile(root / "disk.iso", disk)
    a.start()
    token = a.token("ironic", "VMOperator")["token"]
    create_vm(a, name=VM, memory_mib=256, boot_order=["disk"],
              disks=[{"path": str(disk), "format": "raw"}])
    with serve_directory(media) as url:
        conn = sushy.Sushy(a.url, verify=str(a.ca_pem), auth=sushy.auth.SessionAuth(
            username="ironic", password=token))
        try:
            yield {"agent": a, "conn": conn, "iso_url": f"{url}/cd.iso"}
        finally:
            a.root_client.post(f"/vms/{VM}/stop", json={"force": True})
            a.stop()


def _tags(agent: SecureAgent, after: int) -> list[str | None]:
    text = console(agent, VM)[after:]
    return [tinyguest.parse_tag(line) for line in text.splitlines()
            if line.startswith("TINY-TAG")]


def _boot_tag(agent: SecureAgent, after: int) -> str:
    """The tag of the next boot the console shows past `after` characters."""
    wait_console(agent, VM, "TINY-TAG", after=after, timeout=240)
    tags = _tags(agent, after)
    assert tags and tags[0] is not None, console(agent, VM)[after:]
    return tags[0]


def test_virtual_media_deploy_boots_the_iso_once(deploy: dict[str, Any]) -> None:
    a: SecureAgent = deploy["agent"]
    conn: sushy.Sushy = deploy["conn"]
    system = conn.get_system(f"/redfish/v1/Systems/{VM}")
    assert system.power_state == sushy.POWER_STATE_OFF
    system.reset_system(sushy.RESET_ON)
    assert _boot_tag(a, 0) == "disk"  # the firmware boots the VM's disk
    # Ironic's redfish-virtual-media deploy, step by step.
    system.reset_system(sushy.RESET_FORCE_OFF)
    system.refresh()
    assert system.power_state == sushy.POWER_STATE_OFF
    manager = conn.get_manager(system.managers[0].path)
    cd = next(m for m in manager.virtual_media.get_members()
              if sushy.VIRTUAL_MEDIA_CD in m.media_types)
    if cd.inserted:
        cd.eject_media()
    cd.insert_media(deploy["iso_url"], inserted=True, write_protected=True)
    cd.refresh()
    assert cd.inserted and cd.image == deploy["iso_url"]
    system.set_system_boot_options(sushy.BOOT_SOURCE_TARGET_CD,
                                   enabled=sushy.BOOT_SOURCE_ENABLED_ONCE)
    system.reset_system(sushy.RESET_ON)
    assert _boot_tag(a, 0) == "cd"  # it really booted the ISO
    system.refresh()
    # Once is spent by that boot: the next one is the disk again, even a reboot
    # inside the same QEMU.
    assert system.boot.enabled == sushy.BOOT_SOURCE_ENABLED_DISABLED
    mark = len(console(a, VM))
    system.reset_system(sushy.RESET_FORCE_RESTART)
    assert _boot_tag(a, mark) == "disk"
    # Continuous: every boot, until disabled.
    system.set_system_boot_options(sushy.BOOT_SOURCE_TARGET_CD,
                                   enabled=sushy.BOOT_SOURCE_ENABLED_CONTINUOUS)
    for _ in range(2):
        mark = len(console(a, VM))
        system.reset_system(sushy.RESET_FORCE_RESTART)
        assert _boot_tag(a, mark) == "cd"
    system.refresh()
    assert system.boot.enabled == sushy.BOOT_SOURCE_ENABLED_CONTINUOUS
    # Through the System's own VirtualMedia: eject, and the next boot is the disk.
    system.set_system_boot_options(sushy.BOOT_SOURCE_TARGET_HDD,
                                   enabled=sushy.BOOT_SOURCE_ENABLED_DISABLED)
    for m in system.virtual_media.get_members():
        if m.inserted:
            m.eject_media()
    # The image the agent downloaded goes with the eject.
    assert list((Path(a.root) / "images" / f"{VM}.media").glob("*")) == []
    mark = len(console(a, VM))
    system.reset_system(sushy.RESET_FORCE_RESTART)
    assert _boot_tag(a, mark) == "disk"
    system.reset_system(sushy.RESET_FORCE_OFF)

