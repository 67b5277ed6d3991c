"""What the deployment boots share: where the outputs are, and running corehost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A boot under TCG plus the smoke checks takes minutes; a cold PXE boot the longest.
BOOT_TIMEOUT = 1200


def out_dir(profile: str) -> Path:
    root = Path(os.environ.get("OUT", REPO / "out"))
    manifest = root / profile / "manifest.json"
    if not manifest.is_file():
        pytest.fail(f"{manifest} missing: run `corehost build profiles/{profile}.yaml` first")
    return root / profile


def corehost(*args: str, timeout: float = BOOT_TIMEOUT,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def corehost_test(*args: str, identity: Path, expect: dict | None = None,
                  smoke: bool = True) -> None:
    """`corehost test ARGS -- -m smoke` (or the whole image suite) with COREHOST_EXPECT;
    fails with its output tail. One vCPU: CI boots two guests at a time on two cores."""
    proc = corehost("test", *args, "--cpus", "1", "--identity", str(identity), "--",
                    *(["-m", "smoke"] if smoke else []),
                    env={"COREHOST_EXPECT": json.dumps(expect or {})})
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
