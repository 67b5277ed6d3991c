"""Shared set-up of the image checks: they run against a booted host given by --hosts.

`corehost test IMAGE` boots the image and runs this directory with
`--hosts=ssh://root@127.0.0.1:PORT --ssh-config=FILE`; by hand, pass the same options.
Without --hosts testinfra would check the machine running pytest, which proves nothing
about the image, so every check is skipped with that reason instead.

What was booted (firmware, USB, PXE, format, extra disks) comes from `corehost test` in
COREHOST_BOOT. Checks marked `needs_disk` are skipped with the reason "diskless" on a
PXE boot. `smoke` marks the subset CI runs on every boot but the one full run.
"""

from __future__ import annotations

import pytest
from boot_info import booted

HERE = __file__.rsplit("/", 1)[0]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "smoke: the subset run on every boot of every output")
    config.addinivalue_line("markers", "needs_disk: skipped on a diskless (PXE) boot")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    hosts = config.getoption("hosts", default=None)
    skip = pytest.mark.skip(
        reason="tests/image checks a booted image: run `corehost test IMAGE` "
        "or pass --hosts=ssh://root@127.0.0.1:PORT --ssh-config=FILE"
    )
    diskless = pytest.mark.skip(reason="diskless")
    pxe = bool(booted()["pxe"])
    for item in items:
        if not str(item.path).startswith(HERE):
            continue
        item.add_marker(pytest.mark.image)
        if not hosts:
            item.add_marker(skip)
        elif pxe and item.get_closest_marker("needs_disk"):
            item.add_marker(diskless)
