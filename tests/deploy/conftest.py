"""Boots of every output of a built profile (CI builds profiles/ci.yaml and
profiles/server-core.yaml first): each test runs `corehost test` or `corehost boot` as a
user would, with a timeout, and reads its exit status and serial console.

The full image suite runs once, on the qcow2 under BIOS (`corehost test out/ci/ci.qcow2`
in ci/test.sh); here every other output runs the `smoke` subset plus the deployment
checks (tests/image/test_deployment.py). Outputs are taken from OUT (default out/) and
must exist: a missing build fails, it is never skipped.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from deploy_support import BOOT_TIMEOUT, out_dir


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = str(Path(__file__).parent)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.image)
            item.add_marker(pytest.mark.timeout(2 * BOOT_TIMEOUT + 300))


@pytest.fixture(scope="session")
def ci() -> Path:
    return out_dir("ci")


@pytest.fixture(scope="session")
def manifest(ci: Path) -> dict:
    return json.loads((ci / "manifest.json").read_text())


@pytest.fixture(scope="session")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("identity") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corehost-deploy",
                    "-f", str(key)], check=True, timeout=60)
    return key
