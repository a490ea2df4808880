"""Ctrl-C, SIGTERM and SIGHUP end a command the same way: an exception that unwinds every ``with`` and ``finally``.

SIGINT already raises KeyboardInterrupt; a batch scheduler's SIGTERM would kill the process outright,
skipping the code that closes the energy window, rolls back the point in flight and removes temp files.
``signals_raise()`` makes all three raise ``Interrupted`` (a KeyboardInterrupt) instead, so they take one path,
a second signal cannot cut that cleanup short, and the command exits 128 + the signal's number (130 for SIGINT,
143 for SIGTERM, 129 for SIGHUP), as a shell expects.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# SIGHUP: the terminal of an interactive session closed. Not on Windows.
SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class Interrupted(KeyboardInterrupt):
    """A SIGINT, SIGTERM or SIGHUP received while a command ran under ``signals_raise``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(e: BaseException) -> int:
    """130 for Ctrl-C, 128 + N for signal N."""
    return 128 + int(getattr(e, "signum", signal.SIGINT))


def signal_name(e: BaseException) -> str:
    return signal.Signals(getattr(e, "signum", signal.SIGINT)).name


# The signal now unwinding the command (empty when none): every later one is dropped until the outermost
# ``signals_raise`` block ends, so a Ctrl-C then a scheduler's SIGTERM end as quietly as one signal.
_UNWINDING: list[int] = []
_DEPTH = [0]


def _raise(signum: int, _frame: object) -> None:
    """The handler: raise ``Interrupted`` for the first signal, return quietly for any later one.

    Never SIG_IGN from inside the handler: a second signal that the C layer caught before this one ran would then
    find no Python handler and print "OSError: Signal 15 ignored due to race condition" with a traceback."""
    if _UNWINDING:
        return
    _UNWINDING.append(signum)
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise ``Interrupted``; the previous handlers come back after.

    A signal the process was started ignoring stays ignored: ``nohup`` (SIGHUP) and a shell's background job
    (SIGINT) chose that. Only the main thread can install handlers; elsewhere (a library caller's worker) this
    does nothing. Blocks nest (the CLI's around a command's own); a second signal while the first unwinds is
    dropped until the outermost block ends: the cleanup must finish, not be cut short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = [s for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, _raise) for s in caught}
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        for s, h in old.items():
            signal.signal(s, h)
        if not _DEPTH[0]:
            _UNWINDING.clear()


@contextmanager
def signals_held() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP wait (blocked, not lost): for cleanup that must finish, such as
    putting a power limit back. A signal that arrived meanwhile is delivered as the block ends. Only the main
    thread's mask matters to Python's handlers; elsewhere, or without pthread_sigmask, this does nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
