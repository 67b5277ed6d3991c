"""How hvctl shows an answer: JSON for scripts (`--json`), else the command's own view
for people. rich is imported by the views that draw with it, so a `--json` command
never pays for it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def show(args: argparse.Namespace, data: Any, human: Callable[[Any], object]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        human(data)

