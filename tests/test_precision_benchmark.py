"""benchmarks/precision_kernels.py still runs and prints its tables (their shape only: it measures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_energy.models.kernels import ONEDNN_DTYPES

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "precision_kernels.py"), "--arch", "olmoe-1b-7b", "--experts", "8",
         "--seconds", "0", "--no-wait-idle", *args],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout.splitlines()


@pytest.mark.skipif(torch.bfloat16 not in ONEDNN_DTYPES, reason="oneDNN runs no bf16 on this CPU (no avx512_core): "
                                                             "the benchmark's bf16 candidates have no kernel")
def test_precision_kernels_prints_a_row_per_candidate_and_a_layer_line():
    out = _run("--rows", "1,9", "--layer-tokens", "1", "--only", "bf16_onednn,int8_pack,int8_quant")
    assert out[0].startswith("olmoe-1b-7b: 8 experts, d=2048, I=1024")
    rows = [line.split() for line in out if line[:4].strip().isdigit() and len(line.split()) == 7]
    assert [(r[0], r[1]) for r in rows] == [(n, c) for n in ("1", "9") for c in ("bf16_onednn", "int8_pack",
                                                                               "int8_quant")]
    for r in rows:  # rows, candidate, GB/s, GB/s median, GFLOP/s, of bound, vs bf16_onednn (with its x)
        assert all(float(v) > 0 for v in r[2:6]) and r[6].endswith("x")
    layer = [line for line in out if "tokens:" in line]
    assert len(layer) == 1 and "int8 grouped" in layer[0] and "bf16 grouped+prepack" in layer[0]


@pytest.mark.slow
def test_precision_kernels_times_w8a8_and_each_weight_formats_whole_layer_in_fp32():
    out = _run("--dtype", "float32", "--d-model", "256", "--ffn-dim", "128", "--rows", "1", "--layer-tokens", "1,3",
               "--only", "fp32_onednn,w8a8_fbgemm")
    rows = [line.split() for line in out if line[:4].strip().isdigit() and len(line.split()) == 6]
    assert [(r[0], r[1]) for r in rows] == [("1", "fp32_onednn"), ("1", "w8a8_fbgemm")]
    assert all(float(v) > 0 for r in rows for v in r[2:6])
    layer = [line for line in out if "tokens:" in line]
    assert [line.split()[0] for line in layer] == ["1", "3"]
    for line in layer:  # the layer as a run holds it in each format, each with its speed-up over fp32 grouped
        assert all(f"{name} " in line for name in ("fp32 grouped", "fp32 active_loop", "int8 grouped", "w8a8 grouped"))
        assert line.count("x  ") >= 4
