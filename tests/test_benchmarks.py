"""The benchmark scripts still run (they measure, so nothing here looks at their times, only their shape)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gemm_orientation_prints_one_row_per_row_count():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gemm_orientation.py"), "--preset", "small", "--rows", "4,16",
         "--seconds", "0"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    ).stdout.splitlines()
    assert out[0].startswith("small: 8 experts x 4 layers, fp32")
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["4", "16"]
    for r in rows:  # rows, token-major ms, feature-major ms, speed-up (with its x), us per row
        assert len(r) == 5 and r[3].endswith("x")
        tm, fm, speedup, per_row = float(r[1]), float(r[2]), float(r[3][:-1]), float(r[4])
        assert tm > 0 and fm > 0
        # all three printed to 2 decimals from the unrounded ms: the true ms lie within 0.005 of the printed ones, so
        # the printed speed-up lies within 0.005 of a ratio between these bounds (a first-order bound on the
        # ratio's rounding fell short by its second-order term where an ms prints near 0.1: 0.80 and 0.08 ms, 9.35x)
        lo, hi = (tm - 0.005) / (fm + 0.005), (tm + 0.005) / max(fm - 0.005, 1e-9)
        assert lo - 0.0051 <= speedup <= hi + 0.0051
        # fm is printed to 0.01 ms, so fm / pairs carries up to 0.005 ms of rounding per pair count
        assert abs(per_row - fm * 1e3 / (int(r[0]) * 8)) <= 0.1 + 5.0 / (int(r[0]) * 8) + 0.001 * per_row


@pytest.mark.slow
def test_cpu_gemm_prints_both_libraries_rate_per_row_count():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_gemm.py"), "--arch", "olmoe-1b-7b", "--experts", "2",
         "--rows", "1,4", "--seconds", "0"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    ).stdout.splitlines()
    assert out[0].startswith("olmoe-1b-7b: 2 experts, d=2048, I=1024, fp32")
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["1", "4"]
    for r in rows:  # rows, MKL GB/s, oneDNN GB/s, oneDNN feature-major GB/s, speed-up (with its x)
        mkl, dnn, fm, speedup = float(r[1]), float(r[2]), float(r[3]), float(r[4][:-1])
        assert mkl > 0 and dnn > 0 and fm > 0 and r[4].endswith("x")
        # rates and speed-up printed to 0.01 from the unrounded rates: as in test_gemm_orientation, the speed-up lies
        # within 0.005 of a ratio of rates within 0.005 of the printed ones
        lo, hi = (dnn - 0.005) / (mkl + 0.005), (dnn + 0.005) / max(mkl - 0.005, 1e-9)
        assert lo - 0.0051 <= speedup <= hi + 0.0051
