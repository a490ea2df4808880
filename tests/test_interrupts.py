"""interrupts.py: a signal unwinds a command once; a second one while it unwinds is dropped, quietly."""

from __future__ import annotations

import signal
import sys
import threading

import pytest

from moe_energy.interrupts import Interrupted, exit_code, signals_raise

BOTH = {signal.SIGINT, signal.SIGTERM}


def test_two_signals_caught_together_unwind_once_without_a_race_traceback(monkeypatch):
    """Issue 25: Ctrl-C then a scheduler's SIGTERM while the process is inside one C call: both are caught by the C
    layer before any Python handler runs. The first handler used to set SIG_IGN for the rest, so CPython found
    no handler for the pending SIGTERM and printed 'OSError: Signal 15 ignored due to race condition'."""
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(Interrupted) as e:
        with signals_raise():
            signal.pthread_sigmask(signal.SIG_BLOCK, BOTH)  # both arrive while "inside a C call"
            me = threading.main_thread().ident
            signal.pthread_kill(me, signal.SIGINT)  # to this thread: no other thread may take them
            signal.pthread_kill(me, signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, BOTH)  # delivered together here
            for _ in range(1000):  # bytecodes: where Python runs its pending handlers
                pass
    assert e.value.signum == signal.SIGINT and exit_code(e.value) == 130
    assert unraisable == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_nested_blocks_drop_a_second_signal_until_the_outermost_ends():
    """The CLI's block holds a command's own (sweep's): the second signal, after the inner block gave the outer
    handler back, is still dropped; once the outermost block ended, a new signal raises again."""
    with pytest.raises(Interrupted) as e:
        with signals_raise():
            try:
                with signals_raise():
                    signal.raise_signal(signal.SIGINT)
            finally:
                signal.raise_signal(signal.SIGTERM)  # while the first unwinds, after the inner block ended
    assert e.value.signum == signal.SIGINT
    with pytest.raises(Interrupted) as again:
        with signals_raise():
            signal.raise_signal(signal.SIGTERM)
    assert again.value.signum == signal.SIGTERM
