"""What a build shows while it runs: DIB's phases as a rich progress bar on a terminal,
else one plain log line per step (CI logs, pipes). rich is imported only on a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from builder.dib import PHASES, DibState


class Progress:
    """DIB phases as a rich progress bar on a terminal, else one log line per step."""

    def __init__(self, title: str, terminal: bool | None = None) -> None:
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.title = title
        self.started = time.monotonic()
        self._progress: Any = None  # rich.progress.Progress, imported only on a terminal
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.fields[step]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=len(PHASES), step="start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr,
                  flush=True)

    def __call__(self, state: DibState) -> None:
        if self._progress is not None and self._task is not None:
            done = PHASES.index(state.phase) if state.phase in PHASES else 0
            self._progress.update(self._task, completed=done, step=state.step)
        else:
            self.note(f"dib: {state.step}")
