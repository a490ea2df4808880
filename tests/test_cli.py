"""End to end through the real CLI: the run's JSON document, the presets table, and bad input -> exit 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import QUICK, QUICK_FILE, TINY_SHAPE, TINY_TASK

from moe_energy.cli import main

TINY = [*TINY_SHAPE, *TINY_TASK, *QUICK]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_energy", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_run_writes_versioned_json_with_units(tmp_path):
    r = cli("run", *TINY, "--moe-strategy", "masked_loop,active_loop,grouped,padded", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    files = list(tmp_path.glob("run-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == "moe-energy/run" and doc["schema_version"] >= 1
    assert doc["spec"] == {"experts": 4, "hidden": 16, "layers": 2, "top_k": 2, "input_dim": 40, "classes": 4}
    assert doc["environment"]["torch"] and doc["environment"]["cpu_model"]
    names = [m["name"] for m in doc["models"]]
    assert names[:4] == ["moe[masked_loop]", "moe[active_loop]", "moe[grouped]", "moe[padded]"]
    assert "dense_total" in names and "dense_active" in names
    for m in doc["models"]:
        for key in ("inferences_per_second", "inferences_per_joule", "energy_j", "average_power_w",
                    "latency_p50_ms", "flops_per_inference", "accuracy"):
            assert key in m
        assert m["inferences_per_second"] > 0
        assert m["latency_p50_ms"] > 0
        assert 0.0 <= m["accuracy"] <= 1.0
    for m in doc["models"][:4]:  # what optimize.prepare did is recorded per variant, outside the window
        assert m["optimize"]["strategy"] == m["strategy"] == m["optimize"]["resolved_strategy"]
        assert m["optimize"]["compile"] is False and m["optimize"]["weight_layout"] in ("out_in", "in_out")
    dense = next(m for m in doc["models"] if m["name"] == "dense_total")
    moe = doc["models"][0]
    assert dense["params"] >= moe["params"]
    # one trained MoE serves every strategy: identical accuracy
    assert len({m["accuracy"] for m in doc["models"][:4]}) == 1
    assert "moe[grouped]" in r.stdout and "inferences/s" in r.stdout


@pytest.mark.slow
def test_presets_table():
    r = cli("presets")
    assert r.returncode == 0
    for figure in ("2,687,192", "63,418,800", "368,287,260", "2,789,237,600", "23,539", "11,730"):
        assert figure in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--preset", "huge"], "preset='huge' is unknown"),
        (["run", "--top-k", "9"], "top_k=9 exceeds experts=8"),
        (["run", "--hidden", "0"], "hidden=0 must be a positive integer"),
        (["run", "--hidden", "-5"], "hidden=-5"),
        (["run", "--device", "cuda"], "no CUDA GPU"),
        (["run", "--epochs", "abc"], "invalid int value"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--batch-size", "0"], "batch_size=0"),
        (["run", "--duration", "-1"], "duration=-1"),
        (["run", "--dtype", "int4"], "dtype='int4' is unknown"),
        (["run", "--tokens", "1,16"], "--tokens: only with --arch (an LLM MoE layer)"),
        (["run", "--max-forward-s", "5", "--routing", "balanced"], "--routing, --max-forward-s: only with --arch"),
        (["run", "--arch", "olmoe-1b-7b", "--max-forward-s", "0"], "max_forward_s=0.0 must be a finite number > 0"),
        (["bench-strategies", "--max-forward-s", "5"], "unrecognized arguments: --max-forward-s"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this host has CUDA")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_files_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("experts = 4\nwhatever = 1\n")
    assert main(["run", "--config", str(cfg)]) == 2
    assert "unknown key(s) ['whatever']" in capsys.readouterr().err
    bad = tmp_path / "d.npz"
    np.savez(bad, features=np.zeros((3, 2)))
    assert main(["run", *TINY_SHAPE, *TINY_TASK, *QUICK_FILE, "--data", str(bad), "--out", str(tmp_path)]) == 2
    assert "needs arrays 'x' and 'y'" in capsys.readouterr().err
    assert main(["run", *TINY_SHAPE, *TINY_TASK, *QUICK_FILE, "--data", str(tmp_path / "missing.npz"), "--out",
                 str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_config_file_drives_the_run(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('experts = 4\nhidden = 8\nlayers = 1\ntop_k = 1\ninput_dim = 12\nclasses = 3\nsamples = 200\n'
                   'epochs = 1\nduration = 0.2\nwarmup = 0.0\ndevice = "cpu"\nmodels = ["moe"]\n'
                   'repeats = 2\ncooldown = 0.0\nidle_seconds = 0.0\n')
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path)]) == 0
    doc = json.loads(next(tmp_path.glob("run-*.json")).read_text())
    assert doc["spec"]["hidden"] == 8 and [m["kind"] for m in doc["models"]] == ["moe"]


def test_the_cli_starts_without_the_compiler_stack_transformers_or_matplotlib():
    """Every command's start imports torch, not what only some commands use: torch._dynamo (~2 s on a small CPU,
    comes in when a run compiles or probes auto), transformers (peers, whole models) and matplotlib (report)."""
    code = ("import contextlib, io, sys; from moe_energy.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['run', '--help'])\n"
            "print(*(m in sys.modules for m in ('torch', 'torch._dynamo', 'transformers', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "False", "False"]
