"""Shared fixtures and helpers: the tiny shapes every test runs (train and measure in seconds on 2 CPU cores), the
checks of a one-line error, and the ``slow`` marker's list (``pytest -m "not slow"`` is the quick loop)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Tests must not fight each other (or CI's 2 cores) for threads.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The signal tests send SIGINT/SIGTERM/SIGHUP and expect moe-energy's handlers. moe-energy (rightly) leaves a signal
# alone that its parent ignores, and an ignored signal stays ignored across exec: under `nohup` (SIGHUP) or as a
# background job of a script (SIGINT) those tests would test the runner, not the tool. Give them the defaults.
for _sig in (signal.SIGHUP, signal.SIGTERM):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, signal.SIG_DFL)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# The tiny seed shape's flags (E, H, L, k) and task (input 40, 4 classes), a quick run of it (one short window, no
# rest, no idle reading, on the CPU), and a tiny LLM layer: what the CLI tests run (a later flag overrides one of
# these). Import them: ``from conftest import TINY_SHAPE, TINY_TASK, QUICK``.
TINY_SHAPE = ["--experts", "4", "--hidden", "16", "--layers", "2", "--top-k", "2"]
TINY_TASK = ["--input-dim", "40", "--classes", "4"]
QUICK = ["--samples", "300", "--epochs", "1", "--duration", "0.3", "--warmup", "0", "--repeats", "1", "--cooldown",
         "0", "--idle-seconds", "0", "--device", "cpu"]
QUICK_FILE = QUICK[2:]  # QUICK for a --data run: a file brings its own rows, and --samples beside it is refused
TINY_LAYER = ["--arch", "custom", "--d-model", "32", "--ffn-dim", "16", "--experts", "8", "--top-k", "2"]


@pytest.fixture
def tiny_spec():
    from moe_energy.config import ModelSpec

    return ModelSpec(experts=4, hidden=16, layers=2, top_k=2, input_dim=40, classes=4)


def one_line(msg: str, *needles: str, longest: int | None = None) -> str:
    """A message the user reads (an exception's, a refusal's): one line, not empty, naming every needle."""
    assert msg.strip() and "\n" not in msg.strip(), msg
    assert longest is None or len(msg) < longest, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def one_line_error(code: int | None, err: str, *needles: str, expected: int = 2) -> str:
    """A refused command: exit ``expected`` (2: the user's mistake; ``code`` None: not checked) and, on standard
    error, nothing but one ``error:`` line naming every needle, no traceback."""
    assert code is None or code == expected, err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return one_line(err, *needles)


def error_line(err: str) -> str:
    """The one ``error:`` line among what a command printed on standard error (notices may come first), no
    traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def raises_one_line(exc: type[Exception], fn: Callable[[], Any], *names: str) -> Exception:
    """``fn()`` raises ``exc`` (and not the other of TypeError/ValueError) with a one-line message naming ``names``."""
    with pytest.raises(exc) as info:
        fn()
    other = ValueError if exc is TypeError else TypeError
    assert not isinstance(info.value, other), f"{type(info.value).__name__} is also a {other.__name__}"
    one_line(str(info.value), *names)
    return info.value


def in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI run by ``moe_energy.cli.main`` in this process, ``env`` added to the environment for the call: what
    ``python -m moe_energy`` would return, without a process start (3-8 s of imports on a small CPU). For tests of
    what a command does; tests of what a process does (signals, pipes, exit on a lost peer) start one."""
    from moe_energy.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["moe-energy", *args], code, out.getvalue(), err.getvalue())


FAKE_RAPL = Path(__file__).resolve().parents[1] / "scripts" / "fake_rapl.py"


@pytest.fixture
def live_rapl(tmp_path, monkeypatch):
    """A fake powercap tree of real files whose package counter a child process advances at 40 W;
    MOE_ENERGY_POWERCAP_ROOT points at it for the test's duration."""
    from moe_energy.energy.rapl import ENV_ROOT

    root = tmp_path / "powercap"
    proc = subprocess.Popen([sys.executable, str(FAKE_RAPL), str(root), "--watts", "40"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().startswith("ready")  # type: ignore[union-attr]
    monkeypatch.setenv(ENV_ROOT, str(root))
    yield root
    proc.terminate()
    proc.wait(timeout=10)
