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


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise ``Interrupted``; the previous handlers come back after.

    A signal the process was started ignoring stays ignored: ``nohup`` (SIGHUP) and a shell's background job
    (SIGINT) chose that. Only the main thread can install handlers; elsewhere (a library caller's worker) this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = [s for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]

    def raise_(signum: int, _frame: object) -> None:
        # Ignore a second signal while the first unwinds: the cleanup must finish, not be cut short.
        for s in caught:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    old = {s: signal.signal(s, raise_) for s in caught}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
