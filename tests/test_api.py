"""The Python API: windows on any meter, benchmark() on any module and input, same figures as the CLI."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moe_energy as me
from moe_energy import api
from moe_energy.cli import main
from moe_energy.config import ConfigError, ModelSpec
from moe_energy.energy.rapl import ENV_ROOT, RaplMeter
from moe_energy.measure import records, window
from moe_energy.measure.records import MEDIAN_KEYS, SPREAD_KEYS
from moe_energy.models.counting import moe_flops
from moe_energy.runner import core as pipeline


class UserMoE(nn.Module):
    """A user's own top-1 MoE: a gate and a ModuleList of experts, called as model(x=..., scale=...)."""

    def __init__(self, d: int = 16, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, d))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # x [T, d] -> [T, d]
        choice = self.gate(x).argmax(-1)  # [T]
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = choice == e
            y[rows] = expert(x[rows])
        return y * scale


def test_public_names_resolve_and_import_stays_light():
    for name in me.__all__:
        assert getattr(me, name) is not None
    assert me.presets["small"] == ModelSpec(experts=8, hidden=256, layers=3, top_k=2)
    assert "auto" in me.strategies and "grouped" in me.strategies
    with pytest.raises(AttributeError):
        me.not_a_name  # noqa: B018
    r = subprocess.run([sys.executable, "-c", "import sys, moe_energy; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_every_meter_has_a_window_that_syncs_at_both_edges(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text("1000000\n")
    meter = RaplMeter(root=tmp_path)
    syncs = []
    with meter.window("my-block", sync=lambda: syncs.append(1)) as w:
        assert len(syncs) == 1 and w.result is None
        (zone / "energy_uj").write_text("3500000\n")  # 2.5 J inside the window
    assert len(syncs) == 2
    assert w.name == "my-block" and w.result is not None
    assert w.result.joules == pytest.approx(2.5) and w.result.method == "counter" and w.result.seconds > 0
    for name in ("estimate", "none"):  # the default sync (every GPU in use) is a no-op on a CPU run
        with me.make_meter(name, "cpu").window() as w2:
            sum(range(10_000))
        assert w2.result is not None and w2.result.method == name


def test_issue_example_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "no-powercap"))  # no counter: the labelled estimate
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(16, 32)
    with pytest.warns(UserWarning, match="ESTIMATE"):
        meter = me.auto_meter()
    with meter.window("my-block") as w:
        for _ in range(100):
            model(x)
    assert w.result.joules > 0 and w.result.seconds > 0 and w.result.method == "estimate"
    res = me.benchmark(model, x, duration=0.2, repeats=2, warmup=0, meter=meter)
    assert res.inferences_per_joule > 0 and res.inferences_per_second > 0
    assert res.to_dict()["energy_note"].startswith("energy figures are an ESTIMATE")
    moe = me.MoE(experts=8, hidden=256, layers=3, top_k=2, strategy="auto")
    xb = torch.randn(64, 784)
    with torch.inference_mode():
        y_auto = moe(xb)
        moe.strategy = "grouped"
        y_grouped = moe(xb)
    torch.testing.assert_close(y_auto, y_grouped, atol=1e-4, rtol=1e-4)
    total, active = me.matched_dense(moe, match="total"), me.matched_dense(moe, match="active")
    assert total.num_params >= moe.num_params > active.num_params >= moe.num_active_params


def test_transformer_layer_on_live_fake_rapl(live_rapl):
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    x = torch.randn(8, 10, 32)  # [N, S, E]: 8 inferences per call
    meter = me.auto_meter(notice=None)
    assert meter.name == "rapl"
    # 1 s windows: the fake's writer, a process of its own, can lag a loaded 2-core host by tens of ms, which a
    # 0.4 s window read as over 10 % (a failure seen once)
    res = me.benchmark(layer, x, duration=1.0, repeats=2, warmup=0, meter=meter)
    assert res.method == "counter" and not res.is_estimate and res.repeats == 2 and res.batch_size == 8
    assert not layer.training  # benchmark measures in eval mode
    for w in res.windows:
        assert w["inferences"] == w["batches"] * 8
        assert w["energy_by_device_j"]["cpu:package-0"] == pytest.approx(40.0 * w["window_s"], rel=0.10)
        assert w["inferences_per_joule"] == pytest.approx(w["inferences"] / w["energy_j"])
    ipj = [w["inferences_per_joule"] for w in res.windows]
    assert res.inferences_per_joule == pytest.approx(statistics.median(ipj))
    assert res.summary["inferences_per_joule_min"] == min(ipj) and res.summary["inferences_per_joule_max"] == max(ipj)
    # the fused fast path hides its matrix products: FLOPs unknown, never 0
    assert res.summary["flops_per_inference"] is None and res.summary["achieved_gflops"] is None
    assert "not known" in res.flops_method
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["energy_meter"] == d["energy_meter_info"]["name"] == "rapl"
    assert d["energy_note"] is None and d["energy_method"] == "counter"


