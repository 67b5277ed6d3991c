"""Progress reporting for long disk work: a rich bar on a terminal, plain log lines
otherwise. Library code takes a `Progress` callback and never draws anything itself."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Called with the fraction done, 0.0 .. 1.0.
Progress = Callable[[float], None]


def no_progress(_done: float) -> None:
    return None


@contextmanager
def progress_display(description: str, *, enabled: bool = True) -> Iterator[Progress]:
    """A Progress callback that draws on a terminal (stderr) or logs every 10 %."""
    if not enabled:
        yield no_progress
        return
    if sys.stderr.isatty():
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        with RichProgress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeRemainingColumn(), transient=True,
        ) as bar:
            task = bar.add_task(description, total=1.0)
            yield lambda done: bar.update(task, completed=done)
        return
    last = [-1]

    def report(done: float) -> None:
        step = int(done * 10)
        if step > last[0]:
            last[0] = step
            print(f"{description}: {step * 10}%", file=sys.stderr, flush=True)

    yield report
