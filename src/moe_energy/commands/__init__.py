"""The CLI's commands. Each module registers its own with ``@command``; cli.py imports them all.

A command is two functions: ``add_arguments(parser)`` and ``handler(args) -> exit code``. Everything it
prints goes through ``console``/``err_console``; user text (paths, names, messages) is escaped, never markup.
cli.main runs it inside ``guarded_streams``: a standard output that fails raises ``StdoutLost``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO, TypeVar

from rich.console import Console
from rich.markup import escape

from ..interrupts import exit_code, signal_name, signals_raise
from ..storage.results import NotSaved, save_or_rescue

# Piped output (CI logs, files) gets a wide console so tables keep whole numbers instead of '…'.
# (A closed stdout, ``>&-``, is None here: no terminal.)
_tty = sys.stdout is not None and sys.stdout.isatty()
console = Console() if _tty else Console(width=max(160, shutil.get_terminal_size().columns))
err_console = Console(stderr=True)


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
T = TypeVar("T")


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``handler`` as ``moe-energy NAME``."""

    def deco(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, add_arguments, handler)
        return handler

    return deco


def notice(msg: str) -> None:
    """A notice on standard error: the user's text in it printed as it is, never as markup."""
    err_console.print(f"notice: {escape(msg)}", highlight=False, soft_wrap=True)


def fmt(v: float | int | None, spec: str = ",.0f", unit: str = "") -> str:
    """A figure for a table: 'not measured' rather than 0, inf or NaN."""
    return "not measured" if v is None else f"{v:{spec}}{unit}"


# -- standard output that can go away --------------------------------------------------------------------
class StdoutLost(BaseException):
    """Standard output took no more (a reader that went away, a full disk): raised by every write after that.

    A BaseException, as KeyboardInterrupt is: no ``except Exception`` that records a model or a sweep point as
    failed can mistake a dead terminal for a broken measurement; ``finally`` blocks still run. cli.main turns
    it into the exit status.
    """


class GuardedStream:
    """``sys.stdout`` (``fatal``: a lost stream raises StdoutLost) or ``sys.stderr`` (diagnostics: dropped).

    The first OSError is kept in ``lost``. The process's own stream then points at /dev/null, so that the
    interpreter's last flush of what is still buffered cannot fail (and print a traceback) a second time.
    """

    def __init__(self, stream: TextIO, fatal: bool) -> None:
        self._stream, self._fatal = stream, fatal
        self.lost: OSError | None = None

    def write(self, text: str) -> int:
        if self.lost is None:
            try:
                return self._stream.write(text)
            except OSError as e:
                self._lose(e)
        if self._fatal and text:
            raise StdoutLost(self.lost)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.lost is not None:
            return  # nothing left to lose: every write says so
        try:
            self._stream.flush()
        except OSError as e:
            self._lose(e)
            if self._fatal:
                raise StdoutLost(e) from None

    def _lose(self, e: OSError) -> None:
        self.lost = e
        if self._stream not in (sys.__stdout__, sys.__stderr__):
            return  # not this process's stream (a test's capture): no descriptor to silence
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            self._stream.flush()  # what is still buffered drains into /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# Files a command has written during this invocation: named in the error line when stdout was lost.
SAVED: list[Path] = []


def record_saved(path: Path | str) -> None:
    """Note a file just written, so that a lost stdout (which would have named it) cannot hide where it is."""
    SAVED.append(Path(path))


@contextmanager
def guarded_streams() -> Iterator[GuardedStream | None]:
    """``sys.stdout``/``sys.stderr`` guarded for one invocation; yields the stdout guard (None when closed)."""
    before = sys.stdout, sys.stderr
    out = GuardedStream(sys.stdout, fatal=True) if sys.stdout is not None else None
    if out is not None:
        sys.stdout = out  # type: ignore[assignment]
    if sys.stderr is not None:
        sys.stderr = GuardedStream(sys.stderr, fatal=False)  # type: ignore[assignment]
    SAVED.clear()
    try:
        yield out
    finally:
        sys.stdout, sys.stderr = before
        if out is not None and out.lost is not None:
            # rich keeps what it failed to write and would print it ahead of the next invocation's output
            # (a second main() in one process: the tests)
            del console._buffer[:]


def save_then_show(doc: dict, out_dir: str | Path, stem: str, show: Callable[[], None], what: str = "results") -> int:
    """Save ``doc`` first, then print it: a standard output that fails cannot lose it; an unwritable ``--out``
    is rescued to the temp directory (named), still shown, and the command exits 1."""
    try:
        path = save_or_rescue(doc, out_dir, stem)
    except NotSaved as e:
        return _rescued(e, show)
    record_saved(path)
    show()
    console.print(f"{what} written to {escape(str(path))}", highlight=False, soft_wrap=True)
    return 0


def _rescued(e: NotSaved, show: Callable[[], None]) -> int:
    """A final write that failed: its rescue recorded, what was measured still shown, the error said; exit 1."""
    if e.rescue is not None:
        record_saved(e.rescue)
    try:
        show()
    finally:  # the table's stdout may be gone: where the results went is said all the same
        print(f"error: {e}", file=sys.stderr)
    return 1


def interruptible(body: Callable[[], T], then: Callable[[], str]) -> T | int:
    """``body()`` with SIGINT, SIGTERM and SIGHUP unwinding it like Ctrl-C (every ``finally`` runs: windows close,
    points roll back, temp files go); a signal ends it with one line, ``interrupted (SIGNAME): <then()>``, on
    standard error and exit 128 + N. The one way every command meets a signal (cli.main's own covers start-up)."""
    try:
        with signals_raise():
            return body()
    except KeyboardInterrupt as e:
        print(f"interrupted ({signal_name(e)}): {then()}", file=sys.stderr)
        return exit_code(e)


def measured(job: Callable[[], tuple[dict | None, Path | None]], show: Callable[[dict], None]
             ) -> tuple[dict, Path] | int:
    """Run a measuring job (``run``, on one process or on every rank of a job) under the signal guard; (doc, path)
    once saved, 0 on a job's other ranks (rank 0 saves and shows).

    A final write that failed still shows what was measured and where it was rescued (exit 1); an interrupted
    job wrote nothing, by design, and says so (128 + N). Saved before anything is printed: a standard output
    that fails afterwards loses nothing.
    """
    try:
        done = interruptible(job, lambda: "nothing was saved, a run is written only once complete; run the same "
                                          "command again to start over")
    except NotSaved as e:
        return _rescued(e, partial(show, e.doc))
    if isinstance(done, int):
        return done
    doc, path = done
    if doc is None or path is None:
        return 0
    record_saved(path)
    show(doc)
    console.print(f"results written to {escape(str(path))}", highlight=False, soft_wrap=True)
    return doc, path
