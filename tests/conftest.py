"""Fixtures shared by the test suites.

`fake_root` is a throw-away project root (COREHOST_ROOT) with its own elements/ and
profiles/, so tests can add elements and templates without touching the real ones.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "root"
    for d in ("elements", "profiles", "hvagent", "builder"):
        (root / d).mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "corehost"\n')
    (root / "hvagent" / "__init__.py").write_text('"""agent"""\n')
    monkeypatch.setenv("COREHOST_ROOT", str(root))
    monkeypatch.chdir(root)
    return root


@pytest.fixture()
def add_element(fake_root: Path) -> Callable[..., Path]:
    """Makes an element under fake_root/elements with the given files (relative paths)."""

    def add(name: str, files: dict[str, str], deps: tuple[str, ...] = ()) -> Path:
        element = fake_root / "elements" / name
        element.mkdir(parents=True, exist_ok=True)
        (element / "element-deps").write_text("".join(f"{d}\n" for d in deps))
        for rel, text in files.items():
            path = element / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        return element

    return add


@pytest.fixture()
def tiny_qcow2(tmp_path: Path) -> Path:
    """A real, small qcow2 with a few non-zero bytes written through qemu-io."""
    path = tmp_path / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "100M"], check=True,
                   timeout=60)
    if shutil.which("qemu-io"):
        subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 64k", str(path)], check=True,
                       capture_output=True, timeout=60)
    return path
