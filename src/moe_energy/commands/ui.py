"""Rich progress bars for the runner's long steps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import StdoutLost


class RichUI:
    """The runner's progress bars. A standard output that went away mid-run (``| head``, a full disk) must not
    end the run before its results are saved: the bars' own StdoutLost is dropped here (the stream keeps it and
    cli.main reports it once the run is written); one raised in the runner's code passes through."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def _progress(self, *cols: ProgressColumn) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *cols, console=self.console,
                        transient=False)

    @contextmanager
    def _shown(self, p: Progress) -> Iterator[None]:
        """``p`` started and stopped around the block; only its own writes' StdoutLost is dropped."""
        _quietly(p.start)
        try:
            yield
        finally:
            _quietly(p.stop)

    @contextmanager
    def training(self, name: str, total_steps: int) -> Iterator[Callable[[int, int], None]]:
        p = self._progress(MofNCompleteColumn(), TextColumn("epoch {task.fields[epoch]}"), TimeElapsedColumn(),
                           TimeRemainingColumn())
        task = p.add_task(escape(f"train {name}"), total=max(total_steps, 1), epoch=0)
        with self._shown(p):
            yield lambda epoch, b: p.update(task, advance=1, epoch=epoch + 1)
            p.update(task, completed=max(total_steps, 1))

    @contextmanager
    def measuring(self, name: str, seconds: float) -> Iterator[Callable[[float], None]]:
        p = self._progress(TextColumn("{task.completed:.0f}/{task.total:.0f} s"), TimeRemainingColumn())
        task = p.add_task(escape(f"measure {name}"), total=seconds)
        with self._shown(p):
            yield lambda t: p.update(task, completed=t)
            p.update(task, completed=seconds)

    def info(self, msg: str) -> None:
        pass


def _quietly(step: Callable[[], object]) -> None:
    """Run a progress display's start or stop; its output lost is no reason to lose the measurement."""
    with contextlib.suppress(StdoutLost):
        step()
