"""Inputs are checked before anything is allocated: every large allocation against free memory, every config
value against its kind. One `error:` line and exit 2, never a numpy or allocator traceback."""

from __future__ import annotations

import pytest
from conftest import TINY_SHAPE, TINY_TASK

from moe_energy import memory
from moe_energy.cli import main
from moe_energy.config import ModelSpec, RunOptions, resolve_config
from moe_energy.errors import ConfigError
from moe_energy.runner import sweep as sw
from moe_energy.runner.core import Refused
from moe_energy.runner.seed import check_inputs

TINY = [*TINY_SHAPE, *TINY_TASK]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("notice:")]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("cmd", ["run", "plan"])
@pytest.mark.parametrize("flags, needle, fix", [
    (["--samples", "100000000"], "the synthetic data (100,000,000 samples", "lower --samples"),
    (["--samples", "60000000", "--input-dim", "784"], "the synthetic data (60,000,000 samples", "lower --samples"),
    (["--batch-size", "10000000", "--input-dim", "784"], "the bench batch (10,000,000 rows)", "lower --batch-size"),
    (["--batch-size", "2000000", "--input-dim", "784"], "the bench batch (2,000,000 rows)", "lower --batch-size"),
])
def test_inputs_larger_than_memory_are_refused_before_allocating(tmp_path, capsys, monkeypatch, cmd, flags, needle,
                                                                  fix):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * 2**30)  # the same answer on every host
    args = [cmd, *TINY, *flags, "--device", "cpu"] + (["--out", str(tmp_path), "--meter", "none"] if cmd == "run"
                                                      else [])
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: out of memory (") and needle in line and line.endswith(fix)
    assert "8.0 GiB free on cpu" in line
    assert not list(tmp_path.glob("*.json"))


def test_input_need_is_arithmetic_and_checked_on_host_and_device(monkeypatch):
    asked: list[tuple[int, str, str]] = []
    monkeypatch.setattr(memory, "fit_problem", lambda n, d, what: asked.append((n, str(d), what)))
    spec = ModelSpec(experts=4, hidden=16, layers=2, top_k=2, input_dim=40, classes=4)
    check_inputs(spec, RunOptions(samples=1000, batch_size=64, dtype="bfloat16"), __import__("torch").device("cpu"))
    assert asked == [(memory.dataset_bytes(1000, 40, 4), "cpu", "the synthetic data (1,000 samples x 40 features)"),
                     (64 * 40 * (4 + 2), "cpu", "the bench batch (64 rows)")]


def test_a_sweep_point_too_large_for_memory_is_skipped_and_the_rest_measured(monkeypatch):
    free = 2**30
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    grid = sw.build_grid({"experts": "4", "hidden": "16", "layers": "2", "top_k": "2", "input_dim": 40,
                          "classes": 4, "batch_size": "32,4000000", "samples": 300, "epochs": 1})
    import torch

    with pytest.raises(Refused):  # what run() raises for that point; run_points turns it into a skip
        check_inputs(grid.points[1].spec, grid.points[1].opts, torch.device("cpu"))
    assert issubclass(Refused, ConfigError)
    status, reason, doc = sw.measure_point(grid.points[1], None, torch.device("cpu"),
                                           lambda *a, **k: check_inputs(a[0].spec, a[1], torch.device("cpu")), None)
    assert (status, doc) == ("skipped", None) and "lower --batch-size" in reason


@pytest.mark.parametrize("cfg, needle", [
    ({"out": ["a", "b"]}, "out=['a', 'b'] must be a path"),
    ({"out": ""}, "out='' must be a path"),
    ({"data": 5}, "data=5 must be a path"),
    ({"preset": ""}, "preset='' is unknown"),
    ({"preset": 3}, "preset=3 is unknown"),
    ({"experts": "4"}, "experts='4' is not a whole number"),
    ({"idle_seconds": True}, "idle-seconds=True"),
    ({"strategies": (1,)}, "must be a non-empty list of names"),
])
def test_config_values_of_the_wrong_kind_are_refused_by_key(cfg, needle):
    with pytest.raises(ConfigError) as e:
        resolve_config(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_list_valued_out_in_a_config_file_creates_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text('out = ["a", "b"]\n')
    assert main(["run", *TINY, "--config", "c.toml", "--meter", "none"]) == 2
    assert "must be a path" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


@pytest.mark.parametrize("cmd", ["meters", "plan"])
@pytest.mark.parametrize("flags, needle", [
    (["--device", "tpu"], "'tpu' is unknown"),
    (["--device", "cuda:x"], "'cuda:x' is unknown"),
    (["--device", "cpu:1"], "'cpu:1' is unknown"),
])
def test_a_device_torch_cannot_parse_is_one_line(capsys, cmd, flags, needle):
    assert main([cmd, *flags]) == 2
    line = _one_error_line(capsys)
    assert needle in line and "cuda:N" in line


@pytest.mark.parametrize("tdp", ["-5", "0", "nan", "inf"])
def test_a_cpu_tdp_that_is_not_a_finite_positive_wattage_is_refused(capsys, tmp_path, tdp):
    assert main(["meters", "--device", "cpu", "--cpu-tdp-watts", tdp]) == 2
    assert f"--cpu-tdp-watts {float(tdp)} must be a finite number of watts > 0" in _one_error_line(capsys)
    assert main(["run", *TINY, "--meter", "estimate", "--cpu-tdp-watts", tdp, "--out", str(tmp_path)]) == 2
    assert "must be a finite number of watts > 0" in _one_error_line(capsys)
    assert not list(tmp_path.glob("*.json"))


def test_a_cpu_tdp_above_any_cpus_power_is_refused(capsys, tmp_path):
    """1e12 W was accepted: every estimate in terawatts, labelled as a figure."""
    for cmd in (["meters", "--device", "cpu"], ["run", *TINY, "--meter", "estimate", "--out", str(tmp_path)],
                ["run", *TINY, "--out", str(tmp_path)]):  # auto's estimate checks it by the same rule
        assert main([*cmd, "--cpu-tdp-watts", "1e12"]) == 2
        assert "--cpu-tdp-watts 1000000000000.0 W is above any CPU's power (5000 W)" in _one_error_line(capsys)
    assert not list(tmp_path.glob("*.json"))


LONG = "/tmp/" + "a" * 300


@pytest.mark.parametrize("args, flag, path", [
    (["run", "--meter", "none"], "--data", LONG + ".npz"),
    (["plan"], "--data", LONG + ".npz"),
    (["sweep", "--dry-run"], "--db", LONG + ".db"),
    (["sweep", "--dry-run"], "--db", "/etc/passwd/under-a-file.db"),
])
def test_a_path_the_os_refuses_is_one_line_naming_it(capsys, args, flag, path):
    assert main([*args, *TINY, flag, path]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {flag} {path}: cannot use this path (")
    assert ("File name too long" in line or "Not a directory" in line) and line.endswith("choose another")


def test_plan_reports_what_the_inputs_need(capsys):
    assert main(["plan", *TINY, "--samples", "100000", "--batch-size", "1000000", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    data, batch = memory.dataset_bytes(100_000, 40, 4) / 2**30, memory.batch_bytes(1_000_000, 40, "float32") / 2**30
    assert f"inputs: data ~{data:.2f} GiB on the host; bench batch ~{batch:.2f} GiB" in out
