"""Shared set-up of the image checks: they run against a booted host given by --hosts.

`corehost test IMAGE` boots the image and runs this directory with
`--hosts=ssh://root@127.0.0.1:PORT --ssh-config=FILE`; by hand, pass the same options.
Without --hosts testinfra would check the machine running pytest, which proves nothing
about the image, so every check is skipped with that reason instead.
"""

from __future__ import annotations

import pytest

HERE = __file__.rsplit("/", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    hosts = config.getoption("hosts", default=None)
    skip = pytest.mark.skip(
        reason="tests/image checks a booted image: run `corehost test IMAGE` "
        "or pass --hosts=ssh://root@127.0.0.1:PORT --ssh-config=FILE"
    )
    for item in items:
        if not str(item.path).startswith(HERE):
            continue
        item.add_marker(pytest.mark.image)
        if not hosts:
            item.add_marker(skip)
