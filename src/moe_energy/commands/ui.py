"""Rich progress bars for the runner's long steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichUI:
    def __init__(self, console: Console) -> None:
        self.console = console

    def _progress(self, *cols) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *cols, console=self.console,
                        transient=False)

    @contextmanager
    def training(self, name: str, total_steps: int) -> Iterator[Callable[[int, int], None]]:
        with self._progress(MofNCompleteColumn(), TextColumn("epoch {task.fields[epoch]}"),
                            TimeElapsedColumn(), TimeRemainingColumn()) as p:
            task = p.add_task(escape(f"train {name}"), total=max(total_steps, 1), epoch=0)
            yield lambda epoch, b: p.update(task, advance=1, epoch=epoch + 1)
            p.update(task, completed=max(total_steps, 1))

    @contextmanager
    def measuring(self, name: str, seconds: float) -> Iterator[Callable[[float], None]]:
        with self._progress(TextColumn("{task.completed:.0f}/{task.total:.0f} s"), TimeRemainingColumn()) as p:
            task = p.add_task(escape(f"measure {name}"), total=seconds)
            yield lambda t: p.update(task, completed=t)
            p.update(task, completed=seconds)

    def info(self, msg: str) -> None:
        pass
