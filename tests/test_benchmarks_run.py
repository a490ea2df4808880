"""The benchmark scripts no other test runs (gpu_strategies, strategy_targets), and the pieces of the others that
compute their figures: shapes, units and arithmetic only, never a time (they measure)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MOE_ENERGY_CACHE_DIR": str(tmp_path / "cache")}


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA host runs the script for real")
def test_gpu_strategies_refuses_a_host_without_cuda_in_one_line(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(BENCH / "gpu_strategies.py"), str(out)], capture_output=True, text=True,
                       env=_env(tmp_path), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "no CUDA device" in r.stderr
    assert "--dry-run" in r.stderr and not out.exists()
    h = subprocess.run([sys.executable, str(BENCH / "gpu_strategies.py"), "--help"], capture_output=True, text=True,
                       env=_env(tmp_path), cwd=tmp_path, timeout=120)
    assert h.returncode == 0 and "OUT_DIR" in h.stdout and not (tmp_path / "--help").exists()


@pytest.mark.parametrize("argv, why", [
    (["precision_kernels.py", "--experts", "4"], "top_k=8 exceeds experts=4"),
    (["whole_moe_impls.py", "--tiny", "--model", "no-such-model"], "'no-such-model' is unknown"),
])
def test_a_bad_argument_is_an_argparse_error_not_a_traceback(tmp_path, argv, why):
    r = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and why in r.stderr


def _doc(ms: dict[str, float | None], batch: int) -> dict:
    """bench_strategies' document, its figures made from ``ms`` (None: a strategy that could not run)."""
    base = ms["moe[active_loop]"]
    rows = []
    for name, m in ms.items():
        if m is None:
            rows.append({"name": name, "kind": "moe", "status": "failed", "not_timed": "RuntimeError: no kernel",
                         "ms_per_batch": None, "inferences_per_second": None, "speedup_vs_active_loop": None,
                         "efficiency_vs_ideal": None, "roofline_bound_ms": None, "fraction_of_roofline": None})
            continue
        moe = name.startswith("moe[")
        rows.append({"name": name, "kind": "moe" if moe else "dense", "ms_per_batch": m,
                     "inferences_per_second": batch / (m / 1e3), "speedup_vs_active_loop": base / m,
                     "efficiency_vs_ideal": 0.5 * base / m if moe else None, "roofline_bound_ms": 1.0,
                     "fraction_of_roofline": 1.0 / m, "weight_layout": "out_in" if moe else None})
    return {"rows": rows, "host_load_average_1m": {"before": 1.0, "after": None}}


def test_strategy_targets_summary_rows_agree_over_an_even_count_of_runs(monkeypatch, capsys, tmp_path):
    st = _script("strategy_targets")
    runs = [  # grouped_fm never runs; the two runs' times far apart, so a mean of medians would show
        {"dense_total": 4.0, "moe[active_loop]": 8.0, "moe[grouped]": 2.0, "moe[grouped_fm]": None,
         "moe[padded]": 5.0, "moe[dense_experts]": 6.0, "moe[auto]": 2.5},
        {"dense_total": 40.0, "moe[active_loop]": 80.0, "moe[grouped]": 40.0, "moe[grouped_fm]": None,
         "moe[padded]": 50.0, "moe[dense_experts]": 60.0, "moe[auto]": 20.0},
    ]
    docs = iter(_doc(r, 10) for r in runs)
    monkeypatch.setattr(st, "bench_strategies", lambda *a, **k: next(docs))
    monkeypatch.setattr(st.roofline, "load", lambda dev: None)
    monkeypatch.setattr(sys, "argv", ["strategy_targets.py", "--repeats", "2", "--batch-size", "10",
                                      "--out", str(tmp_path)])
    st.main()
    out = capsys.readouterr().out.splitlines()
    assert "run 1: fastest moe[grouped] (out_in) 4.00x active_loop" in out[0] and "load 1.0 -> ?" in out[0]
    assert out[1].startswith("run 2: fastest moe[auto] (out_in) 4.00x active_loop")
    header = next(i for i, line in enumerate(out) if line.startswith("model"))
    assert "ms/batch" in out[header] and "inf/s" in out[header]
    table = {line.split()[0]: line.split()[1:] for line in out[header + 1:header + 8]}
    assert table["moe[grouped_fm]"][:3] == ["not", "timed", "in"]
    for name in ("dense_total", "moe[active_loop]", "moe[grouped]", "moe[auto]"):
        ms, per_s, vs, _eff, roof = table[name][:5]
        ms_want = (runs[0][name] + runs[1][name]) / 2  # the median of two
        assert float(ms) == pytest.approx(ms_want, abs=1e-3)
        assert float(per_s) == pytest.approx(10 / (ms_want / 1e3), abs=0.5)  # from that median: one row
        assert roof == f"{1.0 / ms_want:.0%}"
        ratios = [r["moe[active_loop]"] / r[name] for r in runs]  # each run's own ratio, then their median
        assert vs == f"{sum(ratios) / 2:.2f}x"
    assert out[-1] == "median over runs of the fastest exact MoE: 4.00x active_loop, efficiency vs ideal 2.00"
    saved = json.loads(next(tmp_path.glob("targets-*.json")).read_text())
    assert saved["summary"]["moe[grouped_fm]"]["runs_timed"] == 0 and len(saved["runs"]) == 2


