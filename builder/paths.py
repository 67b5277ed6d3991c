"""Where the project's inputs live: elements/, profiles/, templates, tests/image/.

The builder runs from a checkout (an editable install), so everything is found relative
to the package; a checkout in the current directory is the fallback.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    env = os.environ.get("COREHOST_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "builder").is_dir():
        return here
    return Path.cwd()


def elements_dir() -> Path:
    return repo_root() / "elements"


def profiles_dir() -> Path:
    return repo_root() / "profiles"


def image_tests_dir() -> Path:
    return repo_root() / "tests" / "image"


def display(path: Path) -> str:
    """A path as the user should read it: relative to the current directory when inside."""
    cwd = Path.cwd()
    # abspath first: a symlink is named as the user wrote it, not as its target.
    tries = ((Path(os.path.abspath(path)), cwd), (Path(path).resolve(), cwd.resolve()))
    for candidate, base in tries:
        try:
            return str(candidate.relative_to(base))
        except ValueError:
            continue
    return str(path)