def test_user_moe_with_dict_and_tuple_inputs_and_explicit_batch_size(live_rapl):
    torch.manual_seed(0)
    model = UserMoE()
    x, scale = torch.randn(12, 16), torch.tensor(2.0)
    by_dict = me.benchmark(model, {"x": x, "scale": scale}, duration=0.3, repeats=1, warmup=0)
    assert by_dict.method == "counter" and by_dict.batch_size == 12
    assert by_dict.flops_method.startswith("FlopCounterMode")
    flops = by_dict.summary["flops_per_inference"]
    assert flops > 0  # gate 2*16*4 plus one expert's 2*(16*32 + 32*16) per token
    assert flops == pytest.approx(2 * 16 * 4 + 2 * (16 * 32 + 32 * 16), rel=0.01)
    [w] = by_dict.windows
    assert w["achieved_gflops"] == pytest.approx(w["inferences"] * flops / w["window_s"] / 1e9)
    by_tuple = me.benchmark(model, (x, scale), duration=0.3, repeats=1, warmup=0, batch_size=3,
                            flops_per_inference=1000)
    assert by_tuple.batch_size == 3 and by_tuple.windows[0]["inferences"] == 3 * by_tuple.windows[0]["batches"]
    assert by_tuple.summary["flops_per_inference"] == 1000 and by_tuple.flops_method.startswith("given")


def test_bad_inputs_are_one_line_errors():
    model = nn.Linear(4, 4)
    for kwargs in ({"duration": 0}, {"duration": float("nan")}, {"repeats": 0}, {"warmup": -1}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            me.benchmark(model, torch.zeros(2, 4), **{"duration": 0.1, "repeats": 1, **kwargs})
    with pytest.raises(TypeError, match="repeats=1.5"):  # a wrong kind of value: a TypeError, not a ValueError
        me.benchmark(model, torch.zeros(2, 4), duration=0.1, repeats=1.5)
    with pytest.raises(TypeError, match="give a tensor"):
        me.benchmark(model, "not a batch", duration=0.1)
    with pytest.raises(ValueError, match="pass batch_size="):
        me.benchmark(lambda **kw: None, {"n": 3}, duration=0.1)  # type: ignore[arg-type]


def test_api_and_cli_share_the_window_and_the_statistics():
    assert api.measure is window.measure and pipeline.measure is window.measure
    assert api.summarize is records.summarize and pipeline.measured_record is records.measured_record


@pytest.mark.slow
def test_api_reduces_cli_windows_to_the_cli_figures(tmp_path, tiny_spec):
    out = tmp_path / "out"
    spec = ["--experts", "4", "--hidden", "16", "--layers", "2", "--top-k", "2", "--input-dim", "40",
            "--classes", "4"]
    code = main(["run", *spec, "--samples", "300", "--epochs", "1", "--warmup", "0", "--device", "cpu",
                 "--models", "moe,dense_total", "--duration", "0.2", "--repeats", "2", "--idle-seconds", "0",
                 "--cooldown", "0", "--meter", "estimate", "--batch-size", "32", "--out", str(out)])
    assert code == 0
    [f] = list(out.glob("run-*.json"))
    doc = json.loads(f.read_text())
    for rec in doc["models"]:
        res = api.result_from_windows(rec["windows"], model=rec["name"], device="cpu", duration_s=0.2,
                                      warmup_s=0.0, flops_method="cli")
        for k in MEDIAN_KEYS:
            assert res.summary[k] == rec[k], k
        for k in SPREAD_KEYS:
            assert (res.summary[f"{k}_min"], res.summary[f"{k}_max"]) == (rec[f"{k}_min"], rec[f"{k}_max"]), k
        assert res.inferences_per_joule == rec["inferences_per_joule"] and res.method == rec["energy_method"]
    # the same model through the API: the same FLOPs, widths and batch arithmetic as the CLI recorded
    moe_rec, dense_rec = doc["models"]
    moe = me.MoE.from_spec(tiny_spec)
    dense = me.matched_dense(moe, "total")
    assert dense.width == dense_rec["width"]
    for model, rec in ((moe, moe_rec), (dense, dense_rec)):
        res = me.benchmark(model, torch.randn(32, 40), duration=0.2, repeats=1, warmup=0, meter=me.make_meter(
            "estimate", "cpu"))
        assert res.summary["flops_per_inference"] == rec["flops_per_inference"]
        assert res.batch_size == rec["batch_size"] == 32
        assert res.method == rec["energy_method"] == "estimate"
    assert moe_rec["flops_per_inference"] == moe_flops(tiny_spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_benchmark_on_cuda():
    model = nn.Linear(64, 64).cuda()
    res = me.benchmark(model, torch.randn(32, 64, device="cuda"), duration=0.5, repeats=1, warmup=0)
    assert res.device.startswith("cuda") and res.inferences_per_second > 0


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's API example, with its windows shortened (the names and calls are what is checked)."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = ""
    for name in ("README.md",):
        p = root / name
        if p.exists() and "## Measure your own model from Python" in p.read_text():
            text = p.read_text().split("## Measure your own model from Python", 1)[1]
            break
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code, "no Python example under '## Measure your own model from Python'"
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "no-powercap"))
    real = me.benchmark
    calls = []

    def short(model, batch, duration=10.0, repeats=3, **kw):
        calls.append((duration, repeats))
        return real(model, batch, 0.1, 1, warmup=0, **kw)

    monkeypatch.setattr(me, "benchmark", short)
    src = code.group(1).replace("range(100)", "range(3)")
    with pytest.warns(UserWarning, match="ESTIMATE"):
        exec(compile(src, "README example", "exec"), {})
    assert calls == [(10, 3), (5, 3), (5, 3)]


