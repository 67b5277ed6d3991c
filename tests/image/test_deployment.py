"""How the host was deployed: the firmware and medium it booted from, the root file
system it runs on, the agent's persistence, and the host config applied at first boot.

`corehost test` says what it booted (COREHOST_BOOT); what a boot must show beyond that
comes from the CI script in COREHOST_EXPECT (JSON): `hostname`, `addresses` (static,
never DHCP), `vm_create` / `vm_present` (a VM that must survive a reboot on a
COREHOST-DATA disk), `persistent`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from boot_info import booted
from testinfra.host import Host

pytestmark = pytest.mark.smoke


def expected() -> dict[str, Any]:
    return json.loads(os.environ.get("COREHOST_EXPECT") or "{}")


def root_mount(host: Host) -> dict[str, str]:
    out = host.check_output("findmnt -J -n -o SOURCE,FSTYPE,OPTIONS /")
    return json.loads(out)["filesystems"][0]


def test_booted_with_the_firmware_asked_for(host: Host) -> None:
    uefi = host.file("/sys/firmware/efi").is_directory
    assert uefi == (booted()["firmware"] == "uefi")


def test_root_file_system_is_what_the_medium_gives(host: Host) -> None:
    root = root_mount(host)
    if booted()["pxe"]:
        # Diskless: the squashfs from the second initrd, under a tmpfs overlay.
        assert root["fstype"] == "overlay"
        assert "upperdir=/run/corehost/ram/upper" in root["options"]
        lower = json.loads(host.check_output("findmnt -J -n -o FSTYPE /run/corehost/lower"))
        assert lower["filesystems"][0]["fstype"] == "squashfs"
        assert host.file("/run/corehost/diskless").exists
        return
    assert root["fstype"] == "ext4"
    disk = host.check_output(f"lsblk -n -o PKNAME {root['source']}").strip()
    transport = host.check_output(f"lsblk -d -n -o TRAN /dev/{disk}").strip()
    assert transport == ("usb" if booted()["usb"] else ""), (disk, transport)


def test_disk_is_the_hybrid_gpt_layout(host: Host) -> None:
    if booted()["pxe"]:
        pytest.skip("diskless")
    root = root_mount(host)["source"]
    disk = "/dev/" + host.check_output(f"lsblk -n -o PKNAME {root}").strip()
    table = json.loads(host.check_output(f"sfdisk --json {disk}"))["partitiontable"]
    assert table["label"] == "gpt"
    names = [p.get("name") for p in table["partitions"]]
    assert names == ["BSP", "ESP", "COREHOST-CFG", "root"]
    esp = table["partitions"][1]
    assert esp["type"].upper() == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    # The removable-media loader is on the ESP, read without mounting it.
    assert "BOOTX64.EFI" in host.check_output(f"mdir -b -i {esp['node']} ::/EFI/BOOT")


def test_root_fills_its_disk(host: Host) -> None:
    if booted()["pxe"]:
        pytest.skip("diskless")
    root = root_mount(host)["source"]
    disk = "/dev/" + host.check_output(f"lsblk -n -o PKNAME {root}").strip()
    disk_bytes = int(host.check_output(f"blockdev --getsize64 {disk}"))
    part_bytes = int(host.check_output(f"blockdev --getsize64 {root}"))
    fs_bytes = int(host.check_output("df -B1 --output=size / | tail -n1"))
    # GPT's backup header and the partitions before root take well under 100 MiB.
    assert disk_bytes - part_bytes < 100 * 2**20, (disk_bytes, part_bytes)
    assert fs_bytes > 0.9 * part_bytes, (fs_bytes, part_bytes)
    assert host.service("corehost-grow-root").is_enabled


def agent_info(host: Host) -> dict[str, Any]:
    return json.loads(host.check_output("hvctl --json host info"))


def test_agent_reports_whether_its_state_persists(host: Host) -> None:
    info = agent_info(host)
    data_disk = host.run("blkid -L COREHOST-DATA").rc == 0
    want = expected().get("persistent", not booted()["pxe"] or data_disk)
    assert info["persistent"] is want, info
    if want:
        assert info["warnings"] == []
    else:
        assert any("COREHOST-DATA" in w for w in info["warnings"]), info
        assert "warning:" in host.run("hvctl host info").stderr


def test_vm_kept_on_the_data_disk(host: Host) -> None:
    exp = expected()
    if "vm_create" in exp:
        name = exp["vm_create"]
        host.run(f"hvctl vm delete {name}")
        assert host.run(f"hvctl vm create {name} --vcpus 1 --memory 64").rc == 0
        assert host.check_output("findmnt -n -o FSTYPE /var/lib/hvagent") == "ext4"
    elif "vm_present" in exp:
        name = exp["vm_present"]
        shown = host.run(f"hvctl --json vm show {name}")
        assert shown.rc == 0, shown.stderr
        assert json.loads(shown.stdout)["name"] == name
    else:
        pytest.skip("this boot has no data-disk step (COREHOST_EXPECT)")


def test_host_config_applied(host: Host) -> None:
    exp = expected()
    if "hostname" not in exp:
        pytest.skip("this boot was given no host config to check (COREHOST_EXPECT)")
    assert host.check_output("hostname") == exp["hostname"]
    assert host.file("/etc/hostname").content_string.strip() == exp["hostname"]
    assert host.service("corehost-firstboot").is_running  # oneshot, RemainAfterExit
    addrs = json.loads(host.check_output("ip -j addr show"))
    for want in exp.get("addresses", []):
        ip, plen = want.split("/")
        found = [a for link in addrs for a in link.get("addr_info", [])
                 if a.get("local") == ip and a.get("prefixlen") == int(plen)]
        assert found, f"{want} not configured"
        # Static: never from DHCP (a lease would have a finite lifetime).
        assert found[0].get("dynamic") is not True
        assert found[0].get("valid_life_time") == 4294967295