@pytest.mark.slow
def test_strategy_targets_runs_the_small_preset_and_prints_one_row_per_model(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH / "strategy_targets.py"), "--preset", "small", "--repeats", "1", "--seconds", "0",
         "--batch-size", "8", "--threads", "1", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(tmp_path), timeout=300, check=True,
    ).stdout.splitlines()
    assert re.match(r"run 1: fastest moe\[\w+\] \((out_in|in_out)\) [\d.]+x active_loop", out[0])
    header = next(i for i, line in enumerate(out) if line.startswith("model"))
    assert out[header - 1].startswith("small, batch 8, float32, 1 threads, median of 1 runs")
    rows = [line.split() for line in out[header + 1:] if line.startswith(("dense", "moe["))]
    assert [r[0] for r in rows][:3] == ["dense_total", "dense_active", "moe[masked_loop]"] and len(rows) >= 9
    for r in rows:  # model, ms/batch, inf/s, vs active_loop (with its x), efficiency or (dense), of roofline
        ms, per_s = float(r[1]), float(r[2])
        assert ms > 0 and r[3].endswith("x") and r[5] == "n/a"  # no calibration in this cache: no roofline
        # ms prints to 3 decimals (0.274 may be 0.2745): inf/s must lie within what that rounding allows
        assert 8e3 / (ms + 5e-4) - 0.5 <= per_s <= 8e3 / max(ms - 5e-4, 1e-9) + 0.5
    assert next(r for r in rows if r[0] == "moe[active_loop]")[3] == "1.00x"
    assert len(list((tmp_path / "out").glob("targets-small-float32-b8-t1.json"))) == 1


def test_cpu_gemm_feature_major_is_w_times_x_transposed_through_onednn():
    cg = _script("cpu_gemm")
    if not cg.ONEDNN:
        pytest.skip("no oneDNN in this torch build")
    w, x = torch.randn(64, 32), torch.randn(3, 32)  # a "weight" of 3 rows: kernels.linear would give it to MKL
    with torch.inference_mode():
        assert torch.allclose(cg.feature_major(x, w), w @ x.T, atol=1e-5)


def test_precision_kernels_leaves_out_a_candidate_that_cannot_run(capsys):
    pk = _script("precision_kernels")
    calls = {"ok": 0}

    def ok() -> None:
        calls["ok"] += 1

    def no_kernel() -> None:
        raise RuntimeError("could not create a primitive descriptor")

    t, how = pk.timed({"ok": ok, "bf16_onednn": no_kernel}, 0.0, False, min_rounds=3)
    assert list(t) == ["ok"] and len(t["ok"]) == 3 and calls["ok"] == 4  # a warm-up call, then 3 rounds
    assert "bf16_onednn: not run (RuntimeError: could not create" in capsys.readouterr().out
    assert pk.timed({"bf16_onednn": no_kernel}, 0.0, False) == ({}, "no candidate ran")
