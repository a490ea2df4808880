"""benchmarks/whole_moe_impls.py still runs and prints its rows (their shape only: it measures)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_whole_moe_impls_prints_every_implementation_and_the_ratio_per_batch():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "whole_moe_impls.py"), "--model", "qwen3-30b-a3b", "--tiny",
         "--layers", "2", "--batch", "1,3", "--context", "8", "--phases", "decode,prefill", "--seconds", "0"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout.splitlines()
    assert out[0].startswith("qwen3-30b-a3b-tiny: first 2 of 2 layers (2 MoE blocks swapped), float32, context 8")
    rows = [line for line in out if re.match(r"(decode|prefill) B=\d+: ", line)]
    assert [r.split(":")[0] for r in rows] == ["decode B=1", "decode B=3", "prefill B=1", "prefill B=3"]
    for r in rows:
        cells = re.findall(r"(eager|batched_mm|grouped_mm|moe-energy) ([\d.]+) \[([\d.]+)\]", r)
        assert [c[0] for c in cells] == ["eager", "batched_mm", "grouped_mm", "moe-energy"]
        assert all(float(best) <= float(med) for _, med, best in cells)
    ratios = [line for line in out if "moe-energy vs transformers' fastest" in line]
    assert len(ratios) == 4 and all(re.search(r"\d+\.\d\dx median, \d+\.\d\dx best, \d+ rounds", r) for r in ratios)
