"""Shared fixtures: small shapes that train and measure in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture
def tiny_spec():
    from moe_energy.config import ModelSpec

    return ModelSpec(experts=4, hidden=16, layers=2, top_k=2, input_dim=40, classes=4)


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
