"""A failure after measuring never loses the run; a strategy that cannot run a shape is refused before training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_SHAPE, TINY_TASK

from moe_energy.cli import main
from moe_energy.measure import roofline
from moe_energy.models.strategies import STRATEGIES, padded

SHAPE = [*TINY_SHAPE, *TINY_TASK]  # tests give their own --hidden after it
FAST = ["--samples", "300", "--epochs", "1", "--duration", "0.2", "--warmup", "0", "--cooldown", "0",
        "--idle-seconds", "0", "--meter", "none", "--device", "cpu"]  # no --repeats: tests give their own


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _doc(out) -> dict:
    (path,) = list(out.glob("run-*.json"))
    return json.loads(path.read_text())


@pytest.mark.parametrize("cmd", ["run", "plan"])
@pytest.mark.parametrize("hidden", ["18", "250"])
def test_a_named_strategy_that_cannot_run_the_shape_is_refused_before_training(tmp_path, capsys, cmd, hidden):
    extra = [*FAST, "--out", str(tmp_path / "out")] if cmd == "run" else ["--device", "cpu"]
    # grouped_fm: grouped_mm on every device (grouped takes oneDNN's linear on a CPU, which runs any shape)
    rc = main([cmd, *SHAPE, "--hidden", hidden, "--moe-strategy", "grouped_fm", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: --moe-strategy grouped_fm cannot run this shape")
    assert "Traceback" not in "".join(err)
    assert "16 bytes" in err[-1]
    assert not list(tmp_path.glob("out/*.json"))  # nothing trained, nothing written


@pytest.mark.parametrize("hidden", ["18", "250"])
def test_grouped_runs_any_shape(tmp_path, capsys, hidden):
    """Issue 25: grouped refused hidden 250 (grouped_mm's 16-byte rule); only grouped_fm keeps that limit."""
    assert main(["run", *SHAPE, "--hidden", hidden, "--moe-strategy", "grouped", "--repeats", "1", *FAST,
                 "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    rows = {m["name"]: m for m in _doc(tmp_path)["models"]}
    assert rows["moe[grouped]"]["status"] == "measured" and rows["moe[grouped]"]["inferences_per_second"] > 0


def test_auto_still_runs_a_shape_grouped_fm_cannot(tmp_path, capsys):
    assert main(["run", *SHAPE, "--hidden", "18", "--repeats", "1", *FAST, "--out", str(tmp_path)]) == 0
    doc = _doc(tmp_path)
    assert all(m["status"] == "measured" for m in doc["models"])


def test_a_strategy_that_breaks_mid_run_fails_that_model_and_every_window_is_kept(tmp_path, capsys, monkeypatch):
    def broken(x, expert_idx, gate_w, ex):  # runs the up-front check's 4 rows, breaks on a real batch
        if x.shape[0] > 4:
            raise RuntimeError("kernel exploded")
        return padded(x, expert_idx, gate_w, ex)

    monkeypatch.setitem(STRATEGIES, "broken", broken)
    rc = main(["run", *SHAPE, "--hidden", "16", "--moe-strategy", "padded,broken", "--repeats", "2",
               "--batch-size", "32", *FAST, "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    models = {m["name"]: m for m in _doc(tmp_path)["models"]}
    assert models["moe[broken]"]["status"] == "failed"
    assert models["moe[broken]"]["skipped"] == "failed: RuntimeError: kernel exploded"
    assert models["moe[broken]"]["inferences_per_joule"] is None and models["moe[broken]"]["windows"] == []
    for name in ("moe[padded]", "dense_total", "dense_active"):
        assert models[name]["status"] == "measured" and len(models[name]["windows"]) == 2
    assert "moe[broken]: failed: RuntimeError: kernel exploded" in out.out
    assert "Traceback" not in out.err


def test_a_damaged_roofline_cache_is_ignored_with_a_notice(tmp_path, capsys, cache_dir):
    cache_dir.mkdir()
    name = roofline.device_name(torch.device("cpu"))
    entry = {"device_name": name, "gemm_flops_per_s": {"float32": "fast"}, "bandwidth_bytes_per_s": 1e10,
             "gemm_size": 64, "copy_bytes": 1024, "measured_utc": "2026-01-01T00:00:00+00:00"}
    (cache_dir / "roofline.json").write_text(json.dumps({name: entry}))
    rc = main(["run", *SHAPE, "--hidden", "16", "--repeats", "1", *FAST, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "is damaged" in out and "calibrating it (once" in " ".join(out.split())  # then measured afresh
    doc = _doc(tmp_path / "out")
    assert all(m["status"] == "measured" and m["roofline_bound_ms"] > 0 for m in doc["models"])
    assert json.loads((cache_dir / "roofline.json").read_text())[name]["gemm_flops_per_s"]["float32"] > 0


@pytest.mark.parametrize("bad", [{"float32": float("nan")}, {"float32": -1.0}, {"float32": True}, "1e12"])
def test_roofline_entries_that_are_not_positive_numbers_are_refused(cache_dir, bad):
    cache_dir.mkdir()
    name = roofline.device_name(torch.device("cpu"))
    entry = {"device_name": name, "gemm_flops_per_s": bad, "bandwidth_bytes_per_s": 1e10, "gemm_size": 64,
             "copy_bytes": 1024, "measured_utc": "x"}
    (cache_dir / "roofline.json").write_text(json.dumps({name: entry}))
    said: list[str] = []
    assert roofline.load(torch.device("cpu"), notice=said.append) is None
    assert len(said) == 1 and "gemm_flops_per_s" in said[0]