def test_benchmark_adds_carbon_and_cost_as_labelled_estimates(monkeypatch):
    from moe_energy.power.carbon import ESTIMATED, JOULES_PER_KWH

    monkeypatch.setenv("MOE_ENERGY_PRICE_PER_KWH", "9")  # the API takes only what the script passes
    meter = me.make_meter("estimate", "cpu", cpu_tdp_watts=10)
    r = me.benchmark(nn.Linear(8, 8), torch.zeros(4, 8), duration=0.1, repeats=1, warmup=0, meter=meter,
                     carbon_intensity=400)
    kwh = 1e6 / r.inferences_per_joule / JOULES_PER_KWH
    assert r.co2e_g_per_million == pytest.approx(400 * kwh) and r.cost_per_million is None
    d = r.to_dict()
    assert (d["carbon_intensity_g_per_kwh"], d["price_per_kwh"], d["carbon_basis"]) == (400.0, None, ESTIMATED)
    assert "ESTIMATES" in d["carbon_note"] and "400" in d["carbon_note"] and "energy itself an estimate" in d[
        "carbon_note"]
    plain = me.benchmark(nn.Linear(8, 8), torch.zeros(4, 8), duration=0.1, repeats=1, warmup=0, meter=meter)
    assert plain.co2e_g_per_million is None and "co2e_g_per_million" not in plain.to_dict()
    assert plain.to_dict()["carbon_note"] is None


@pytest.mark.parametrize("kwargs, needle", [
    ({"carbon_intensity": -1.0}, "carbon_intensity=-1.0 must be a finite number"),
    ({"carbon_intensity": 9000.0}, "above any grid's intensity"),
    ({"price_per_kwh": float("inf")}, "price_per_kwh=inf must be")])
def test_benchmark_refuses_bad_carbon_figures_as_the_cli_does(kwargs, needle, tmp_path, capsys):
    with pytest.raises(ConfigError, match=needle) as e:
        me.benchmark(nn.Linear(4, 4), torch.zeros(2, 4), duration=0.1, repeats=1, **kwargs)
    assert "\n" not in str(e.value)
    flag, value = next(iter(kwargs.items()))
    assert main(["run", "--carbon-intensity" if flag == "carbon_intensity" else "--price-per-kwh", str(value),
                 "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert str(e.value) in capsys.readouterr().err  # the CLI's own line
